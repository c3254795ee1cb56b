"""Baseline: the same Llama-style decoder trained with torch.distributed.pipelining on CPU/gloo.

Run under torchrun, one process per pipeline rank:
    torchrun --nproc-per-node 2 bench/torch_baseline.py --schedule 1F1B --pp 2 --microbatches 4 \
        --layers 8 --hidden 256 --heads 8 --kv-heads 4 --ffn 704 --vocab 4096 --seq-len 1024 --steps 4 --json
With --json, rank 0 prints a last stdout line {"step_s", "tokens_per_s", "loss", "peak_rss_mib", ...}.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                          ScheduleInterleaved1F1B, ScheduleLoopedBFS)

SCHEDULES = {"1F1B": Schedule1F1B, "GPipe": ScheduleGPipe,
             "Interleaved1F1B": ScheduleInterleaved1F1B, "LoopedBFS": ScheduleLoopedBFS}
MULTI = {"Interleaved1F1B", "LoopedBFS"}  # schedules that take a list of local stages


# ---------------------------------------------------------------- model pieces
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(seq: int, head_dim: int, theta: float = 10000.0):
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    ang = torch.outer(torch.arange(seq, dtype=torch.float32), inv)  # [S, d/2]
    return ang.cos(), ang.sin()


def apply_rope(x, cos, sin):
    """x: [B, h, S, d]; rotate-half form on the (first half, second half) split."""
    d2 = x.shape[-1] // 2
    x1, x2 = x[..., :d2], x[..., d2:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Block(nn.Module):
    """Pre-norm decoder layer: GQA attention with RoPE (SDPA, causal) and a SwiGLU MLP."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, ffn: int):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, hidden // heads
        self.attn_norm = RMSNorm(hidden)
        self.wq = nn.Linear(hidden, heads * self.hd, bias=False)
        self.wk = nn.Linear(hidden, kv_heads * self.hd, bias=False)
        self.wv = nn.Linear(hidden, kv_heads * self.hd, bias=False)
        self.wo = nn.Linear(heads * self.hd, hidden, bias=False)
        self.mlp_norm = RMSNorm(hidden)
        self.w_gate = nn.Linear(hidden, ffn, bias=False)
        self.w_up = nn.Linear(hidden, ffn, bias=False)
        self.w_down = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        h = self.attn_norm(x)
        q = self.wq(h).view(b, s, self.heads, self.hd).transpose(1, 2)
        k = self.wk(h).view(b, s, self.kv_heads, self.hd).transpose(1, 2)
        v = self.wv(h).view(b, s, self.kv_heads, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.heads != self.kv_heads)
        x = x + self.wo(a.transpose(1, 2).reshape(b, s, -1))
        h = self.mlp_norm(x)
        return x + self.w_down(F.silu(self.w_gate(h)) * self.w_up(h))


class StageModule(nn.Module):
    """Layers [lo, hi) of the model; stage 0 adds the embedding, the last stage norm + LM head."""

    def __init__(self, a, lo: int, hi: int, first: bool, last: bool):
        super().__init__()
        hd = a.hidden // a.heads
        self.embed = None
        if first:
            torch.manual_seed(a.seed * 1_000_003 + 1)
            self.embed = nn.Embedding(a.vocab, a.hidden)
        self.layers = nn.ModuleList()
        for i in range(lo, hi):
            torch.manual_seed(a.seed * 1_000_003 + 100 + i)  # init independent of the split
            self.layers.append(Block(a.hidden, a.heads, a.kv_heads, a.ffn))
        self.norm = self.head = None
        if last:
            torch.manual_seed(a.seed * 1_000_003 + 2)
            self.norm = RMSNorm(a.hidden)
            self.head = nn.Linear(a.hidden, a.vocab, bias=False)
        # as the executor: matrices ~ N(0, 0.02), norms 1 (so losses start near ln(vocab) on both sides)
        g = torch.Generator().manual_seed(a.seed * 1_000_003 + 7 + lo)
        with torch.no_grad():
            for name, prm in self.named_parameters():
                if prm.dim() >= 2:
                    prm.normal_(0.0, 0.02, generator=g)
        cos, sin = rope_tables(a.seq_len, hd)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x):
        if self.embed is not None:
            x = self.embed(x)
        for layer in self.layers:
            x = layer(x, self.cos, self.sin)
        if self.head is not None:
            x = self.head(self.norm(x))
        return x


def loss_fn(logits, target):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def split_layers(layers: int, stages: int) -> list[tuple[int, int]]:
    """Even split; the first (layers mod stages) stages take one more (as the slimpipe compiler)."""
    base, extra = divmod(layers, stages)
    out, lo = [], 0
    for s in range(stages):
        n = base + (1 if s < extra else 0)
        out.append((lo, lo + n))
        lo += n
    return out


def batch(a, step: int):
    """Deterministic tokens for one step: m*mbs sequences of seq_len (+1 for the shifted target)."""
    g = torch.Generator().manual_seed(a.seed * 7919 + step)
    toks = torch.randint(0, a.vocab, (a.microbatches * a.micro_batch_size, a.seq_len + 1), generator=g)
    return toks[:, :-1].contiguous(), toks[:, 1:].contiguous()


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schedule", required=True, choices=sorted(SCHEDULES))
    ap.add_argument("--pp", type=int, required=True)
    ap.add_argument("--microbatches", type=int, required=True)
    ap.add_argument("--virtual-stages", type=int, default=1)
    ap.add_argument("--micro-batch-size", type=int, default=1)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=704)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=4, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first steps (shape inference, allocator)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.schedule not in MULTI and a.virtual_stages != 1:
        ap.error(f"--schedule {a.schedule} runs one stage per rank; --virtual-stages must be 1")
    if a.hidden % a.heads or a.heads % a.kv_heads or (a.hidden // a.heads) % 2:
        ap.error("need hidden % heads == 0, heads % kv_heads == 0 and an even head dim")
    if a.layers < a.pp * a.virtual_stages:
        ap.error(f"{a.layers} layers < pp*virtual_stages={a.pp * a.virtual_stages} stages")
    return a


def main(argv=None) -> int:
    a = parse(argv)
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != a.pp:
        raise SystemExit(f"--pp {a.pp} but torchrun started {world} processes")
    n_stages = a.pp * a.virtual_stages
    bounds = split_layers(a.layers, n_stages)
    dev = torch.device("cpu")
    my_stages = [s for s in range(n_stages) if s % a.pp == rank]  # looping placement
    modules = [StageModule(a, *bounds[s], s == 0, s == n_stages - 1) for s in my_stages]
    stages = [PipelineStage(mod, s, n_stages, dev) for mod, s in zip(modules, my_stages)]
    cls = SCHEDULES[a.schedule]
    sched = cls(stages if a.schedule in MULTI else stages[0], a.microbatches, loss_fn=loss_fn)
    opt = torch.optim.AdamW([p for mod in modules for p in mod.parameters()], lr=a.lr)
    has_first = 0 in my_stages
    has_last = (n_stages - 1) in my_stages
    rss_init = rss_mib()  # after imports, gloo, model pieces: the floor every step adds to

    times, losses_per_step = [], []
    for step in range(a.warmup + a.steps):
        x, y = batch(a, step)
        dist.barrier()
        t0 = time.perf_counter()
        losses: list = []
        args = (x,) if has_first else ()
        # return_outputs=False: do not keep every micro-batch's logits until the end of the step
        sched.step(*args, target=y if has_last else None, losses=losses if has_last else None,
                   return_outputs=False)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dist.barrier()
        dt = time.perf_counter() - t0
        loss = float(torch.stack([l.detach() for l in losses]).mean()) if has_last else None
        if step >= a.warmup:
            times.append(dt)
        losses_per_step.append(loss)
        if has_last:
            print(f"[rank {rank}] step {step}{' (warmup)' if step < a.warmup else ''}: "
                  f"{dt:.3f} s  loss {loss:.4f}", flush=True)

    rec = {"rank": rank, "rss": rss_mib(), "rss_init": rss_init, "losses": losses_per_step if has_last else None}
    gathered: list = [None] * world
    dist.all_gather_object(gathered, rec)
    if rank == 0:
        last = next(g for g in gathered if g["losses"] is not None)
        step_s = statistics.median(times) if times else math.nan
        tokens = a.microbatches * a.micro_batch_size * a.seq_len
        out = {
            "impl": "torch.distributed.pipelining",
            "schedule": a.schedule,
            "pp": a.pp, "microbatches": a.microbatches, "virtual_stages": a.virtual_stages,
            "micro_batch_size": a.micro_batch_size, "seq_len": a.seq_len,
            "model": dict(layers=a.layers, hidden=a.hidden, heads=a.heads, kv_heads=a.kv_heads,
                          ffn=a.ffn, vocab=a.vocab),
            "threads_per_rank": threads,
            "step_s": step_s,
            "step_times_s": times,
            "tokens_per_s": tokens / step_s,
            "loss": last["losses"][-1],
            "losses": last["losses"],
            "peak_rss_mib": [round(g["rss"], 1) for g in sorted(gathered, key=lambda g: g["rank"])],
            "init_rss_mib": [round(g["rss_init"], 1) for g in sorted(gathered, key=lambda g: g["rank"])],
        }
        if a.json:
            print(json.dumps(out), flush=True)
        else:
            print(f"{a.schedule} p={a.pp} m={a.microbatches} v={a.virtual_stages} S={a.seq_len}: "
                  f"step {step_s:.3f} s, {out['tokens_per_s']:.0f} tok/s, peak RSS {out['peak_rss_mib']} MiB")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
