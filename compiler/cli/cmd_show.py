"""slimpipe show: the plan as a per-rank grid in the terminal."""
from __future__ import annotations

import sys

from ir import SpecError
from passes import check
from passes.grid import listing, time_grid

from .common import add_parser, load_plan, nonneg_int, positive_int


def run(args) -> int:
    if args.rank is not None and not args.list:
        raise SpecError(f"--rank {args.rank} selects a rank of --list; add --list (the grid shows every rank)")
    plan = load_plan(args.plan)
    if args.rank is not None and args.rank >= plan.spec.pp:
        raise SpecError(f"--rank {args.rank} is not a rank of {args.plan}; allowed: 0..{plan.spec.pp - 1}")
    # a plan that breaks a rule or deadlocks is drawn as far as it goes, then said so: exit 1 like check
    problems = check(plan, step=True).problems
    if args.list:
        print(listing(plan, rank=args.rank))
    else:
        marks = {(p.rank, p.index) for p in problems if p.index is not None}
        print(time_grid(plan, max_steps=args.max_steps, marks=marks))
        if marks:
            print("!: a unit that a problem below names")
    for p in problems:
        if not (p.rule == "deadlock" and not args.list):  # the grid already printed the wait cycle
            print(f"{args.plan}: {p}")
    if problems:
        print(f"{args.plan}: invalid plan ({len(problems)} problem(s)); `slimpipe check {args.plan}` lists them",
              file=sys.stderr)
    return 1 if problems else 0


def register(sub) -> None:
    p = add_parser(sub, "show", "print a plan as a per-rank time grid (or its instruction listing); a plan that breaks a "
                   "rule or deadlocks is drawn as far as it runs, its problems listed, exit 1",
                   "slimpipe show plan.json --max-steps 40")
    p.add_argument("plan")
    p.add_argument("--max-steps", type=positive_int, default=64, help="time steps to draw (default 64)")
    p.add_argument("--list", action="store_true", help="list every instruction, numbered, per rank")
    p.add_argument("--rank", type=nonneg_int, help="with --list: only this rank")
    p.set_defaults(run=run)
