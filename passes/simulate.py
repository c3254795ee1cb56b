"""Unit-cost simulation (forward 1, backward 2, communication free) and in-flight peaks."""
from __future__ import annotations

from ir import Kind, Plan, PlanInvalidError

from .replay import replay


def peak_units(stream) -> int:
    """Most forward units on the rank whose backward has not finished (program order)."""
    cur = peak = 0
    F, B = Kind.F, Kind.B
    for ins in stream:
        k = ins.kind
        if k == F:
            cur += 1
            if cur > peak:
                peak = cur
        elif k == B:
            cur -= 1
    return peak


def bubble_fraction(busy: list[float], makespan: float) -> float:
    """1 - sum(busy) / (p * makespan)."""
    if makespan <= 0:
        return 0.0
    return 1.0 - sum(busy) / (len(busy) * makespan)


def simulate_units(plan: Plan) -> dict:
    res = replay(plan)
    if res.deadlocked:
        raise PlanInvalidError(res.deadlock_message())
    makespan = res.makespan
    return {
        "makespan": makespan,
        "bubble_fraction": bubble_fraction(res.busy, makespan),
        "ranks": [{"rank": r, "busy": res.busy[r], "peak_units": peak_units(s)} for r, s in enumerate(plan.ranks)],
    }
