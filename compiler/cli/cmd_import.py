"""slimpipe import: a torch.distributed.pipelining schedule CSV -> plan.json."""
from __future__ import annotations

from collections import Counter

from passes import require_valid

from ..torchcsv import import_csv
from .cmd_compile import add_model_args, model_from_args
from .common import add_parser, add_plan_format_arg, check_output_path, report, save_plan


def run(args) -> int:
    check_output_path(args.output, args.plan)
    model, seq = model_from_args(args)  # default tiny: a schedule of more stages than its layers is refused
    plan = import_csv(args.plan, model, seq)
    require_valid(plan, "not imported", args.plan, parallel=True)
    save_plan(plan, args.output, args.plan_format)
    spec, meta = plan.spec, plan.meta["torch"]
    kept = Counter(n[3].lstrip("0123456789") or "idle" for n in meta["annotations"])
    how = ("its own communication kept in order" if meta["format"] == "compute_comms"
           else "communication lowered by slimpipe")
    notes = ", ".join(f"{k} {v}" for k, v in sorted(kept.items()))
    return report(args, {"output": args.output, "pp": spec.pp, "microbatches": spec.microbatches,
                         "virtual_stages": spec.virtual_stages, "placement": [list(x) for x in spec.placement],
                         "format": meta["format"], "annotations": dict(kept), "overlap_f_b": len(meta["overlap"]),
                         "instructions": plan.num_instructions()},
                  f"wrote {args.output}: p={spec.pp} m={spec.microbatches} v={spec.virtual_stages}, placement "
                  f"{[list(x) for x in spec.placement]}, {how}, {plan.num_instructions()} instructions"
                  + (f"; kept as annotations: {notes}" if notes else "")
                  + (f"; {len(meta['overlap'])} OVERLAP_F_B split in two" if meta["overlap"] else ""))


def register(sub) -> None:
    p = add_parser(sub, "import", "read a torch.distributed.pipelining schedule CSV into a plan (p, m, stages and "
                   "placement from the file; refused if it breaks a rule)",
                   "slimpipe import schedule.csv -o plan.json --model llama-7b --seq-len 4096")
    p.add_argument("plan", metavar="schedule.csv", help="CSV file: one row per rank, one action per cell (torch's _dump_csv format)")
    p.add_argument("-o", "--output", required=True, help="plan file to write (written atomically)")
    add_plan_format_arg(p)
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(run=run)
