"""The plan checker: structural rules, then a replay that proves no rank can deadlock."""
from __future__ import annotations

from dataclasses import dataclass, field

from ir import Plan, PlanInvalidError

from .replay import replay
from .validate import Problem, validate


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {"valid": self.ok, "usable": True, "problems": [p.to_json() for p in self.problems]}


def check(plan: Plan) -> Report:
    problems = validate(plan)
    if not problems:
        res = replay(plan)
        if res.deadlocked:
            first = next(s for s in res.stuck if s.rank == res.cycle[0]) if res.cycle else res.stuck[0]
            problems.append(Problem("deadlock", res.deadlock_message(), first.rank, first.index))
    return Report(problems)


def require_valid(plan: Plan, doing: str, path: str = "plan.json", deadlock: bool = True) -> None:
    """Refuse a plan that breaks a rule (and, with `deadlock`, one that cannot finish) before
    acting on it: PlanInvalidError with one line, e.g. 'plan breaks a rule, not run: [order] ...'.
    `doing` says what was not done ('not run', 'not simulated')."""
    problems = check(plan).problems if deadlock else validate(plan)
    if problems:
        first = str(problems[0])
        if len(first) > 700:
            first = first[:700] + "..."
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise PlanInvalidError(f"plan breaks a rule, {doing}: {first}{more}; `slimpipe check {path}` lists all")
