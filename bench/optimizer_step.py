"""One AdamW step over a rank's parameters, three ways: torch's per-tensor loop (AdamW's default on
CPU), foreach and fused (one kernel; what executor.params.Parameters builds). The parameters are
those of a rank of bench/executor_vs_torch.py's p=2 model (8 layers, hidden 256, 8 heads / 4 KV
heads, SwiGLU 704, vocabulary 4096): rank 0 holds the embedding and 4 layers, rank 1 4 layers, the
final norm and the LM head. CPU, one thread, the three alternated over --reps rounds, the median
step (wall time: run it on a quiet machine).

    PYTHONPATH=$PWD python bench/optimizer_step.py [--reps 30]
Writes bench/results/optimizer_step.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.machine import machine  # noqa: E402
from compiler import build_spec, resolve_model  # noqa: E402
from executor.params import Parameters  # noqa: E402

MODEL = dict(layers=8, hidden=256, heads=8, kv_heads=4, ffn=704, vocab=4096)
WAYS = {"loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("-o", "--output", default=os.path.join(ROOT, "bench", "results", "optimizer_step.json"))
    a = ap.parse_args()
    if a.reps < 1:
        ap.error(f"--reps {a.reps} must be >= 1")
    torch.set_num_threads(1)
    spec = build_spec("1f1b", resolve_model("tiny").model_copy(update=MODEL), pp=2, microbatches=4, slices=1,
                      virtual_stages=1, seq_len=1024)
    out = {}
    for rank in range(2):
        flat = Parameters(spec, (rank,), "cpu", torch.float32, 1e-3).flat
        opts = {}
        for way, kw in WAYS.items():
            ps = [torch.nn.Parameter(p.detach().clone()) for p in flat]
            for p in ps:
                p.grad = torch.randn_like(p) * 1e-3
            opts[way] = torch.optim.AdamW(ps, lr=1e-3, **kw)
            opts[way].step()  # the state is made on the first step
        times = {way: [] for way in WAYS}
        for _ in range(a.reps):
            for way, opt in opts.items():
                t0 = time.perf_counter()
                opt.step()
                times[way].append(time.perf_counter() - t0)
        n = sum(p.numel() for p in flat)
        out[f"rank{rank}"] = {"parameters": n, **{f"{way}_ms": 1e3 * statistics.median(ts) for way, ts in times.items()}}
        row = out[f"rank{rank}"]
        print(f"rank {rank}: {n / 1e6:.2f}M parameters, AdamW step " + ", ".join(
            f"{way} {row[f'{way}_ms']:.2f} ms" for way in WAYS) + f"; loop / fused {row['loop_ms'] / row['fused_ms']:.2f}")
    res = {"benchmark": "optimizer_step", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(),
           "model": MODEL, "reps": a.reps, "threads": 1, "loadavg": os.getloadavg(), **out}
    with open(a.output, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
