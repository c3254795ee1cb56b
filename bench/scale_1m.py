"""Scale: compile + check + unit-simulate slimpipe p=32 m=32 n=64 v=4 (over a million
instructions), then ir.save + ir.load of the plan. Prints JSON, writes bench/results/scale_1m.json.

    PYTHONPATH=. python bench/scale_1m.py
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ir  # noqa: E402
from bench.machine import machine  # noqa: E402
from compiler import build_spec, compile_plan, resolve_model  # noqa: E402
from passes import check, simulate_units  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "scale_1m.json")


def main() -> None:
    p, m, n, v = 32, 32, 64, 4
    model = resolve_model("tiny", {"layers": p * v})
    phases = {}
    t = time.perf_counter()
    spec = build_spec("slimpipe", model, pp=p, microbatches=m, slices=n, virtual_stages=v, seq_len=n * 4)
    plan = compile_plan(spec)
    phases["compile_s"] = time.perf_counter() - t
    count = plan.num_instructions()
    t = time.perf_counter()
    rep = check(plan)
    phases["check_s"] = time.perf_counter() - t
    assert rep.ok, rep.problems[:3]
    t = time.perf_counter()
    sim = simulate_units(plan)
    phases["simulate_s"] = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "plan.json")
        t = time.perf_counter()
        ir.save(plan, path)
        phases["save_s"] = time.perf_counter() - t
        size = os.path.getsize(path)
        t = time.perf_counter()
        back = ir.load(path)
        phases["load_s"] = time.perf_counter() - t
    assert back.ranks == plan.ranks
    expect = (p - 1) / (v * m * n + p - 1)
    res = {
        "benchmark": "scale_1m", "schedule": "slimpipe", "pp": p, "microbatches": m, "slices": n, "virtual_stages": v,
        "instructions": count, **{k: round(x, 4) for k, x in phases.items()},
        "compile_check_simulate_s": round(phases["compile_s"] + phases["check_s"] + phases["simulate_s"], 4),
        "instr_per_s_compile_check_simulate": round(count / (phases["compile_s"] + phases["check_s"] + phases["simulate_s"])),
        "plan_bytes": size,
        "bubble_fraction": sim["bubble_fraction"], "bubble_closed_form": expect,
        "rank0_peak_units": sim["ranks"][0]["peak_units"], "rank0_peak_closed_form": min(n * v + 2 * (p - 1), m * n * v),
        "machine": machine(), "load_avg_at_end": os.getloadavg(),
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    ir.atomic_write(OUT, json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
