"""Interleaved 1F1B (Megatron virtual pipeline): looping placement, warm-up
min(2(p-r-1) + (v-1)p, m*v), then 1F1B steps. Needs m % p == 0 when v > 1."""
from ir import PlanSpec, SpecError

from . import onef1b
from .common import Family, Order, bounded_inflight, chunked_bubble, megatron_interleaved


def check(spec: PlanSpec) -> None:
    if spec.virtual_stages > 1 and spec.microbatches % spec.pp:
        raise SpecError(f"--microbatches {spec.microbatches}: interleaved-1f1b needs a multiple of "
                        f"--pp {spec.pp} when --virtual-stages > 1")


def generate(spec: PlanSpec) -> Order:
    p, v, m = spec.pp, spec.virtual_stages, spec.microbatches
    if v == 1:
        return onef1b.generate(spec)
    units = [(mb, 0) for mb in range(m)]
    fwd, bwd = megatron_interleaved(spec, units, units)
    return [bounded_inflight(fwd, bwd, min(2 * (p - r - 1) + (v - 1) * p, m * v) + 1) for r in range(p)]


def peak_units(p: int, m: int, n: int, v: int) -> int:
    total = m * n * v
    return min(p, total) if v == 1 else min((v - 1) * p + 2 * (p - 1) + 1, total)


def fit(p: int, m: int, n: int, v: int) -> tuple[int, int, int, int]:
    return p, (p * max(1, m // p) if v > 1 else m), n, v


FAMILY = Family("interleaved-1f1b", "Megatron virtual-pipeline 1F1B", generate, allows_slices=False, check=check,
                inflight="min(2(p-r-1) + (v-1)p, m*v) + 1", bubble=chunked_bubble, peak_units=peak_units, fit=fit,
                search_virtual="above_one")
