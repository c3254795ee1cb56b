"""Every schedule torch.distributed.pipelining ships, written by torch's own generators, through
slimpipe: does it import, check (buffered and rendezvous sends, with torch's receive deferral and
without), what our replay and torch's `_simulate_comms_compute` count, and our unit-cost figures.
No timings: a record of verdicts and step counts (bench/results/torch_schedules.json).

    PYTHONPATH=. python bench/torch_schedules.py [--pp 2,4,8] [--microbatches 8]
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch.distributed.pipelining import schedules as TS  # noqa: E402
from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops  # noqa: E402

from compiler.torchcsv import from_rows  # noqa: E402
from ir import SlimpipeError, atomic_write  # noqa: E402
from ir.torchfmt import parse_rows, read_rows  # noqa: E402
from passes import check, simulate_units  # noqa: E402
from passes.replay import replay  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "torch_schedules.json")
SCHEDULES = [("GPipe", 1), ("1F1B", 1), ("Interleaved1F1B", 2), ("LoopedBFS", 2), ("InterleavedZeroBubble", 2),
             ("ZBVZeroBubble", 2), ("DualPipeV", 2)]
NOTES = ("UNSHARD", "RESHARD", "REDUCE_GRAD")


def ops(name, p, m, v, comms=False, defer=False):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_schedule_ops(name, p, m, v, with_comms=comms, defer_pp_recv=defer)


def text(rows):
    buf = io.StringIO()
    w = csv.writer(buf)
    for row in rows:
        w.writerow(["" if a is None else str(a) for a in row])
    return buf.getvalue()


def torch_steps(rows, stages):
    order = {r: [a for a in row if a is not None and a.computation_type.value not in NOTES] for r, row in enumerate(rows)}
    owner = {a.stage_index: r for r, row in order.items() for a in row}
    try:
        sim = TS._simulate_comms_compute(order, lambda s: owner[s], stages)
    except Exception as e:  # noqa: BLE001 - torch's simulator refuses some actions: recorded as such
        return None, f"{type(e).__name__}: {e}"
    return max(len(x) for x in sim.values()), None


def verdict(plan, mode):
    rep = check(plan, mode)
    return "valid" if rep.ok else f"[{rep.problems[0].rule}] {rep.problems[0].message[:200]}"


def one(name, p, m, v, fmt, defer=False):
    row = {"schedule": name, "pp": p, "microbatches": m, "virtual_stages": v, "format": fmt, "defer_pp_recv": defer}
    try:
        rows = ops(name, p, m, v, comms=fmt == "compute_comms", defer=defer)
    except Exception as e:  # noqa: BLE001 - torch cannot write this one (e.g. comms for single-stage classes)
        row["torch_writes_it"] = f"no: {type(e).__name__}"
        return row
    try:
        plan = from_rows(parse_rows(read_rows(text(rows))))
    except SlimpipeError as e:
        row["imports"] = f"no: {e}"
        return row
    row["imports"] = "yes"
    row["check"] = verdict(plan, "buffered")
    row["check_rendezvous"] = verdict(plan, "rendezvous")
    if row["check"] == "valid":
        sim = simulate_units(plan)
        row["unit_cost_makespan"] = sim["makespan"]
        row["unit_cost_bubble"] = round(sim["bubble_fraction"], 6)
        row["every_action_one_step"] = replay(plan, cost=lambda r, i: 1.0, comm_cost=1.0).makespan
        if fmt == "compute_comms":
            row["torch_simulator_steps"], why = torch_steps(rows, p * v)
            if why:
                row["torch_simulator_refuses"] = why
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pp", default="2,4,8")
    ap.add_argument("--microbatches", type=int, default=8)
    args = ap.parse_args(argv)
    out = []
    for p in (int(x) for x in args.pp.split(",")):
        for name, v in SCHEDULES:
            m = max(args.microbatches, 2 * p) if name == "DualPipeV" else args.microbatches
            for fmt in ("compute_only", "compute_comms"):
                out.append(one(name, p, m, v, fmt))
            if name in ("Interleaved1F1B", "LoopedBFS"):
                out.append(one(name, p, m, v, "compute_comms", defer=True))
    atomic_write(OUT, json.dumps({"torch_schedules": out}, indent=1) + "\n")
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
