"""Executor benchmark: a p-rank slimpipe plan run in one process (in-process transport, one
thread per rank, all on one device) beside the unsliced single-process model on the same tokens.

Default: a ~1B Llama-style model (16 layers, hidden 2048, 16 heads, 8 KV heads, ffn 5632, vocab
32000) at 32K context, p=4, bf16, CUDA, flash-attn when importable (else torch SDPA).
Prints one JSON object and writes it to bench/results/gpu_executor-<device>-<time>.json.

    python bench/gpu_executor.py                                  # the H100 run
    python bench/gpu_executor.py --tiny --device cpu --dtype fp32 # a CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from compiler import compile_plan  # noqa: E402
from compiler.layout import build_spec  # noqa: E402
from ir import ModelConfig  # noqa: E402
from executor import model as M  # noqa: E402
from executor.attention import pick_backend  # noqa: E402
from executor.cli import options as executor_options  # noqa: E402
from executor.runner import DTYPES, run_local  # noqa: E402

BIG = dict(layers=16, hidden=2048, heads=16, kv_heads=8, ffn=5632, vocab=32000, seq_len=32768)
TINY = dict(layers=8, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=256, seq_len=256)


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny dims (CPU smoke test)")
    for k in BIG:
        p.add_argument("--" + k.replace("_", "-"), type=int)
    p.add_argument("--pp", type=int, default=4)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--slices", type=int, default=8)
    p.add_argument("--virtual-stages", type=int, default=1)
    p.add_argument("--no-exchange", action="store_true", help="plan without the KV exchange")
    p.add_argument("--steps", type=int, default=3, help="steps (the first is warm-up; median of the rest)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--attention", choices=["auto", "sdpa", "flash", "math"], default="auto")
    p.add_argument("--skip-baseline", action="store_true", help="do not run the unsliced model")
    p.add_argument("--out", help="result file (default bench/results/gpu_executor-<device>-<time>.json)")
    return p.parse_args()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def baseline(spec, device, dtype, steps):
    """The unsliced, unpipelined model: per micro-batch forward + backward (gradient accumulation),
    AdamW step; same tokens as the pipeline. Returns step seconds (median) and peak memory."""
    cfg = spec.model
    names = M.all_param_names(spec)
    P = {n: M.init_param(cfg, n, spec.seed, device, dtype) for n in names}
    opt = torch.optim.AdamW(list(P.values()), lr=1e-4)
    cos, sin = M.rope_tables(cfg.head_dim, 0, spec.seq_len, device, dtype)
    denom = spec.micro_batch_size * spec.seq_len * spec.microbatches
    times, loss_total = [], 0.0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(steps):
        sync(device)
        t0 = time.perf_counter()
        loss_total = 0.0
        for mb in range(spec.microbatches):
            tok = M.batch_tokens(spec, step, mb, device)
            x = P["embed"][tok[:, :-1]]
            for i in range(cfg.layers):
                x = M.layer_forward(P, i, cfg, x, cos, sin, M.full_causal)
            loss = M.head_loss(P, x, tok[:, 1:], denom)
            loss.backward()
            loss_total += float(loss.detach())
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t0)
    out = {"step_s": sorted(times[1:] or times)[len(times[1:] or times) // 2], "loss_last": loss_total}
    if device.type == "cuda":
        out["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated(device)
    del P, opt
    return out


def main():
    a = parse()
    dims = dict(TINY if a.tiny else BIG)
    for k in dims:
        if getattr(a, k) is not None:
            dims[k] = getattr(a, k)
    seq = dims.pop("seq_len")
    cfg = ModelConfig(name="bench", **dims)
    spec = build_spec("slimpipe", cfg, pp=a.pp, microbatches=a.microbatches, slices=a.slices,
                      virtual_stages=a.virtual_stages, seq_len=seq, exchange=not a.no_exchange)
    plan = compile_plan(spec)
    device = torch.device(a.device)
    dtype = DTYPES[a.dtype]
    tokens = spec.microbatches * spec.micro_batch_size * seq
    opts = executor_options(steps=a.steps, attention=a.attention, device=device.type, dtype=a.dtype, lr=1e-4,
                            timeout=1800.0, threads=0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    code, s = run_local(plan, opts)
    if code != 0 or s is None:
        sys.exit("pipeline run failed")
    res = {
        "bench": "gpu_executor", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": a.dtype, "model": {**dims, "seq_len": seq}, "pp": a.pp, "microbatches": a.microbatches,
        "slices": a.slices, "virtual_stages": a.virtual_stages, "exchanges": plan.meta.get("exchanges", 0),
        "attention_backend": pick_backend(a.attention, device, dtype).name, "steps": a.steps,
        "pipeline": {"transport": "in-process (one thread per rank, one device)", "step_s": s["step_s"],
                     "tokens_per_s": s["tokens_per_s"], "loss_last": s["loss"],
                     "peak_activation_bytes_per_rank": s["peak_activation_bytes"]},
        "tokens_per_step": tokens,
    }
    if device.type == "cuda":
        res["pipeline"]["cuda_max_memory_allocated_all_ranks"] = torch.cuda.max_memory_allocated(device)
    if not a.skip_baseline:
        b = baseline(spec, device, dtype, a.steps)
        b["tokens_per_s"] = tokens / b["step_s"]
        res["unsliced_single_process"] = b
    res["note"] = ("step_s of the pipeline is the median over steps of the slowest rank; with the in-process "
                   "transport all p ranks share one device, so its time is ~p x a real p-GPU step and its CUDA "
                   "peak is the sum over ranks")
    line = json.dumps(res)
    print(line, flush=True)
    out = a.out or os.path.join(ROOT, "bench", "results",
                                f"gpu_executor-{device.type}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(line + "\n")


if __name__ == "__main__":
    main()
