"""Memory model: bytes per rank over its program order; the peak and its breakdown.

A rank's memory depends only on which of its own units have run, so walking its stream in
program order gives its memory over time (no timing needed). b = dtype_bytes (2 for bf16),
t = tp, c = cp, mbs = micro-batch size; tokens of a unit = slice length * mbs / c.

static (per rank, from the layers of its stages; embedding V*H on stage 0, LM head V*H + final
norm on the last stage; / t):
    params     b bytes per parameter
    grads      4 bytes per parameter (fp32 main gradients, as Megatron keeps them)
    optimizer  mixed-precision Adam, distributed over dp*c: (12 if b == 2 else 8) / (dp*c) bytes
               per parameter (fp32 master copy + m + v; no master copy when training in fp32)
per unit in flight (from its F until its B), per decoder layer and token (flash attention, no
recomputation, sequence parallel so everything divides by t):
    activations  (6H + 3F) b + 4h    : RMSNorm 1 in/out, q, attention out, RMSNorm 2 in/out (H
                 each; q and attention out are heads * head_dim wide, which is H unless the
                 config sets head_dim apart: 4H + 2hd in general), SwiGLU gate, up and product (F each), the attention log-sum-exp (fp32)
                 + on the last stage 2H b per token (final norm and LM head inputs)
    kv_cache     2 g d b             : the unit's K and V, kept while any later slice needs them
                 (its own backward is the last to, so: from its F to its B)
split backward (I and W instead of B; ir.KINDS memory effects free_input / free_rest): at I
everything above is released as at B, but what W needs -- the inputs of the unit's matmuls and
their output gradients, (6H + 2 g d + 3F) b per layer and token, + (H + V) b per token on the
last stage (LM head input and the logits' gradient) -- is kept until W ("weight_grad_inputs",
see per_token_layer_w).
dK/dV accumulators: after B(mb, j, c) (or I) the earlier slices' dK/dV (offset_j tokens, 2 g d b per
token and layer) wait for their own backward; freed with slice 0's.
logits (last stage, transient while one unit runs): fp32 logits and their gradient/softmax,
2 * 4 * tokens * V / t.

`saves` picks what a unit keeps for its backward:
    "fused"     (default) a real flash-attention training step with fused kernels, as above:
                activations (6H + 3F) b + 4h per layer and token (+ 2H b per token on the last
                stage), logits transient. The fused RMSNorm's fp32 rstd (4 bytes per norm and
                token) is left out: next to (6H + 3F) b it is noise.
    "executor"  what executor/ (PyTorch eager autograd with a few memory-lean custom Functions,
                measured by its ActivationTracker: saved tensors deduplicated by storage,
                parameters excluded, + K/V caches + dK/dV accumulators) really keeps. Per layer
                and token:
                    (6H + 2F) b + 4h + 8      activations
                    2 g d b                   K/V (the attention's saved k, v are the cache)
                i.e. each RMSNorm (executor.model.RMSNorm) saves its input and fp32 rstd (H b + 4;
                its output is the next matmuls' saved input, H b); q and the attention output
                (returned in [b, s, heads, d] memory, so the out-projection's input is a view of
                it: saved once), H b each, + the fp32 lse (4h); SwiGLU with the down projection
                (executor.model.SwiGLUDown) saves only gate and up (2F b; silu(gate) and the
                product are recomputed in backward) -- one F b less than "fused", which keeps
                the product for the down projection, and 8 bytes more (the two norms' fp32 rstd).
                Qwen3's per-head q/k RMSNorms add their inputs and fp32 rstd: (h + g) d b +
                4 (h + g). Biases save nothing (the matmuls keep only their inputs).
                RoPE saves only its cos/sin tables, once per unit: + 2 d b per token (not per
                layer). Last stage, per token: the final norm 2H b + 4 (input, rstd; its output
                is the LM head's input, saved by a split unit; a fused one saves the head's
                input gradient instead, as many bytes, see executor.model.HeadCrossEntropy) and,
                for a unit whose backward is split (I, W), the loss head's fp32 log-sum-exp, 4
                bytes (its I recomputes the logits instead of keeping [tokens, V] fp32
                log-probabilities), held from the unit's F to its I (reported as "logits"; the
                transient logits/gradient are not saved tensors and are not counted). Left out: the int64 token ids that the embedding and the loss
                save (8 bytes per token of the micro-batch, shared by its slices).
                Measured (bench/memory_vs_executor.py, tests/test_executor_model.py): before the
                custom Functions the executor kept (9H + 4F) b + 4h + 8 per layer and token and
                4V fp32 log-probabilities per last-stage token.
                Compare the executor's peak_activation_bytes with activation_peak(...,
                saves="executor"), the peak of activations + kv_cache + kv_grads + logits.
"""
from __future__ import annotations

from ir import KINDS, Plan, split_units

CATEGORIES = ("params", "grads", "optimizer", "activations", "kv_cache", "kv_grads", "logits", "weight_grad_inputs")
SAVES = ("fused", "executor")
DYNAMIC = ("activations", "kv_cache", "kv_grads", "logits", "weight_grad_inputs")


def layer_params(model) -> int:
    """Weights of one decoder layer: q/k/v/o projections (head_dim may differ from hidden/heads),
    SwiGLU MLP, two norms, and the optional biases and per-head q/k norms."""
    H, h, g, d, F = model.hidden, model.heads, model.kv_heads, model.head_dim, model.ffn
    n = H * (h * d + 2 * g * d) + h * d * H + 3 * H * F + 2 * H
    if model.qkv_bias:
        n += (h + 2 * g) * d
    if model.o_bias:
        n += H
    if model.mlp_bias:
        n += 2 * F + H
    if model.qk_norm:
        n += 2 * d
    return n


def rank_params(spec, rank: int) -> float:
    """Parameters held by one GPU of the rank (its stages' layers, embedding, head; / tp)."""
    m = spec.model
    last = spec.num_stages - 1
    tot = 0
    stages = spec.placement[rank]
    for s in stages:
        tot += spec.stage_layers[s] * layer_params(m)
        if s == 0:
            tot += m.vocab * m.hidden
        if s == last:
            tot += m.hidden
            if not (m.tie_embeddings and 0 in stages):  # tied and on one rank: the head is the embedding
                tot += m.vocab * m.hidden
    return tot / spec.tp


def static_bytes(spec, rank: int, dtype_bytes: int = 2) -> dict[str, float]:
    n = rank_params(spec, rank)
    opt = (12 if dtype_bytes == 2 else 8) / (spec.dp * spec.cp)
    return {"params": n * dtype_bytes, "grads": n * 4.0, "optimizer": n * opt}


def _check_saves(saves: str) -> None:
    if saves not in SAVES:
        raise ValueError(f"saves={saves!r} is unknown; allowed: {', '.join(SAVES)}")


def per_token_layer(model, dtype_bytes: int = 2, saves: str = "fused") -> tuple[float, float]:
    """(activation, K/V) bytes per token per decoder layer, before dividing by tp."""
    _check_saves(saves)
    H, h, g, F, d = model.hidden, model.heads, model.kv_heads, model.ffn, model.head_dim
    kv = 2 * g * d * dtype_bytes
    # per-head q/k norms (Qwen3) keep their inputs and fp32 rstd; the q and attention output widths
    # are heads * head_dim (= H unless head_dim is set apart)
    qkn = ((h + g) * d * dtype_bytes + 4 * (h + g)) if model.qk_norm else 0
    if saves == "executor":
        return (4 * H + 2 * h * d + 2 * F) * dtype_bytes + 4 * h + 8 + qkn, kv
    return (4 * H + 2 * h * d + 3 * F) * dtype_bytes + 4 * h + qkn, kv


def per_token_unit(model, last: bool, dtype_bytes: int = 2, saves: str = "fused") -> tuple[float, float]:
    """(activation, held logits) bytes per token of a unit that do not scale with its layers:
    the final norm / LM head inputs on the last stage, RoPE tables and the loss head's saved fp32
    log-sum-exp for saves="executor" (kept by a unit whose backward is split; activation_peak
    counts it for those only). Before dividing by tp."""
    _check_saves(saves)
    H, d = model.hidden, model.head_dim
    if saves == "executor":
        return 2 * d * dtype_bytes + (2 * H * dtype_bytes + 4 if last else 0), (4.0 if last else 0.0)
    return (2 * H * dtype_bytes if last else 0.0), 0.0


def per_token_layer_w(model, dtype_bytes: int = 2) -> float:
    """Bytes per token and decoder layer that a split backward keeps from a unit's I to its W
    (before dividing by tp): the inputs of the layer's matmuls -- RMSNorm 1's output (QKV), the
    attention output (out projection, h d wide), RMSNorm 2's output (gate, up), the SwiGLU product
    (down): (2H + h d + F) b -- and their output gradients -- q/k/v (h d + 2 g d), out projection H,
    gate and up 2F, down H: (2H + h d + 2 g d + 2F) b. Together (4H + 2 h d + 2 g d + 3F) b, which is
    (6H + 2 g d + 3F) b where h d = H; for either `saves`."""
    H, h, g, F, d = model.hidden, model.heads, model.kv_heads, model.ffn, model.head_dim
    return (4 * H + 2 * h * d + 2 * g * d + 3 * F) * dtype_bytes


def per_token_layer_w_shared(model, dtype_bytes: int = 2, saves: str = "fused") -> float:
    """The part of per_token_layer_w that the forward already saved (the same tensors, counted once
    while the unit's I runs): RMSNorm 1's and 2's outputs and the attention output, (2H + h d) b,
    plus the SwiGLU product (F b) where it is saved (fused; the executor recomputes it in I)."""
    H, h, F, d = model.hidden, model.heads, model.ffn, model.head_dim
    return (2 * H + h * d + (F if saves == "fused" else 0)) * dtype_bytes


def per_token_unit_w(model, last: bool, dtype_bytes: int = 2) -> float:
    """Bytes per token of a unit kept from I to W that do not scale with its layers: on the last
    stage the LM head's input (H b) and its output gradient (the logits' gradient, V b)."""
    return (model.hidden + model.vocab) * dtype_bytes if last else 0.0


def rank_memory(plan: Plan, rank: int, dtype_bytes: int = 2, saves: str = "fused") -> dict:
    """{"peak": bytes, "breakdown": {category: bytes at the peak}, "timeline": [bytes after each
    compute unit]} for one rank."""
    spec = plan.spec
    m = spec.model
    tp, cp, mbs = spec.tp, spec.cp, spec.micro_batch_size
    act_tl, kv_tl = per_token_layer(m, dtype_bytes, saves)
    held_logits = saves == "executor"
    kvg_tl = kv_tl
    last = spec.num_stages - 1
    stages = spec.placement[rank]
    static = static_bytes(spec, rank, dtype_bytes)
    base = sum(static.values())
    offsets = [spec.slice_offsets(mb) for mb in range(spec.microbatches)]
    w_tl = per_token_layer_w(m, dtype_bytes)
    w_shared_tl = per_token_layer_w_shared(m, dtype_bytes, saves)
    act = kv = kvg = lgt = wg = 0.0  # lgt: loss-head lse held per unit (saves="executor"); wg: kept for W
    acc: dict[tuple[int, int], float] = {}
    held: dict[tuple[int, int, int], tuple[float, float]] = {}
    w_held: dict[tuple[int, int, int], float] = {}
    peak, peak_bd = base, dict(static, activations=0.0, kv_cache=0.0, kv_grads=0.0, logits=0.0, weight_grad_inputs=0.0)
    timeline = []
    # units whose backward is split (I, W): the executor's loss head keeps its lse for I (fused otherwise)
    split = split_units(plan.ranks[rank]) if held_logits else ()
    for ins in plan.ranks[rank]:
        effect = KINDS[ins.kind].memory  # the kind table: "save" keeps the unit's state, "free" releases it
        if effect is None:
            continue
        st = stages[ins.chunk]
        L = spec.stage_layers[st]
        tok = spec.slice_lens[ins.mb][ins.slice] * mbs / cp
        unit_act, unit_lg = per_token_unit(m, st == last, dtype_bytes, saves)
        logits = 0.0 if held_logits else (2 * 4 * tok * m.vocab / tp if st == last else 0.0)
        key = (ins.mb, ins.slice, ins.chunk)
        if effect == "save":
            a = L * tok * act_tl / tp + unit_act * tok / tp
            v = L * tok * kv_tl / tp
            lg = unit_lg * tok / tp if key in split else 0.0
            held[key] = (a, v, lg)
            act += a
            kv += v
            lgt += lg
            cur = base + act + kv + kvg + lgt + logits + wg
            if cur > peak:
                peak, peak_bd = cur, dict(static, activations=act, kv_cache=kv, kv_grads=kvg, logits=lgt + logits,
                                          weight_grad_inputs=wg)
        elif effect == "free_rest":  # W: what the weight gradient still needed is released after it
            cur = base + act + kv + kvg + lgt + wg
            if cur > peak:
                peak, peak_bd = cur, dict(static, activations=act, kv_cache=kv, kv_grads=kvg, logits=lgt,
                                          weight_grad_inputs=wg)
            wg -= w_held.pop(key, 0.0)
        else:
            shared = 0.0
            if effect == "free_input":  # I: from here until W the unit keeps its matmuls' inputs and output grads
                wk = (L * w_tl + per_token_unit_w(m, st == last, dtype_bytes)) * tok / tp
                w_held[key] = wk
                wg += wk
                # while I runs, the inputs W keeps are still the forward's saved tensors: count them once
                shared = (L * w_shared_tl + (m.hidden * dtype_bytes if st == last else 0.0)) * tok / tp
            cur = base + act + kv + kvg + lgt + logits + wg - shared
            if cur > peak:
                peak, peak_bd = cur, dict(static, activations=act, kv_cache=kv, kv_grads=kvg, logits=lgt + logits,
                                          weight_grad_inputs=wg - shared)
            a, v, lg = held.pop(key, (0.0, 0.0, 0.0))
            act -= a
            kv -= v
            lgt -= lg
            ak = (ins.mb, ins.chunk)
            old = acc.pop(ak, 0.0)
            new = L * offsets[ins.mb][ins.slice] * mbs / cp * kvg_tl / tp
            if new:
                acc[ak] = new
            kvg += new - old
        timeline.append(base + act + kv + kvg + lgt + wg)
    return {"peak": peak, "breakdown": peak_bd, "timeline": timeline}


def activation_peak(plan: Plan, rank: int, dtype_bytes: int = 4, saves: str = "executor") -> dict:
    """The peak of activations + kv_cache + kv_grads + logits on one rank (what the executor's
    peak_activation_bytes measures with saves="executor", dtype_bytes=4 for fp32):
    {"bytes": total, category: bytes at that peak}."""
    mem = rank_memory(plan, rank, dtype_bytes, saves)
    bd = {c: mem["breakdown"][c] for c in DYNAMIC}
    return {"bytes": sum(bd.values()), **bd}


def memory_report(plan: Plan, dtype_bytes: int = 2, saves: str = "fused") -> list[dict]:
    """Per rank: {"rank", "peak_memory_bytes", "memory_breakdown"}."""
    out = []
    for r in range(plan.spec.pp):
        mem = rank_memory(plan, r, dtype_bytes, saves)
        out.append({"rank": r, "peak_memory_bytes": mem["peak"],
                    "memory_breakdown": {c: mem["breakdown"][c] for c in CATEGORIES}})
    return out
