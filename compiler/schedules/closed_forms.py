"""The closed forms with unit costs (forward 1, backward 2, communication free), read from each
family's record (compiler.schedules.common.Family: bubble, peak_units, and where they are exact).

The tests hold the generated schedules to them exactly (tests/test_schedules.py); `slimpipe tune`
uses them to bound candidates without compiling. The interleaved orders group micro-batches in
rounds of at least p units (common.rounds; seq1f1b.py, interleaved_1f1b.py), which equals the
reference's warm-up where n divides p and the rounds divide m."""
from __future__ import annotations

from ir import SpecError

from . import FAMILIES


def _family(fam: str):
    f = FAMILIES.get(fam)
    if f is None or f.bubble is None or f.peak_units is None:
        raise SpecError(f"no closed form for schedule {fam!r}")
    return f


def closed_form_bubble(fam: str, p: int, m: int, n: int, v: int) -> float:
    """Bubble fraction (p-1)/(units + p-1), units = work per rank in unit steps of one chunk."""
    return _family(fam).bubble(p, m, n, v)


def closed_form_peak_units(fam: str, p: int, m: int, n: int, v: int) -> int:
    """Forward units in flight at rank 0's peak (the families' in-flight limits, capped by m*n*v)."""
    return _family(fam).peak_units(p, m, n, v)
