"""1F1B (PipeDream-flush): warm-up min(p-r-1, m) forwards, then one forward one backward, then drain."""
from ir import PlanSpec

from .common import Family, Order, bounded_inflight, lexicographic


def generate(spec: PlanSpec) -> Order:
    fwd, bwd = lexicographic(spec)
    return [bounded_inflight(fwd, bwd, spec.pp - r) for r in range(spec.pp)]


FAMILY = Family("1f1b", "one forward, one backward (PipeDream-flush)", generate,
                allows_slices=False, allows_virtual=False)
