"""The compiler: spec -> per-rank compute order (a schedule family) -> pass pipeline -> Plan."""
from __future__ import annotations

from ir import Instr, Kind, Plan, PlanSpec
from passes import lower_comm, redistribute

from . import schedules
from .layout import build_spec
from .models import PRESETS, resolve_model

VERSION = "0.1.0"


def compile_plan(spec: PlanSpec) -> Plan:
    """Generate the family's compute order, lower communication, pair units for the KV exchange
    when spec.exchange is set (the CLI sets it by default for slimpipe), end each stream with OPT."""
    family = schedules.get(spec.schedule)
    family.validate(spec)
    order = family.generate(spec)
    plan = Plan(spec, tuple(tuple(o) for o in order), {"compiler": f"slimpipe {VERSION}"})
    plan = lower_comm(plan)
    if spec.exchange:
        plan = redistribute(plan)
    return plan.with_ranks([r + (Instr(Kind.OPT),) for r in plan.ranks])


__all__ = ["PRESETS", "VERSION", "build_spec", "compile_plan", "resolve_model", "schedules"]
