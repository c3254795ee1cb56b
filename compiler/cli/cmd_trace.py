"""slimpipe trace: a Chrome / Perfetto trace of the simulated plan (open in ui.perfetto.dev)."""
from __future__ import annotations

import json

from ir import atomic_write
from passes import require_valid
from passes.trace import chrome_trace

from .common import add_parser, add_render_args, check_output_path, load_plan, plan_profile, render_profile, report


def run(args) -> int:
    check_output_path(args.output, args.plan)
    render_profile(args)  # --unit-costs with a profile, or a bad profile: fails before the plan is read
    plan = load_plan(args.plan)
    # a timeline of a plan that breaks a rule (missing unit, unmatched send) would mislead, as
    # simulate's figures would; a deadlock is named by the replay itself
    require_valid(plan, "not traced", args.plan, deadlock=False)
    profile = None if args.unit_costs else plan_profile(args.device_profile, plan)
    trace = chrome_trace(plan, profile, unit_costs=args.unit_costs)
    atomic_write(args.output, json.dumps(trace, separators=(",", ":")))
    n = sum(1 for e in trace["traceEvents"] if e["ph"] == "X")
    return report(args, {"output": args.output, "events": n, "ranks": plan.spec.pp},
                  f"wrote {args.output}: {n} events on {plan.spec.pp} ranks (open in https://ui.perfetto.dev)")


def register(sub) -> None:
    p = add_parser(sub, "trace", "write a Chrome/Perfetto trace of the simulated plan (a row per rank: compute, communication)",
                   "slimpipe trace plan.json -o trace.json")
    add_render_args(p, "trace file to write (written atomically)")
    p.set_defaults(run=run)
