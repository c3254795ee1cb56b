"""Compile speed: slimpipe vs torch.distributed.pipelining, interleaved 1F1B.

torch: schedule generation (_schedule_visualizer.get_schedule_ops, compute actions only) +
send/recv lowering (schedules._add_send_recv) + dry run (schedules._simulate_comms_compute).
slimpipe: compiler.compile_plan (generation + lowering) + passes.check (rules + deadlock proof)
+ passes.simulate_units (unit-cost replay).
Instructions = compute + communication actions after lowering (ours also count one OPT per rank).
torch runs at the target size when it fits in --torch-budget seconds; otherwise at the largest m
(a multiple of p) that does, and its rate there is what is compared (stated in the JSON).

    PYTHONPATH=. python bench/compile_vs_torch.py [--pp 32 --microbatches 128 --virtual-stages 4]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.machine import machine  # noqa: E402
from compiler import build_spec, compile_plan, resolve_model  # noqa: E402
from ir import atomic_write  # noqa: E402
from passes import check, simulate_units  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "compile_vs_torch.json")


def ours(p: int, m: int, v: int, repeats: int = 3) -> dict:
    model = resolve_model("tiny", {"layers": p * v})
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        plan = compile_plan(build_spec("interleaved-1f1b", model, pp=p, microbatches=m, virtual_stages=v, seq_len=128))
        t1 = time.perf_counter()
        rep = check(plan)
        t2 = time.perf_counter()
        sim = simulate_units(plan)
        t3 = time.perf_counter()
        assert rep.ok, rep.problems[:3]
        run = {"compile_s": t1 - t0, "check_s": t2 - t1, "simulate_s": t3 - t2, "total_s": t3 - t0,
               "instructions": plan.num_instructions(), "makespan_units": sim["makespan"]}
        if best is None or run["total_s"] < best["total_s"]:
            best = run
    best["instr_per_s"] = best["instructions"] / best["total_s"]
    return best


def torch_side(p: int, m: int, v: int) -> dict:
    from torch.distributed.pipelining import schedules as S
    from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops

    t0 = time.perf_counter()
    ops = get_schedule_ops("Interleaved1F1B", p, m, num_stages_per_rank=v)
    t1 = time.perf_counter()
    compute = {r: [a for a in acts if a is not None] for r, acts in enumerate(ops)}
    stage_to_rank = lambda s: s % p  # noqa: E731  (torch's looping placement)
    with_comms = S._add_send_recv(compute, stage_to_rank=stage_to_rank, num_stages=p * v)
    t2 = time.perf_counter()
    n = sum(len(a) for a in with_comms.values())
    sim = S._simulate_comms_compute(with_comms, stage_to_rank=stage_to_rank, num_stages=p * v)
    t3 = time.perf_counter()
    steps = max(len(a) for a in sim.values())
    return {"generate_s": t1 - t0, "lower_s": t2 - t1, "dry_run_s": t3 - t2, "total_s": t3 - t0,
            "instructions": n, "dry_run_steps": steps, "instr_per_s": n / (t3 - t0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pp", type=int, default=32)
    ap.add_argument("--microbatches", type=int, default=128)
    ap.add_argument("--virtual-stages", type=int, default=4)
    ap.add_argument("--torch-budget", type=float, default=120.0, help="seconds torch may take at one size")
    ap.add_argument("--repeats", type=int, default=3, help="alternated runs at the compared size (best kept)")
    ap.add_argument("--out", default=OUT)
    a = ap.parse_args()
    p, m, v = a.pp, a.microbatches, a.virtual_stages
    import torch
    torch_runs = []
    # grow m (multiples of p) until the target or until the next size would likely pass the budget
    mm = p
    while True:
        r = torch_side(p, mm, v)
        r["microbatches"] = mm
        torch_runs.append(r)
        print(f"torch m={mm}: {r['instructions']} instructions in {r['total_s']:.2f} s", file=sys.stderr, flush=True)
        if mm >= m:
            break
        nxt = min(m, mm * 2)
        growth = (nxt / mm) ** 2  # the dry run rescans lists: assume quadratic when projecting
        if r["total_s"] * growth > a.torch_budget:
            break
        mm = nxt
    # the machine may be shared: alternate the two sides at the compared size, keep each one's best
    t = torch_runs[-1]
    o = ours(p, m, v)
    for _ in range(a.repeats - 1):
        r = torch_side(p, t["microbatches"], v)
        r["microbatches"] = t["microbatches"]
        if r["total_s"] < t["total_s"]:
            t = r
        r = ours(p, m, v, repeats=1)
        if r["total_s"] < o["total_s"]:
            o = r
    o_same = ours(p, t["microbatches"], v) if t["microbatches"] != m else o
    res = {
        "benchmark": "compile_vs_torch", "schedule": "interleaved 1F1B", "pp": p, "microbatches": m, "virtual_stages": v,
        "slimpipe": o,
        "slimpipe_at_torch_size": o_same,
        "torch": t,
        "torch_runs": torch_runs,
        "torch_at_target_size": t["microbatches"] == m,
        "ratio_instr_per_s": o["instr_per_s"] / t["instr_per_s"],
        "ratio_same_size": o_same["instr_per_s"] / t["instr_per_s"],
        "target_ratio": 5.0,
        "note": ("torch measured at the target size" if t["microbatches"] == m else
                 f"torch measured at m={t['microbatches']} (the target m={m} would exceed the "
                 f"{a.torch_budget:.0f} s budget); ratio_instr_per_s compares our target-size rate with torch's "
                 f"rate at its largest size, ratio_same_size compares both at that size"),
        "timing": f"best of {a.repeats} alternated runs per side (ours: best of 3 within the first)",
        "machine": machine(), "torch_version": torch.__version__, "load_avg_at_end": os.getloadavg(),
    }
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    atomic_write(a.out, json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
