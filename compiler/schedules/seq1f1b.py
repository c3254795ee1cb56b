"""Seq1F1B: 1F1B over (micro-batch, slice) units; backward FIFO over micro-batches, LIFO over
slices; warm-up min(p-r-1 + n-1, m*n).

Interleaved form (v > 1): Megatron's virtual-pipeline order over the m*n units, in rounds of
whole micro-batches, at least k = ceil(p/n) of them (G >= p units): common.rounds(m, k) gives
max(1, m div k) rounds whose sizes differ by at most one, the larger first. Warm-up
min((v-1)G_0 + 2(p-r-1) + n-1, m*v*n), G_0 = n * (micro-batches of the first round). Where n
divides p and k divides m, every round is G = p units and this is the reference's
(v-1)p + 2(p-r-1) + n-1. Rounds aligned to micro-batches keep the LIFO backward of a
micro-batch's slices inside one round; rounds that split a micro-batch (n not dividing p) would
make the first backward wait for forwards far beyond the warm-up. Any m: with m < k (m*n < p)
one round of m micro-batches.
"""
from ir import PlanSpec

from .common import Family, Order, bounded_inflight, lexicographic, megatron_interleaved, rounds
from .interleaved_1f1b import interleaved_bubble


def group_microbatches(p: int, n: int) -> int:
    """k = ceil(p/n): the fewest whole micro-batches whose units fill the ring."""
    return -(-p // n)


def generate(spec: PlanSpec) -> Order:
    p, v, m, n = spec.pp, spec.virtual_stages, spec.microbatches, spec.slices
    fwd, bwd = lexicographic(spec)
    if v == 1:
        return [bounded_inflight(fwd, bwd, min(p - r - 1 + n - 1, m * n) + 1) for r in range(p)]
    groups = [n * g for g in rounds(m, group_microbatches(p, n))]
    units = [(i.mb, i.slice) for i in fwd]
    bwd_units = [(i.mb, i.slice) for i in bwd]
    fwd, bwd = megatron_interleaved(spec, units, bwd_units, groups)
    return [bounded_inflight(fwd, bwd, min((v - 1) * groups[0] + 2 * (p - r - 1) + n - 1, m * v * n) + 1)
            for r in range(p)]


def peak_units(p: int, m: int, n: int, v: int) -> int:
    """Rank 0's warm-up + 1; for v > 1 a lower bound where n does not divide p."""
    total = m * n * v
    if v == 1:
        return min(p + n - 1, total)
    g = n * rounds(m, group_microbatches(p, n))[0]
    return min((v - 1) * g + 2 * (p - 1) + n, total)


FAMILY = Family("seq1f1b", "sequence-level 1F1B (Seq1F1B)", generate,
                inflight="min(p-r-1 + n-1, m*n) + 1; v > 1: min((v-1)G + 2(p-r-1) + n-1, m*v*n) + 1, "
                         "G = n * ceil(m / max(1, m div ceil(p/n)))",
                bubble=interleaved_bubble, peak_units=peak_units, peak_exact=lambda p, m, n, v: v == 1,
                partitions=("uniform", "flops"))
