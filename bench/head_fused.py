"""The executor's loss head, forward + backward of one unit, three ways: fused (the gradients made
in the forward, the logits once: what the executor's last stage runs when a unit's backward is one
B), recompute (h and the lse kept, logits made again in backward: the split backward's I, and the
executor before) and plain autograd (F.cross_entropy, what torch.distributed.pipelining's stage
runs; it keeps [tokens, V] fp32 log-probabilities). CPU, one thread, fastest of --reps of each
(thread CPU time, so other processes on the machine do not count).

    PYTHONPATH=$PWD python bench/head_fused.py [--reps 8]
Writes bench/results/head_fused.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.machine import machine  # noqa: E402
from executor import model as M  # noqa: E402

SHAPES = [  # (tokens, hidden, vocab): bench/executor_vs_torch.py's model; a 32K vocabulary
    (1024, 256, 4096),
    (1024, 512, 32000),
]


def one(way: str, tokens: int, H: int, V: int, g) -> tuple[float, float]:
    x = (torch.randn(1, tokens, H, generator=g)).requires_grad_(True)
    P = {"norm": torch.ones(H, requires_grad=True), "lm_head": (torch.randn(V, H, generator=g) * 0.02).requires_grad_(True)}
    labels = torch.randint(V, (1, tokens), generator=g)
    c0 = time.thread_time()
    if way == "autograd":
        h = M.rmsnorm_reference(x, P["norm"])
        loss = F.cross_entropy((h @ P["lm_head"].t()).reshape(-1, V), labels.reshape(-1), reduction="sum") / tokens
    else:
        loss = M.head_loss(P, x, labels, float(tokens), fuse=way == "fused")
    c1 = time.thread_time()
    loss.backward()
    c2 = time.thread_time()
    return c1 - c0, c2 - c1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=8)
    a = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    rows = []
    for tokens, H, V in SHAPES:
        row = {"tokens": tokens, "hidden": H, "vocab": V}
        for way in ("fused", "recompute", "autograd", "fused", "recompute", "autograd"):  # twice, interleaved
            runs = [one(way, tokens, H, V, g) for _ in range(a.reps + 1)][1:]
            f, b = min(r[0] for r in runs), min(r[1] for r in runs)
            best = row.get(way)
            if best is None or f + b < best["forward_s"] + best["backward_s"]:
                row[way] = {"forward_s": f, "backward_s": b, "total_s": f + b}
        row["fused_vs_recompute"] = row["fused"]["total_s"] / row["recompute"]["total_s"]
        row["fused_vs_autograd"] = row["fused"]["total_s"] / row["autograd"]["total_s"]
        rows.append(row)
        print(f"{tokens} tokens, H {H}, V {V}: " + ", ".join(
            f"{w} {row[w]['forward_s'] * 1e3:.1f} + {row[w]['backward_s'] * 1e3:.1f} ms" for w in ("fused", "recompute", "autograd"))
            + f"; fused / recompute {row['fused_vs_recompute']:.3f}, fused / autograd {row['fused_vs_autograd']:.3f}",
            file=sys.stderr)
    out = {"benchmark": "head_fused", "machine": machine(), "threads": 1, "reps": a.reps,
           "method": "fastest of reps by thread CPU time; each way measured twice, interleaved; the better kept",
           "rows": rows}
    path = os.path.join(ROOT, "bench", "results", "head_fused.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(json.dumps({"rows": [{k: v for k, v in r.items() if "_vs_" in k or k in ("vocab",)} for r in rows]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
