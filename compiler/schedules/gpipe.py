"""GPipe: every forward (micro-batch, slice ascending), then every backward."""
from ir import PlanSpec

from .common import Family, Order, all_units, flat_bubble, lexicographic


def generate(spec: PlanSpec) -> Order:
    fwd, bwd = lexicographic(spec)
    return [fwd + bwd for _ in range(spec.pp)]


FAMILY = Family("gpipe", "all forwards, then all backwards", generate, allows_virtual=False,
                inflight="every unit (m*n)", bubble=flat_bubble, peak_units=all_units,
                search_slices=False, search_virtual="one")
