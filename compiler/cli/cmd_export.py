"""slimpipe export: plan.json -> a torch.distributed.pipelining schedule CSV."""
from __future__ import annotations

from passes import require_valid

from ..torchcsv import export_csv, rendezvous_note, torch_order
from .common import add_parser, check_output_path, load_plan, report


def run(args) -> int:
    check_output_path(args.output, args.plan)
    plan = load_plan(args.plan)
    require_valid(plan, "not exported", args.plan, parallel=True)
    if args.comms:  # torch's runtime posts each send and receive alone: order the runs for that
        plan = torch_order(plan)
    rows = export_csv(plan, args.output, comms=args.comms)
    cells = sum(1 for row in rows for a in row if a is not None)
    fmt = "compute_comms" if args.comms else "compute_only"
    cycle = rendezvous_note(plan, rows) if args.comms else None  # what NCCL can still hang in
    code = report(args, {"output": args.output, "format": fmt, "ranks": len(rows), "actions": cells,
                         "rendezvous_cycle": cycle},
                  f"wrote {args.output}: {cells} actions on {len(rows)} ranks; load it with "
                  f"_PipelineScheduleRuntime._load_csv({args.output!r}, format={fmt!r}) or point torchtitan's "
                  f"pipeline_parallel_schedule_csv at it")
    if cycle and not args.json:
        print(f"note: torch's runtime can hang on {args.output} when sends block until their receive is posted "
              f"(NCCL, large messages), as `slimpipe check {args.output} --p2p rendezvous` says: {cycle}")
    return code


def register(sub) -> None:
    p = add_parser(sub, "export", "write a plan as a torch.distributed.pipelining schedule CSV (plans without "
                   "sequence slices or KV exchange)", "slimpipe export plan.json --format torch --comms -o schedule.csv")
    p.add_argument("plan")
    p.add_argument("--format", choices=("torch",), default="torch", help="torch (the only one): torch's _dump_csv layout")
    p.add_argument("--comms", action="store_true", help="include the plan's sends and receives (torch's "
                   "compute_comms format), each run of them ordered for torch's runtime, which posts each alone; a "
                   "wait cycle left for NCCL is named in a note; without it, compute actions only (torch lowers "
                   "them itself)")
    p.add_argument("-o", "--output", required=True, help="CSV file to write (written atomically)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(run=run)
