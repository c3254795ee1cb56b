"""Run a plan: one Rank per pipeline rank, under torchrun (one process each) or in one process
(one thread each, in-process transport). Collects the step metrics and the reference check."""
from __future__ import annotations

import json
import os
import sys
import threading

import torch

from ir import SlimpipeError

from .attention import pick_backend
from .interpreter import ExecError, Rank
from .metrics import median, peak_rss_mib
from .transport import Aborted, LocalHub, init_dist

TOLERANCE = 1e-4
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def run_rank(plan, rank: int, transport, opts, out=sys.stdout) -> tuple[int, dict | None]:
    """Run opts.steps steps on one rank. Returns (exit code, summary on rank 0 else None)."""
    device = torch.device(opts.device if opts.device != "cuda" or transport.kind == "dist" else "cuda")
    if device.type == "cuda" and transport.kind == "dist":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    backend = pick_backend(opts.attention, device, DTYPES[opts.dtype])
    R = Rank(plan, rank, transport, backend, device=device, dtype=DTYPES[opts.dtype], lr=opts.lr,
             timeout=opts.timeout, check_reference=opts.check_reference)
    spec = plan.spec
    tokens = spec.microbatches * spec.micro_batch_size * spec.seq_len
    times, losses, peaks, cuda_peaks = [], [], [], []
    for step in range(opts.steps):
        st = R.run_step(step)
        rows = transport.all_gather([st["loss"], st["seconds"]])
        loss = sum(r[0] for r in rows)
        secs = max(r[1] for r in rows)
        times.append(secs)
        losses.append(loss)
        peaks.append(st["peak_activation_bytes"])
        cuda_peaks.append(st.get("cuda_max_memory_allocated", 0))
        if rank == 0 and not opts.quiet:
            print(f"step {step + 1}/{opts.steps}: loss {loss:.6f}  {secs:.3f} s  {tokens / secs:,.0f} tokens/s",
                  file=sys.stderr if opts.json else out, flush=True)
    mine = {"peak_activation_bytes": max(peaks), "peak_rss_mib": peak_rss_mib(), **R.report}
    if device.type == "cuda":
        mine["cuda_max_memory_allocated"] = max(cuda_peaks)
    reports = transport.all_gather(mine)
    bad = False
    summary = None
    if opts.check_reference:
        errs = [r.get("max_grad_rel_err", 0.0) for r in reports] + [r["loss_rel_err"] for r in reports if "loss_rel_err" in r]
        worst = max(errs)
        bad = worst > TOLERANCE
    if rank == 0:
        step_s = median(times)
        summary = {"step_s": step_s, "tokens_per_s": tokens / step_s if step_s else 0.0, "loss": losses[-1],
                   "peak_rss_mib": [r["peak_rss_mib"] for r in reports],
                   "peak_activation_bytes": [r["peak_activation_bytes"] for r in reports],
                   "attention_backend": backend.name, "schedule": spec.schedule, "pp": spec.pp,
                   "steps": opts.steps, "transport": transport.kind, "device": device.type, "dtype": opts.dtype}
        if device.type == "cuda":
            summary["cuda_max_memory_allocated"] = [r["cuda_max_memory_allocated"] for r in reports]
        if opts.check_reference:
            summary["max_grad_rel_err"] = max(r.get("max_grad_rel_err", 0.0) for r in reports)
            summary["loss_rel_err"] = max(r["loss_rel_err"] for r in reports if "loss_rel_err" in r)
            summary["ref_loss_step1"] = reports[0].get("ref_loss")
            summary["loss_step1"] = losses[0]
            verdict = "FAILED" if bad else "ok"
            print(f"reference check {verdict}: max grad rel err {summary['max_grad_rel_err']:.3e}, "
                  f"loss rel err {summary['loss_rel_err']:.3e} (tolerance {TOLERANCE:g})",
                  file=sys.stderr if opts.json else out, flush=True)
        if opts.json:
            print(json.dumps(summary), file=out, flush=True)
    return (1 if bad else 0), summary


def run_local(plan, opts) -> tuple[int, dict | None]:
    """All ranks of the plan in this process, one thread each."""
    p = plan.spec.pp
    hub = LocalHub(p, opts.timeout)
    codes: list = [None] * p
    errors: list = [None] * p
    summary: list = [None]
    if opts.device == "cpu" and opts.threads:
        torch.set_num_threads(opts.threads)

    def body(r):
        try:
            code, s = run_rank(plan, r, hub.endpoint(r), opts)
            codes[r] = code
            if r == 0:
                summary[0] = s
        except Aborted:
            codes[r] = 1
        except BaseException as e:  # noqa: BLE001 - reported below, others aborted
            codes[r] = 1
            errors[r] = e
            hub.abort(f"rank {r} failed")

    threads = [threading.Thread(target=body, args=(r,), name=f"rank{r}", daemon=True) for r in range(p)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r, e in enumerate(errors):
        if e is not None:
            if isinstance(e, SlimpipeError):
                print(f"executor: rank {r}: error: {e}", file=sys.stderr)
            else:
                raise e
    return max(codes), summary[0]


def run_dist(plan, opts) -> int:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda" if opts.device == "cuda" else "cpu")
    tp = init_dist(rank, world, device, opts.timeout)
    try:
        code, _ = run_rank(plan, rank, tp, opts)
    except ExecError as e:
        print(f"executor: rank {rank}: error: {e}", file=sys.stderr, flush=True)
        os._exit(1)  # peers may be blocked in a collective; do not wait for them
    tp.close()
    return code
