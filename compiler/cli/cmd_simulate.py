"""slimpipe simulate: replay a plan on virtual clocks."""
from __future__ import annotations

from ir import PlanInvalidError, SpecError
from passes import simulate_units, validate

from .common import add_parser, emit_json, load_plan


def run(args) -> int:
    plan = load_plan(args.plan)
    if not args.unit_costs:
        raise SpecError("timed simulation needs the cost model; pass --unit-costs (forward 1, backward 2, communication free)")
    out = simulate_units(plan)  # a deadlock raises PlanInvalidError naming the wait cycle
    problems = validate(plan, max_problems=1)
    if problems:  # figures of a plan that breaks a rule (missing unit, unmatched send) would mislead
        raise PlanInvalidError(f"plan breaks a rule, not simulated: {problems[0]} (slimpipe check lists all)")
    if args.json:
        emit_json(out)
    else:
        print(f"makespan {out['makespan']:g} units, bubble {out['bubble_fraction']:.4%}")
        for r in out["ranks"]:
            print(f"  rank {r['rank']}: busy {r['busy']:g}, peak units in flight {r['peak_units']}")
    return 0


def register(sub) -> None:
    p = add_parser(sub, "simulate", "simulate a plan: makespan, bubble, per-rank figures",
                   "slimpipe simulate plan.json --unit-costs --json")
    p.add_argument("plan")
    p.add_argument("--unit-costs", action="store_true", help="forward 1, backward 2, communication free")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)
