"""Layer split: uniform vs balanced (cost model) on the issue's two cases, h100 profile.

- llama-7b with a 128256-token vocabulary at 4K, 1f1b p=8 m=8: the LM head and loss weigh 2.3
  layers, so the uniform split's last stage is the slowest.
- llama-70b at 512K, slimpipe p=16 v=4 n=32 tp=8 (80 layers on 64 stages): attention dominates.

Per case and split: stage_layers, simulated step time, bubble, per-rank busy time (max and min).
Prints JSON; records bench/results/layer_split.json (or -o). About 25 s.

    PYTHONPATH=. python bench/layer_split.py [-o out.json]
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.machine import commit_of  # noqa: E402
from compiler import build_spec, compile_plan, resolve_model  # noqa: E402
from ir import atomic_write  # noqa: E402
from passes.costs import load_profile  # noqa: E402
from passes.simulate import simulate_timed  # noqa: E402

CASES = [
    dict(name="llama-7b-v128k-4k-1f1b", model=("llama-7b", {"vocab": 128256}), schedule="1f1b",
         kw=dict(pp=8, microbatches=8, seq_len=4096)),
    dict(name="llama-70b-512k-slimpipe", model=("llama-70b", {}), schedule="slimpipe",
         kw=dict(pp=16, microbatches=16, slices=32, virtual_stages=4, seq_len=524288, tp=8, exchange=True)),
]


OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "layer_split.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--out", default=OUT, help="where to write the record (default bench/results/layer_split.json)")
    args = ap.parse_args()
    prof = load_profile("h100")
    rows = []
    for c in CASES:
        row = {"case": c["name"], "schedule": c["schedule"], **{k: v for k, v in c["kw"].items()}}
        for split in ("uniform", "balanced"):
            spec = build_spec(c["schedule"], resolve_model(*c["model"]), layer_split_kind=split, profile=prof, **c["kw"])
            out = simulate_timed(compile_plan(spec, prof), prof)
            busy = [r["busy_s"] for r in out["ranks"]]
            row[split] = {"stage_layers": list(spec.stage_layers), "step_s": out["step_s"],
                          "bubble_fraction": out["bubble_fraction"], "busy_max_s": max(busy), "busy_min_s": min(busy)}
        row["balanced_vs_uniform"] = row["balanced"]["step_s"] / row["uniform"]["step_s"]
        rows.append(row)
        print(f"{c['name']}: uniform {row['uniform']['step_s']:.4f} s, balanced {row['balanced']['step_s']:.4f} s "
              f"({100 * (1 - row['balanced_vs_uniform']):.1f}% less)", file=sys.stderr)
    text = json.dumps({"bench": "layer_split", "device_profile": prof.name, "commit": commit_of(),
                       "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": rows}, indent=1)
    print(text)
    atomic_write(args.out, text + "\n")


if __name__ == "__main__":
    main()
