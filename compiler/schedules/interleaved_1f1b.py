"""Interleaved 1F1B (Megatron virtual pipeline): looping placement; micro-batches in rounds of
G >= p (common.rounds: max(1, m div p) rounds, sizes within one of each other, the larger first;
every round is p where p divides m, one round of m when m < p). Within a round each chunk runs
the round's micro-batches in turn. Rank r warms up with min((v-1)G_0 + 2(p-r-1), m*v) forwards
(G_0 the first round), then 1F1B steps.

Unit costs (F = 1, B = 2, communication free): makespan 3 max(v m + p - 1, m + v p - 1), i.e.
bubble (p-1)/(v m + p-1) for m >= p (any m, not only multiples of p) and
(v p - 1 - (v-1) m)/(m + v p - 1) for m < p (a micro-batch's chunks never overlap on a rank:
the order is a pipeline of v p stages), rank-0 peak min((v-1)G_0 + 2(p-1) + 1, m v)."""
from ir import PlanSpec

from . import onef1b
from .common import Family, Order, bounded_inflight, megatron_interleaved, rounds


def generate(spec: PlanSpec) -> Order:
    p, v, m = spec.pp, spec.virtual_stages, spec.microbatches
    if v == 1:
        return onef1b.generate(spec)
    units = [(mb, 0) for mb in range(m)]
    groups = rounds(m, p)
    fwd, bwd = megatron_interleaved(spec, units, units, groups)
    return [bounded_inflight(fwd, bwd, min(2 * (p - r - 1) + (v - 1) * groups[0], m * v) + 1) for r in range(p)]


def interleaved_bubble(p: int, m: int, n: int, v: int) -> float:
    """Unit-cost bubble of the interleaved order over u = m*n units in rounds of >= p units:
    makespan 3 max(v u + p - 1, u + v p - 1); (p-1)/(v u + p-1) where u >= p."""
    u = m * n
    span = max(v * u + p - 1, u + v * p - 1)
    return 1 - v * u / span


def peak_units(p: int, m: int, n: int, v: int) -> int:
    total = m * n * v
    if v == 1:
        return min(p, total)
    return min((v - 1) * rounds(m, p)[0] + 2 * (p - 1) + 1, total)


FAMILY = Family("interleaved-1f1b", "Megatron virtual-pipeline 1F1B", generate, allows_slices=False,
                inflight="min(2(p-r-1) + (v-1)G, m*v) + 1, G = ceil(m / max(1, m div p)) (micro-batches per round)",
                bubble=interleaved_bubble, peak_units=peak_units, search_virtual="above_one")
