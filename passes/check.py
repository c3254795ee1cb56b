"""The plan checker: structural rules, then a replay that proves no rank can deadlock."""
from __future__ import annotations

from dataclasses import dataclass, field

from ir import Plan

from .replay import replay
from .validate import Problem, validate


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {"valid": self.ok, "problems": [{"rule": p.rule, "message": p.message} for p in self.problems]}


def check(plan: Plan) -> Report:
    problems = validate(plan)
    if not problems:
        res = replay(plan)
        if res.deadlocked:
            problems.append(Problem("deadlock", res.deadlock_message()))
    return Report(problems)
