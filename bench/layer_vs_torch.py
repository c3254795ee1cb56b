"""Decoder layers, forward + backward, the executor's way vs plain autograd: one stage's worth of
layers of bench/executor_vs_torch.py's model (4 layers, hidden 256, 8 heads / 4 KV heads, SwiGLU
704, seq 1024), ours = executor.model.layer_forward with the executor's attention Function
(SDPA flash kernels, GQA), theirs = bench/torch_baseline.py's Block (what torch.distributed.
pipelining's stage runs). CPU, one thread, the two alternated, the median of --reps rounds after
two warm-up rounds (wall time: run it on a quiet machine). This is the compute under every step
of executor_vs_torch, without messages or scheduling.

    PYTHONPATH=$PWD python bench/layer_vs_torch.py [--reps 12] [--profile]
Writes bench/results/layer_vs_torch.json (--profile: prints torch.profiler's top ops of each).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import torch_baseline as TB  # noqa: E402

from bench.machine import machine  # noqa: E402
from executor import model as M  # noqa: E402
from executor.attention import SDPA, SliceAttention, default_scale  # noqa: E402

H, HEADS, KV, FFN, SEQ, LAYERS = 256, 8, 4, 704, 1024, 4


class _Unsliced:
    """The LayerCtx of a unit with one slice and no KV exchange (what Stage gives SliceAttention)."""

    backend, scale = SDPA, default_scale(H // HEADS)

    def serve(self):
        pass

    def fwd_exchanges(self):
        return []

    def bwd_exchanges(self):
        return []

    def local_blocks(self, exchanges, q_len):
        return []


def build():
    cfg = SimpleNamespace(hidden=H, head_dim=H // HEADS, heads=HEADS, kv_heads=KV, ffn=FFN, rms_eps=1e-5,
                          qk_norm=False, mlp_bias=False, rope_theta=10000.0, rope_type="default")
    P = {n: M.init_param(cfg, n, seed=0) for i in range(LAYERS) for n in M.layer_names(i)}
    cos, sin = M.rope_tables(cfg, 0, SEQ, "cpu", torch.float32)

    def ours(x):
        for i in range(LAYERS):
            x = M.layer_forward(P, i, cfg, x, cos, sin,
                                lambda q, k, v: SliceAttention.apply(q.contiguous(), k, v, _Unsliced()))
        return x

    blocks = torch.nn.ModuleList([TB.Block(H, HEADS, KV, FFN) for _ in range(LAYERS)])
    tcos, tsin = TB.rope_tables(SEQ, H // HEADS)

    def theirs(x):
        for b in blocks:
            x = b(x, tcos, tsin)
        return x

    return {"ours": ours, "theirs": theirs}


def round_trip(f, x0, dy) -> tuple[float, float]:
    x = x0.detach().requires_grad_(True)
    t0 = time.perf_counter()
    y = f(x)
    t1 = time.perf_counter()
    y.backward(dy)
    return t1 - t0, time.perf_counter() - t1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("-o", "--output", default=os.path.join(ROOT, "bench", "results", "layer_vs_torch.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    fns = build()
    x0, dy = torch.randn(1, SEQ, H), torch.randn(1, SEQ, H)
    times = {k: [] for k in fns}
    for r in range(a.reps + 2):
        for k, f in fns.items():
            t = round_trip(f, x0, dy)
            if r >= 2:
                times[k].append(t)
    out = {}
    for k, ts in times.items():
        out[k] = {"forward_ms": 1e3 * statistics.median(t[0] for t in ts),
                  "backward_ms": 1e3 * statistics.median(t[1] for t in ts),
                  "total_ms": 1e3 * statistics.median(t[0] + t[1] for t in ts)}
        print(f"{k:7s} forward {out[k]['forward_ms']:7.2f} ms  backward {out[k]['backward_ms']:7.2f} ms  "
              f"total {out[k]['total_ms']:7.2f} ms")
    ratio = out["ours"]["total_ms"] / out["theirs"]["total_ms"]
    print(f"ours / theirs: {ratio:.3f}")
    res = {"benchmark": "layer_vs_torch", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(),
           "shape": dict(layers=LAYERS, hidden=H, heads=HEADS, kv_heads=KV, ffn=FFN, seq_len=SEQ),
           "reps": a.reps, "threads": 1, "loadavg": os.getloadavg(), **out, "ratio_total": ratio}
    with open(a.output, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {a.output}")
    if a.profile:
        from torch.profiler import profile
        for k, f in fns.items():
            with profile() as p:
                for _ in range(3):
                    round_trip(f, x0, dy)
            print(k)
            print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    return 0


if __name__ == "__main__":
    sys.exit(main())
