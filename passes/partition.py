"""Slice partition: uniform, or Seq1F1B's computation-wise split (equal forward cost per slice).

`flops`: with T the forward FLOPs of the whole sequence through the whole model (costs.
model_forward_flops: GQA, SwiGLU, causal attention over the prefix), fix the slices from the
end: P = S; for i in 1..n-1 take the smaller root s of cost(slice [P-s, P)) = T/n, rounded down
to a multiple of `granularity`, prepend it, P -= s; the first slice takes the rest. Later slices
attend over longer prefixes, so they come out shorter.
"""
from __future__ import annotations

import math

from ir import SpecError

from .costs import model_forward_flops


def uniform(seq_len: int, n: int) -> list[int]:
    if n < 1 or n > seq_len or seq_len % n:
        raise SpecError(f"--slices {n}: uniform slicing needs a divisor of --seq-len {seq_len}")
    return [seq_len // n] * n


def flops_partition(model, seq_len: int, n: int, granularity: int = 2, mlp_matrices: int = 3,
                    elementwise: bool = True) -> list[int]:
    """Slice lengths (summing to seq_len) with about equal forward FLOPs each."""
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
