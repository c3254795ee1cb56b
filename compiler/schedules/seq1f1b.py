"""Seq1F1B: 1F1B over (micro-batch, slice) units; backward FIFO over micro-batches, LIFO over
slices; warm-up min(p-r-1 + n-1, m*n).

Interleaved form (v > 1): Megatron's virtual-pipeline order over the m*n units, in groups of
G = n*ceil(p/n) units (whole micro-batches, G >= p), warm-up min((v-1)G + 2(p-r-1) + n-1, m*v*n).
Where n divides p, G = p and this is the reference's (v-1)p + 2(p-r-1) + n-1. Groups aligned to
micro-batches keep the LIFO backward of a micro-batch's slices inside one group; groups of p that
split a micro-batch (n not dividing p) would make the first backward wait for forwards far
beyond the warm-up. Needs m % ceil(p/n) == 0.
"""
from ir import PlanSpec, SpecError

from .common import Family, Order, bounded_inflight, chunked_bubble, lexicographic, megatron_interleaved


def group_microbatches(spec: PlanSpec) -> int:
    return -(-spec.pp // spec.slices)


def check(spec: PlanSpec) -> None:
    k = group_microbatches(spec)
    if spec.virtual_stages > 1 and spec.microbatches % k:
        raise SpecError(f"--microbatches {spec.microbatches}: interleaved seq1f1b with --pp {spec.pp} and "
                        f"--slices {spec.slices} needs a multiple of ceil(pp/slices)={k}")


def generate(spec: PlanSpec) -> Order:
    p, v, m, n = spec.pp, spec.virtual_stages, spec.microbatches, spec.slices
    fwd, bwd = lexicographic(spec)
    if v == 1:
        return [bounded_inflight(fwd, bwd, min(p - r - 1 + n - 1, m * n) + 1) for r in range(p)]
    g = n * group_microbatches(spec)
    units = [(i.mb, i.slice) for i in fwd]
    bwd_units = [(i.mb, i.slice) for i in bwd]
    fwd, bwd = megatron_interleaved(spec, units, bwd_units, group=g)
    return [bounded_inflight(fwd, bwd, min((v - 1) * g + 2 * (p - r - 1) + n - 1, m * v * n) + 1)
            for r in range(p)]


def peak_units(p: int, m: int, n: int, v: int) -> int:
    """Rank 0's warm-up + 1; for v > 1 a lower bound where n does not divide p."""
    total = m * n * v
    if v == 1:
        return min(p + n - 1, total)
    g = n * -(-p // n)
    return min((v - 1) * g + 2 * (p - 1) + n, total)


def fit(p: int, m: int, n: int, v: int) -> tuple[int, int, int, int]:
    k = -(-p // n)
    return p, (k * max(1, m // k) if v > 1 else m), n, v


FAMILY = Family("seq1f1b", "sequence-level 1F1B (Seq1F1B)", generate, check=check,
                inflight="min(p-r-1 + n-1, m*n) + 1; v > 1: min((v-1)G + 2(p-r-1) + n-1, m*v*n) + 1, G = n*ceil(p/n)",
                bubble=chunked_bubble, peak_units=peak_units, peak_exact=lambda p, m, n, v: v == 1, fit=fit,
                partitions=("uniform", "flops"))
