"""Terminal pictures of a plan: a per-rank time grid (unit costs) and instruction listings."""
from __future__ import annotations

from ir import Plan, to_text

from .replay import replay


def unit_label(ins, n: int, v: int) -> str:
    """'F3' / 'F3.1' / 'F3.1c0': kind, micro-batch, slice if sliced, chunk if virtual stages."""
    s = f"{ins.kind}{ins.mb}"
    if n > 1:
        s += f".{ins.slice}"
    if v > 1:
        s += f"c{ins.chunk}"
    return s


def time_grid(plan: Plan, max_steps: int = 64, marks=frozenset()) -> str:
    """One row per rank, one column per unit of time (F takes 1, B 2), '.' where a rank idles, 'X'
    where a deadlocked rank stops; a unit whose (rank, index) is in `marks` gets a '!'."""
    spec = plan.spec
    res = replay(plan, record=True)
    cells: list[dict[int, str]] = [dict() for _ in plan.ranks]
    for r, i, t0, t1 in res.timeline:
        ins = plan.ranks[r][i]
        lab = unit_label(ins, spec.slices, spec.virtual_stages) + ("!" if (r, i) in marks else "")
        cells[r][int(t0)] = lab
        for t in range(int(t0) + 1, int(t1)):
            cells[r][t] = "~"
    for st in res.stuck:  # where a rank stops for good: marked, so the picture does not look finished
        cells[st.rank][int(res.clock[st.rank])] = "X"
    steps = int(res.makespan) + (1 if res.stuck else 0)
    width = max([len(c) for row in cells for c in row.values()] + [2])
    shown = min(steps, max_steps)
    lines = [f"{spec.schedule} p={spec.pp} m={spec.microbatches} n={spec.slices} v={spec.virtual_stages}"
             f" (unit costs: F=1, B=2, I=W=1; ~ continues a backward; . idle)"]
    head = "t".ljust(7) + " ".join(str(t).ljust(width) for t in range(shown))
    lines.append(head)
    for r, row in enumerate(cells):
        lines.append(f"rank {r}".ljust(7) + " ".join(row.get(t, ".").ljust(width) for t in range(shown)))
    if steps > shown:
        lines.append(f"... {steps - shown} more time steps (--max-steps to widen)")
    if res.deadlocked:
        lines.append("X: the rank stops here and waits forever; " + res.deadlock_message())
    return "\n".join(lines)


def listing(plan: Plan, rank: int | None = None, around: int | None = None, context: int = 3) -> str:
    """Instruction streams as text, numbered; `around` marks one index with an arrow."""
    lines = []
    for r, stream in enumerate(plan.ranks):
        if rank is not None and r != rank:
            continue
        lines.append(f"rank {r}:")
        lo, hi = 0, len(stream)
        if around is not None:
            lo, hi = max(0, around - context), min(len(stream), around + context + 1)
        for i in range(lo, hi):
            mark = "->" if i == around else "  "
            lines.append(f" {mark} #{i:<5} {to_text(stream[i])}")
    return "\n".join(lines)

