"""slimpipe show: the plan as a per-rank grid in the terminal."""
from __future__ import annotations

from passes.grid import listing, time_grid

from .common import add_parser, load_plan, positive_int


def run(args) -> int:
    plan = load_plan(args.plan)
    if args.list:
        print(listing(plan, rank=args.rank))
    else:
        print(time_grid(plan, max_steps=args.max_steps))
    return 0


def register(sub) -> None:
    p = add_parser(sub, "show", "print a plan as a per-rank time grid (or its instruction listing)",
                   "slimpipe show plan.json --max-steps 40")
    p.add_argument("plan")
    p.add_argument("--max-steps", type=positive_int, default=64, help="time steps to draw (default 64)")
    p.add_argument("--list", action="store_true", help="list every instruction, numbered, per rank")
    p.add_argument("--rank", type=int, help="with --list: only this rank")
    p.set_defaults(run=run)
