"""SlimPipe: uniform slices; rank r keeps n*v + 2(p-r-1) units in flight (forward while fewer,
then one backward per forward, then drain). Interleaved order per micro-batch: g = smallest
divisor of n with g >= p; for each cycle of g slices, for each chunk, the g slices; backward is
the exact reverse. Needs n >= p when v > 1.

With --split-backward (spec.split_backward; SlimPipe's order with Zero Bubble's I/W split, Qi et
al. 2024) each B becomes I at its place and a W that fills the gaps the order leaves in a
unit-cost replay (common.fill_weight_gradients): F and I keep SlimPipe's order and in-flight
limit, and at most n*v + 2(p-1) units (the fused order's rank-0 peak) are between F and W on any
rank, so the peak units in flight of the whole plan stay the fused order's: min(n*v + 2(p-1), m*n*v)
on every rank (rank r > 0 holds up to 2r more than fused, all of them waiting only for W).
Unit-cost makespan 3vmn + p-1 (bubble (p-1)/(3vmn + p-1), fused: (p-1)/(vmn + p-1)) exactly
where (m-1)*n*v >= p-1: the W of the later micro-batches fill the drain; with fewer (m = 1 always)
it is longer (tests/test_zero_bubble.py)."""
from ir import B, F, PlanSpec, SpecError

from .common import Family, Order, bounded_inflight, chunked_bubble, fill_weight_gradients


def check(spec: PlanSpec) -> None:
    if spec.virtual_stages > 1 and spec.slices < spec.pp:
        raise SpecError(f"--slices {spec.slices}: interleaved slimpipe (--virtual-stages {spec.virtual_stages}) "
                        f"needs slices >= --pp {spec.pp}")


def cycle_size(n: int, p: int) -> int:
    """Smallest divisor of n that is >= p."""
    return next(g for g in range(p, n + 1) if n % g == 0)


def microbatch_order(spec: PlanSpec) -> list[tuple[int, int]]:
    """(slice, chunk) forward order of one micro-batch."""
    n, v = spec.slices, spec.virtual_stages
    if v == 1:
        return [(j, 0) for j in range(n)]
    g = cycle_size(n, spec.pp)
    return [(cyc * g + j, c) for cyc in range(n // g) for c in range(v) for j in range(g)]


def generate(spec: PlanSpec) -> Order:
    p, v, m, n = spec.pp, spec.virtual_stages, spec.microbatches, spec.slices
    order = microbatch_order(spec)
    fwd = [F(mb, j, c) for mb in range(m) for j, c in order]
    bwd = [B(mb, j, c) for mb in range(m) for j, c in reversed(order)]
    fused = [bounded_inflight(fwd, bwd, n * v + 2 * (p - r - 1)) for r in range(p)]
    if not spec.split_backward:
        return fused
    return fill_weight_gradients(spec, fused, [n * v + 2 * (p - 1)] * p)


FAMILY = Family("slimpipe", "uniform slices, n*v + 2(p-r-1) units in flight (SlimPipe)", generate, check=check,
                inflight="n*v + 2(p-r-1)", bubble=chunked_bubble,
                peak_units=lambda p, m, n, v: min(n * v + 2 * (p - 1), m * n * v),
                fit=lambda p, m, n, v: (p, m, (max(n, p) if v > 1 else n), v), default_exchange=True,
                split_option=True, split_bubble=lambda p, m, n, v: (p - 1) / (3 * v * m * n + p - 1),
                split_exact=lambda p, m, n, v: (m - 1) * n * v >= p - 1)
