"""slimpipe plot: the pipeline timeline picture (needs the optional matplotlib extra)."""
from __future__ import annotations

import os

from ir import SpecError, atomic_write
from passes import require_valid

from .common import add_parser, add_render_args, check_output_path, load_plan, plan_profile, render_profile, report

FORMATS = ("png", "svg", "pdf")


def run(args) -> int:
    check_output_path(args.output, args.plan)
    fmt = os.path.splitext(args.output)[1].lstrip(".").lower()
    if fmt not in FORMATS:
        raise SpecError(f"-o {args.output!r}: unknown picture format {fmt!r}; allowed: {', '.join('.' + f for f in FORMATS)}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SpecError("plot needs matplotlib, which is not installed; run: pip install slimpipe[plot]") from None
    from passes.trace import plot_timeline

    render_profile(args)  # --unit-costs with a profile, or a bad profile: fails before the plan is read
    plan = load_plan(args.plan)
    # a timeline of a plan that breaks a rule (missing unit, unmatched send) would mislead, as
    # simulate's figures would; a deadlock is named by the replay itself
    require_valid(plan, "not drawn", args.plan, deadlock=False)
    profile = None if args.unit_costs else plan_profile(args.device_profile, plan)
    atomic_write(args.output, plot_timeline(plan, fmt, profile, unit_costs=args.unit_costs))
    return report(args, {"output": args.output, "format": fmt}, f"wrote {args.output}")


def register(sub) -> None:
    p = add_parser(sub, "plot", "draw the pipeline timeline (colour = micro-batch, shade = slice); needs slimpipe[plot]",
                   "slimpipe plot plan.json -o plan.png --unit-costs")
    add_render_args(p, "picture to write: .png, .svg or .pdf (written atomically)")
    p.set_defaults(run=run)
