"""The reference check: the unsliced, unpipelined model on the same batch, compared with what the
pipelined step computed on this rank. With --hf-model the reference is transformers' own model
loaded from the checkpoint (executor/hf.py), not ours.

The reference runs in fp32, and in fp32 the pipelined step must agree within TOLERANCE (1e-4). A
low-precision step cannot: bf16 rounding alone moves the tiny model's gradients by about 2e-2, as
much as some real bugs. So in bf16/fp16 (--dtype, or --autocast) the bound comes from the dtype,
measured on this model and batch: the same unsliced reference runs again in that precision, its
own error against fp32 is what the precision costs, and the pipelined step may be off by at most
DTYPE_FACTOR times that, plus TOLERANCE. Correct plans land at 1.0-1.2x of it (gpipe..slimpipe,
p=1/2, bf16 and fp16, tests/test_reference_dtype.py); a wrong plan lands far above."""
from __future__ import annotations

import contextlib

import torch

from . import model as M

TOLERANCE = 1e-4
DTYPE_FACTOR = 2.0


def _rel(got, ref) -> float:
    return float((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def _reference(spec, gspec, step, device, gbatch, hf_model, dtype, autocast) -> tuple[float, dict]:
    """(step loss, {parameter name: gradient}) of the unsliced model with parameters in `dtype`
    (under bf16 autocast when `autocast`)."""
    amp = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    if hf_model is not None:
        from .hf import reference

        with amp:
            return reference(hf_model, gspec, gbatch, device, dtype)
    names = M.all_param_names(spec)
    P = {n: M.init_param(spec.model, n, spec.seed, device, dtype) for n in names}
    with amp:
        loss = M.reference_loss(gspec, P, step, device, gbatch)
    loss.backward()
    return float(loss.detach()), {n: P[n].grad for n in names}


def reference_check(spec, chunks, step: int, device, batch=None, hf_model: str | None = None,
                    replicas: int = 1, dtype=torch.float32, autocast: bool = False) -> dict:
    """Relative errors of each of this rank's parameter gradients (`chunks`: {name: Parameter}
    dicts, already averaged over the data-parallel replicas) against the fp32 reference on the
    global batch, the reference loss (the runner compares it with the step's loss: loss_rel_err)
    and the tolerances both are held to: grad_tolerance, and for a low-precision step
    dtype_ref_grad_rel_err (what the precision costs the reference) and ref_loss_low_precision
    (the reference's loss in it). batch(mb, replica) gives a replica's micro-batch of the step
    (default: the synthetic batch); the global batch is every replica's micro-batches in order."""
    m = spec.microbatches
    if batch is None:
        batch = lambda mb, d: M.batch_tokens(spec, step, d * m + mb)  # noqa: E731
    gspec = spec.model_copy(update={"microbatches": m * replicas}) if replicas > 1 else spec
    gbatch = lambda g: batch(g % m, g // m)  # noqa: E731 - global micro-batch g of the step
    ref_loss, grads = _reference(spec, gspec, step, device, gbatch, hf_model, torch.float32, False)
    mine = [(n, p) for Pc in chunks for n, p in Pc.items()]
    worst, worst_name = 0.0, ""
    for n, p in mine:
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        err = _rel(got, grads[n])
        if err > worst:
            worst, worst_name = err, n
    out = {"max_grad_rel_err": worst, "worst_param": worst_name, "ref_loss": ref_loss, "grad_tolerance": TOLERANCE}
    if dtype != torch.float32 or autocast:
        loss_q, grads_q = _reference(spec, gspec, step, device, gbatch, hf_model, dtype, autocast)
        own = max((_rel(grads_q[n], grads[n]) for n, _ in mine), default=0.0)
        out.update(dtype_ref_grad_rel_err=own, grad_tolerance=TOLERANCE + DTYPE_FACTOR * own,
                   ref_loss_low_precision=loss_q)
    return out


def loss_rel_err(loss: float, ref_loss: float) -> float:
    """Relative error of the step's loss (over the whole global batch) against the reference's."""
    return abs(loss - ref_loss) / max(abs(ref_loss), 1e-30)


def loss_tolerance(report: dict) -> float:
    """What loss_rel_err is held to: TOLERANCE, plus DTYPE_FACTOR times what the low precision
    costs the reference's loss."""
    if "ref_loss_low_precision" not in report:
        return TOLERANCE
    return TOLERANCE + DTYPE_FACTOR * loss_rel_err(report["ref_loss_low_precision"], report["ref_loss"])
