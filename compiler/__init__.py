"""The compiler: spec -> per-rank compute order (a schedule family) -> pass pipeline -> Plan."""
from __future__ import annotations

from ir import Instr, Kind, Plan, PlanSpec, SpecError
from ir.gcpause import gc_paused
from passes import lower_comm, place_grad_reduce, redistribute, spec_problems
from passes.costs import PROFILES, load_profile

from . import schedules
from .layout import build_spec
from .models import PRESETS, resolve_model

VERSION = "0.1.0"


def schedule_plan(spec: PlanSpec) -> Plan:
    """The family's per-rank compute order as a Plan (no communication yet): all the memory
    model needs, and the start of every compile."""
    family = schedules.get(spec.schedule)
    family.validate(spec)
    order = family.generate(spec)
    return Plan(spec, tuple(tuple(o) for o in order), {"compiler": f"slimpipe {VERSION}"})


@gc_paused
def compile_plan(spec: PlanSpec, profile=None, keep_pairing: bool = True) -> Plan:
    """Generate the family's compute order, lower communication, pair units for the KV exchange
    when spec.exchange is set (the CLI sets it by default for slimpipe), end each stream with OPT.

    `profile` (None = "h100", a built-in name, a .json path, or a passes.costs.DeviceProfile) is
    the device the plan is compiled for: the exchange pairing costs units with it, and when one is
    given (or the exchange runs) it is recorded in plan.meta["device_profile"] (its name) and, for
    a profile that is not a built-in one, plan.meta["device_profile_fields"], so that simulate,
    trace and plot price the plan on the same device unless told otherwise.

    `keep_pairing` (passes.exchange.redistribute): where no unit is long enough to level (a toy
    model), keep the unit-cost pairing even when the cost model has it slower than no exchange
    (the user asked for the exchange); the CLI passes False when the exchange is only on by
    default, so a default never makes a plan slower in the cost model."""
    for problem in spec_problems(spec):  # a plan the executor cannot run is not written
        raise SpecError(problem.message)
    prof = load_profile(profile) if spec.exchange or profile is not None else None
    plan = lower_comm(schedule_plan(spec))
    if spec.exchange:
        plan = redistribute(plan, prof, keep_pairing)
    if prof is not None:
        meta = {"device_profile": prof.name}
        if PROFILES.get(prof.name) != prof:
            meta["device_profile_fields"] = prof.to_json()
        plan = plan.with_ranks(plan.ranks, **meta)
    plan = place_grad_reduce(plan)  # dp > 1: each chunk's gradient all-reduce right after its last backward
    return plan.with_ranks([r + (Instr(Kind.OPT),) for r in plan.ranks])


__all__ = ["PRESETS", "VERSION", "build_spec", "compile_plan", "resolve_model", "schedule_plan", "schedules"]
