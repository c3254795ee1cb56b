"""The reference check: the unsliced, unpipelined model on the same batch (fp32), compared with
what the pipelined step computed on this rank. With --hf-model the reference is transformers' own
model loaded from the checkpoint (executor/hf.py), not ours."""
from __future__ import annotations

import torch

from . import model as M


def reference_check(spec, chunks, step: int, device, batch=None, hf_model: str | None = None,
                    replicas: int = 1) -> dict:
    """Relative errors of each of this rank's parameter gradients (`chunks`: {name: Parameter}
    dicts, already averaged over the data-parallel replicas) against the reference on the global
    batch, and the reference loss (the runner compares it with the step's loss: loss_rel_err).
    batch(mb, replica) gives a replica's micro-batch of the step (default: the synthetic batch);
    the global batch is the micro-batches of every replica, replica by replica."""
    m = spec.microbatches
    if batch is None:
        batch = lambda mb, d: M.batch_tokens(spec, step, d * m + mb)  # noqa: E731
    gspec = spec.model_copy(update={"microbatches": m * replicas}) if replicas > 1 else spec
    gbatch = lambda g: batch(g % m, g // m)  # noqa: E731 - global micro-batch g of the step
    if hf_model is not None:
        from .hf import reference

        ref_loss, grads = reference(hf_model, gspec, gbatch, device)
    else:
        names = M.all_param_names(spec)
        P = {n: M.init_param(spec.model, n, spec.seed, device, torch.float32) for n in names}
        loss = M.reference_loss(gspec, P, step, device, gbatch)
        loss.backward()
        ref_loss, grads = float(loss.detach()), {n: P[n].grad for n in names}
    worst, worst_name = 0.0, ""
    for Pc in chunks:
        for n, p in Pc.items():
            ref = grads[n]
            got = p.grad if p.grad is not None else torch.zeros_like(p)
            err = float((got.float() - ref).norm() / ref.norm().clamp_min(1e-30))
            if err > worst:
                worst, worst_name = err, n
    return {"max_grad_rel_err": worst, "worst_param": worst_name, "ref_loss": ref_loss}


def loss_rel_err(loss: float, ref_loss: float) -> float:
    """Relative error of the step's loss (over the whole global batch) against the reference's."""
    return abs(loss - ref_loss) / max(abs(ref_loss), 1e-30)
