"""Slice partition (uniform, or Seq1F1B's computation-wise split: equal forward cost per slice)
and the layer split over pipeline stages (uniform, or balanced by the cost model).

`flops`: with T the forward FLOPs of the whole sequence through the whole model (costs.
model_forward_flops: GQA, SwiGLU, causal attention over the prefix), fix the slices from the
end: P = S; for i in 1..n-1 take the smaller root s of cost(slice [P-s, P)) = T/n, rounded down
to a multiple of `granularity`, prepend it, P -= s; the first slice takes the rest. Later slices
attend over longer prefixes, so they come out shorter.
"""
from __future__ import annotations

import math

from ir import SpecError

from .costs import DeviceProfile, model_forward_flops, unit_parts


def flops_partition(model, seq_len: int, n: int, granularity: int = 2, mlp_matrices: int = 3,
                    elementwise: bool = True, cp: int = 1) -> list[int]:
    """Slice lengths (summing to seq_len) with about equal forward FLOPs each. With context parallelism
    (`cp`, which must divide seq_len) every slice but the first is a multiple of lcm(granularity, cp),
    so the first (seq_len less the others) is a multiple of cp too: each of the cp GPUs holds whole
    tokens of every slice."""
    granularity = math.lcm(granularity, cp)
    if n < 1:
        raise SpecError(f"--slices {n} must be >= 1")
    if n * granularity > seq_len:
        raise SpecError(f"--partition flops: --seq-len {seq_len} is too short for --slices {n} "
                        f"(slices are multiples of {granularity} tokens)")

    def cost(s, prefix):
        return model_forward_flops(model, s, prefix, mlp_matrices, elementwise)

    target = cost(seq_len, 0) / n
    P = seq_len
    out: list[int] = []
    for _ in range(n - 1):
        # cost of the slice [P-s, P) is exactly A s - B s^2 (pairs = s P - s^2/2; the rest linear)
        f1, f2 = cost(1, P - 1), cost(2, P - 2)
        B = (2 * f1 - f2) / 2
        A = f1 + B
        disc = A * A - 4 * B * target
        s = (A - math.sqrt(max(disc, 0.0))) / (2 * B) if B > 0 else target / A
        s = int(s) // granularity * granularity
        if s < granularity:
            s = granularity
        out.insert(0, s)
        P -= s
    if P < 1:
        raise SpecError(f"--partition flops: --seq-len {seq_len} is too short for --slices {n}")
    out.insert(0, P)
    return out


def uniform_layers(layers: int, stages: int) -> tuple[int, ...]:
    """Even split of decoder layers over stages; when uneven, the first (layers mod stages)
    stages take one layer more (Megatron's default)."""
    if layers < stages:
        raise SpecError(f"model has {layers} layers, fewer than pp*virtual_stages={stages} stages; "
                        f"lower --pp/--virtual-stages or raise --layers")
    base, extra = divmod(layers, stages)
    return tuple(base + (1 if s < extra else 0) for s in range(stages))


def balanced_layers(layers: int, layer_s: float, first_s: float, last_s: float, stages: int) -> tuple[int, ...]:
    """Layer split minimising the slowest stage, stage s costing k_s * layer_s plus first_s on
    stage 0 (embedding) and last_s on the last stage (final norm, LM head, loss); seconds of one
    micro-batch's forward + backward. Every stage keeps >= 1 layer.

    Exact: the smallest makespan T is one of the candidates k * layer_s + extra_s; for a given T
    stage s can hold at most floor((T - extra_s) / layer_s) layers, and T is feasible when those
    capacities sum to >= layers. Surplus capacity is removed from the slowest stages first, so
    ties keep the uniform shape (extra layers on the first stages). Falls back to uniform_layers
    when that is no slower (the slowest stage is the quantity both are judged by)."""
    uni = uniform_layers(layers, stages)
    if layer_s <= 0 or stages == 1:
        return uni
    extra = [0.0] * stages
    extra[0] += first_s
    extra[-1] += last_s

    def cost(split):
        return max(k * layer_s + e for k, e in zip(split, extra))

    def caps(T):
        return [max(0, int((T - e) / layer_s * (1 + 1e-12))) for e in extra]

    cands = sorted({k * layer_s + e for e in extra for k in range(1, layers + 1)})
    lo, hi = 0, len(cands) - 1
    while lo < hi:  # the smallest feasible candidate (feasibility is monotone in T)
        mid = (lo + hi) // 2
        c = caps(cands[mid])
        if min(c) >= 1 and sum(c) >= layers:
            hi = mid
        else:
            lo = mid + 1
    split = caps(cands[lo])
    surplus = sum(split) - layers
    while surplus > 0:  # drop a layer from the slowest stage that can spare one (last index on ties)
        s = max((k * layer_s + e, i) for i, (k, e) in enumerate(zip(split, extra)) if k > 1)[1]
        split[s] -= 1
        surplus -= 1
    out = tuple(split)
    return out if cost(out) < cost(uni) * (1 - 1e-9) else uni


def stage_costs(model, slice_lens, prof: DeviceProfile, tp: int = 1, cp: int = 1, mbs: int = 1) -> tuple[float, float, float]:
    """(one decoder layer, embedding, final norm + LM head + loss): seconds of one micro-batch's
    forward + backward with slices `slice_lens`, under the cost model (passes.costs.unit_parts).
    The embedding is a gather: no FLOPs in the model, so 0."""
    def secs(layers, last):
        tot, prefix = 0.0, 0
        for s in slice_lens:
            for bwd in (False, True):
                mm, attn, ring, t_tp = unit_parts(model, s, prefix, bwd, tp, cp, prof, layers=layers, last=last, mbs=mbs)
                tot += mm + max(attn, ring) + t_tp
            prefix += s
        return tot

    return secs(1, False), 0.0, secs(0, True)
