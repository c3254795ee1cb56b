"""GPipe: every forward (micro-batch, slice ascending), then every backward."""
from ir import PlanSpec

from .common import Family, Order, lexicographic


def generate(spec: PlanSpec) -> Order:
    fwd, bwd = lexicographic(spec)
    return [fwd + bwd for _ in range(spec.pp)]


FAMILY = Family("gpipe", "all forwards, then all backwards", generate, allows_virtual=False)
