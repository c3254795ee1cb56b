"""Looped breadth-first (BFPP): looping placement; for each local chunk ascending, forward every
micro-batch (slices ascending); then for each chunk descending, backward every micro-batch
(slices descending)."""
from ir import B, F, PlanSpec

from .common import Family, Order, all_units, chunked_bubble


def generate(spec: PlanSpec) -> Order:
    m, n, v = spec.microbatches, spec.slices, spec.virtual_stages
    fwd = [F(mb, j, c) for c in range(v) for mb in range(m) for j in range(n)]
    bwd = [B(mb, j, c) for c in reversed(range(v)) for mb in range(m) for j in reversed(range(n))]
    return [fwd + bwd for _ in range(spec.pp)]


FAMILY = Family("looped-bfs", "breadth-first over looping chunks (BFPP)", generate,
                inflight="every unit (m*n*v)", bubble=chunked_bubble, peak_units=all_units,
                exact=lambda p, m, n, v: m * n >= p, fit=lambda p, m, n, v: (p, max(m, -(-p // n)), n, v),
                search_slices=False, search_virtual="above_one")
