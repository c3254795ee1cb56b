"""What rank 0 prints: a progress line per step, the reference-check verdict and the JSON summary."""
from __future__ import annotations

import json
import sys

from .metrics import median

TOLERANCE = 1e-4


def progress(step: int, steps: int, loss: float, secs: float, tokens: int, opts, out) -> None:
    print(f"step {step + 1}/{steps}: loss {loss:.6f}  {secs:.3f} s  {tokens / secs:,.0f} tokens/s",
          file=sys.stderr if opts.json else out, flush=True)


def reference_failed(reports: list) -> bool:
    """True if any rank's gradient error or the loss error exceeds TOLERANCE."""
    errs = [r.get("max_grad_rel_err", 0.0) for r in reports] + [r["loss_rel_err"] for r in reports if "loss_rel_err" in r]
    return max(errs) > TOLERANCE


def summarize(spec, opts, reports: list, times: list, losses: list, tokens: int, *, backend: str, transport: str,
              device, bad: bool, out, plan=None) -> dict:
    """Rank 0's summary of the run (and, with --check-reference, its verdict line); printed as
    JSON with --json."""
    step_s = median(times)
    summary = {"step_s": step_s, "tokens_per_s": tokens / step_s if step_s else 0.0, "loss": losses[-1],
               "peak_rss_mib": [r["peak_rss_mib"] for r in reports],
               "peak_activation_bytes": [r["peak_activation_bytes"] for r in reports],
               "attention_backend": backend, "schedule": spec.schedule, "pp": spec.pp,
               "steps": opts.steps, "transport": transport, "device": device.type, "dtype": opts.dtype}
    if device.type == "cuda":
        summary["cuda_max_memory_allocated"] = [r["cuda_max_memory_allocated"] for r in reports]
    if plan is not None and (opts.trace or opts.json):
        from ir import atomic_write

        from .trace import chrome_trace, kind_figures

        per_rank = [r["timed"] for r in reports]
        summary["kinds"] = kind_figures(plan, per_rank)
        if opts.trace:
            atomic_write(opts.trace, json.dumps(chrome_trace(plan, per_rank, opts.dtype), separators=(",", ":")))
            summary["trace"] = opts.trace
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
    return summary
