"""The plan tables tune and compare print: one row per plan (its partition, exchange and layer split included),
and the best plan of every family with the reason a family has none."""
from __future__ import annotations

from .common import BYTE_UNITS, TIME_UNITS, fit_unit


def head(step: str, mem: str) -> str:
    return (f"{'schedule':<17}{'p':>3}{'tp':>3}{'cp':>3}{'dp':>4}{'m':>4}{'n':>4}{'v':>3} {'partition':<10}{'exch':>6}"
            f"{step:>10}{'bubble':>8}{mem:>10}{'tokens/s':>12}{'MFU':>7} {'layers':<8}")


def _units(rows: list[dict]):
    tu, ts = fit_unit([r["step_s"] for r in rows], TIME_UNITS)
    mu, ms = fit_unit([r["peak_memory_bytes"] for r in rows], BYTE_UNITS)
    return tu, ts, mu, ms


def _exch(r: dict) -> str:
    """'off', or how many KV exchanges the plan holds (0: the pass found none worth it, the same
    plan as 'off')."""
    return "off" if not r["exchange"] else str(r.get("exchanges", "on"))


def _row(r: dict, ts: float, ms: float) -> str:
    return (f"{r['schedule']:<17}{r['pp']:>3}{r['tp']:>3}{r['cp']:>3}{r['dp']:>4}{r['microbatches']:>4}"
            f"{r['slices']:>4}{r['virtual_stages']:>3} {r['partition']:<10}{_exch(r):>6}"
            f"{r['step_s'] / ts:>10.3f}{r['bubble_fraction']:>8.1%}{r['peak_memory_bytes'] / ms:>10.2f}"
            f"{r['tokens_per_s']:>12.4g}{r['mfu']:>7.1%} {r.get('layer_split', 'uniform'):<8}")


def plan_table(rows: list[dict], numbered: bool = True) -> list[str]:
    """Lines of a table of plans, step and memory in the units that fit them."""
    if not rows:
        return []
    tu, ts, mu, ms = _units(rows)
    lines = [(" # " if numbered else "") + head(f"step {tu}", f"peak {mu}").rstrip()]
    for i, r in enumerate(rows, 1):
        lines.append(((f"{i:>2} " if numbered else "") + _row(r, ts, ms)).rstrip())
    return lines


def family_table(families, pick: dict | None) -> list[str]:
    """The best plan of every family (FamilyResult, or any object with family, row, proven, why and
    optionally oom), how it compares with the pick, or why the family has none."""
    rows = [f.row for f in families if f.row]
    if rows:
        tu, ts, mu, ms = _units(rows)
    else:
        tu, ts, mu, ms = "s", 1.0, "GiB", float(1 << 30)
    lines = ["   " + head(f"step {tu}", f"peak {mu}") + "  vs the pick"]
    for f in families:
        if f.row and getattr(f, "oom", False):  # compare shows a family's least-memory plan even over budget
            lines.append("   " + _row(f.row, ts, ms) + f"  {getattr(f, 'oom_label', 'OOM')}: " + (f.why or "over the budget"))
        elif f.row:
            r = f.row
            if pick is None or r is pick or r.get("_cand") == pick.get("_cand"):
                note = "the pick" if pick is not None else ""
            else:
                ratio = r["step_s"] / pick["step_s"]
                note = f"{ratio:.2f}x the step" if ratio >= 1.005 else "as fast (more memory)" \
                    if r["peak_memory_bytes"] > pick["peak_memory_bytes"] else "as fast"
            if not f.proven:
                note += " (not proven best: time limit)"
            lines.append("   " + _row(r, ts, ms) + "  " + note)
        else:
            lines.append(f"   {f.family:<17}none: {f.why}")
    return lines
