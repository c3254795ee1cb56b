"""The reference's closed forms with unit costs (forward 1, backward 2, communication free).

The tests hold the generated schedules to them exactly (tests/test_schedules.py); `slimpipe tune`
uses them to bound candidates without compiling. Interleaved Seq1F1B uses our groups of
G = n*ceil(p/n) units (see seq1f1b.py), which equals the reference's warm-up where n divides p."""
from __future__ import annotations

from ir import SpecError


def closed_form_bubble(fam: str, p: int, m: int, n: int, v: int) -> float:
    """Bubble fraction (p-1)/(units + p-1), units = work per rank in unit steps of one chunk."""
    work = m * n if fam in ("gpipe", "1f1b") else v * m * n
    return (p - 1) / (work + p - 1)


def closed_form_peak_units(fam: str, p: int, m: int, n: int, v: int) -> int:
    """Forward units in flight at rank 0's peak (the families' in-flight limits, capped by m*n*v)."""
    total = m * n * v
    if fam in ("gpipe", "looped-bfs"):
        return total
    if fam == "1f1b" or (fam == "interleaved-1f1b" and v == 1):
        return min(p, total)
    if fam == "interleaved-1f1b":
        return min((v - 1) * p + 2 * (p - 1) + 1, total)
    if fam == "seq1f1b":
        if v == 1:
            return min(p + n - 1, total)
        g = n * -(-p // n)
        return min((v - 1) * g + 2 * (p - 1) + n, total)
    if fam == "slimpipe":
        return min(n * v + 2 * (p - 1), total)
    raise SpecError(f"no closed form for schedule {fam!r}")
