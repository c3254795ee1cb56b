"""slimpipe check: structural rules and the deadlock proof."""
from __future__ import annotations

from ir import SlimpipeError
from passes import check
from passes.check import P2P_MODES, note_proof

from ..torchcsv import csv_cell
from .common import add_parser, emit_json, load_plan


def run(args) -> int:
    try:
        plan = load_plan(args.plan)
    except SlimpipeError as e:
        if args.json:  # scripts read stdout: say why there, too (the one-line error still goes to stderr)
            emit_json({"valid": False, "usable": False, "problems": [
                {"rule": "unreadable", "rank": getattr(e, "rank", None), "index": getattr(e, "index", None), "message": str(e)}]})
        raise
    report = check(plan, args.p2p, step=True, parallel=True)
    if report.ok:
        note_proof(plan, report)  # simulate, export and the executor need not prove these bytes again (ir.proofs)
    if args.json:
        emit_json(report.to_json())
    elif report.ok:
        how = " with blocking (rendezvous) sends" if args.p2p == "rendezvous" else ""
        print(f"{args.plan}: valid, deadlock-free{how} ({plan.num_instructions()} instructions on {plan.spec.pp} ranks)")
    else:
        for p in report.problems:
            print(f"{args.plan}: {p}{csv_cell(plan, p.rank, p.index)}")
    return 0 if report.ok else 1


def register(sub) -> None:
    p = add_parser(sub, "check", "validate a plan and prove it cannot deadlock (exit 0 valid, 1 invalid, 2 unusable); "
                   "simulate, export and the executor then use this proof for the same file bytes instead of "
                   "proving them again (kept in $SLIMPIPE_CACHE_DIR or ~/.cache/slimpipe; SLIMPIPE_NO_CACHE=1: "
                   "they always prove)",
                   "slimpipe check plan.json --json")
    p.add_argument("plan")
    p.add_argument("--json", action="store_true", help='print {"valid": bool, "usable": bool, "problems": [{"rule", "rank", "index", "message"}]} (also for an '
                   'unreadable plan: usable false, exit 2)')
    p.add_argument("--p2p", choices=P2P_MODES, default="buffered",
                   help="send semantics of the deadlock proof: buffered (default: a send never waits, as on gloo) or "
                        "rendezvous (a send may wait until its receive is posted, as NCCL does for large messages)")
    p.set_defaults(run=run)
