"""What rank 0 prints: a progress line per step, the reference-check verdict and the JSON summary."""
from __future__ import annotations

import json
import sys

from .metrics import median
from .reference import DTYPE_FACTOR, TOLERANCE, loss_tolerance


class Progress:
    """Rank 0's view of the run: a tqdm bar (step, loss, tokens/s, memory) on a terminal, one line
    per step otherwise (logs); with --metrics, one JSON object per step appended to that file."""

    def __init__(self, opts, first: int, tokens: int, out):
        self.opts, self.tokens, self.out = opts, tokens, out
        self.stream = sys.stderr if opts.json else out
        self.bar = None
        if not opts.quiet and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=opts.steps, initial=first, desc="train", unit="step", file=self.stream,
                            dynamic_ncols=True)
        self.log = open(opts.metrics, "a") if getattr(opts, "metrics", None) else None

    def update(self, step: int, loss: float, secs: float, mem_mib: float, **extra) -> None:
        tps = self.tokens / secs if secs else 0.0
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f}  {tps:,.0f} tok/s  mem {mem_mib:,.0f} MiB", refresh=False)
            self.bar.update(1)
        elif not self.opts.quiet:
            print(f"step {step + 1}/{self.opts.steps}: loss {loss:.6f}  {secs:.3f} s  {tps:,.0f} tokens/s  "
                  f"mem {mem_mib:,.0f} MiB", file=self.stream, flush=True)
        if self.log is not None:
            row = {"step": step + 1, "loss": loss, "step_s": secs, "tokens_per_s": tps, "peak_mem_mib": mem_mib}
            row.update({k: v for k, v in extra.items() if v is not None})
            self.log.write(json.dumps(row) + "\n")
            self.log.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.log is not None:
            self.log.close()


def reference_failed(reports: list) -> bool:
    """True if any rank's gradient error or the loss error exceeds its tolerance (TOLERANCE in
    fp32; in low precision what reference.py derives from the dtype)."""
    return any(r.get("max_grad_rel_err", 0.0) > r.get("grad_tolerance", TOLERANCE)
               or ("loss_rel_err" in r and r["loss_rel_err"] > loss_tolerance(r)) for r in reports)


def summarize(spec, opts, reports: list, times: list, losses: list, tokens: int, *, backend: str, transport: str,
              device, bad: bool, out, plan=None) -> dict:
    """Rank 0's summary of the run (and, with --check-reference, its verdict line); printed as
    JSON with --json."""
    step_s = median(times)
    summary = {"step_s": step_s, "tokens_per_s": tokens / step_s if step_s else 0.0, "loss": losses[-1],
               "peak_rss_mib": [r["peak_rss_mib"] for r in reports],
               "peak_activation_bytes": [r["peak_activation_bytes"] for r in reports],
               "attention_backend": backend, "schedule": spec.schedule, "pp": spec.pp, "dp": len(reports) // spec.pp,
               "steps": opts.steps, "transport": transport, "device": device.type, "dtype": opts.dtype}
    if device.type == "cuda":
        summary["cuda_max_memory_allocated"] = [r["cuda_max_memory_allocated"] for r in reports]
    if plan is not None and (opts.trace or opts.json):
        from ir import atomic_write

        from .trace import chrome_trace, kind_figures

        per_rank = [r["timed"] for r in reports[:spec.pp]]  # the plan's ranks (data-parallel replica 0)
        summary["kinds"] = kind_figures(plan, per_rank)
        if opts.trace:
            atomic_write(opts.trace, json.dumps(chrome_trace(plan, per_rank, opts.dtype), separators=(",", ":")))
            summary["trace"] = opts.trace
    if opts.check_reference:
        summary["max_grad_rel_err"] = max(r.get("max_grad_rel_err", 0.0) for r in reports)
        summary["loss_rel_err"] = max(r["loss_rel_err"] for r in reports if "loss_rel_err" in r)
        summary["ref_loss_step1"] = reports[0].get("ref_loss")
        summary["loss_step1"] = losses[0]
        summary["grad_tolerance"] = min(r.get("grad_tolerance", TOLERANCE) for r in reports)
        summary["loss_tolerance"] = min(loss_tolerance(r) for r in reports if "loss_rel_err" in r)
        low = [r["dtype_ref_grad_rel_err"] for r in reports if "dtype_ref_grad_rel_err" in r]
        if low:
            summary["dtype_ref_grad_rel_err"] = max(low)
            what = "bf16 autocast" if getattr(opts, "autocast", False) else opts.dtype
            bound = (f"tolerance {summary['grad_tolerance']:.3g} (grad) and {summary['loss_tolerance']:.3g} (loss): "
                     f"{TOLERANCE:g} + {DTYPE_FACTOR:g}x what {what} itself costs the unsliced model")
        else:
            bound = f"tolerance {TOLERANCE:g}"
        verdict = "FAILED" if bad else "ok"
        print(f"reference check {verdict}: max grad rel err {summary['max_grad_rel_err']:.3e}, "
              f"loss rel err {summary['loss_rel_err']:.3e} ({bound})",
              file=sys.stderr if opts.json else out, flush=True)
    if opts.json:
        print(json.dumps(summary), file=out, flush=True)
    return summary
