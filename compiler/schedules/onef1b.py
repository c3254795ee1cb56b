"""1F1B (PipeDream-flush): warm-up min(p-r-1, m) forwards, then one forward one backward, then drain."""
from ir import PlanSpec

from .common import Family, Order, bounded_inflight, flat_bubble, lexicographic


def generate(spec: PlanSpec) -> Order:
    fwd, bwd = lexicographic(spec)
    return [bounded_inflight(fwd, bwd, spec.pp - r) for r in range(spec.pp)]


FAMILY = Family("1f1b", "one forward, one backward (PipeDream-flush)", generate,
                allows_slices=False, allows_virtual=False,
                inflight="p - r", bubble=flat_bubble, peak_units=lambda p, m, n, v: min(p, m * n * v),
                search_virtual="one")
