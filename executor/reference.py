"""The reference check: the unsliced, unpipelined model on the same batch (fp32), compared with
what the pipelined step computed on this rank. With --hf-model the reference is transformers' own
model loaded from the checkpoint (executor/hf.py), not ours."""
from __future__ import annotations

import torch

from . import model as M


def reference_check(spec, chunks, step: int, device, loss_sum: float, holds_last: bool, batch=None,
                    hf_model: str | None = None) -> dict:
    """Relative errors of each of this rank's parameter gradients (`chunks`: {name: Parameter}
    dicts) and, on the rank holding the last stage, of the loss. batch(mb) gives the step's
    tokens (default: the synthetic batch)."""
    if hf_model is not None:
        from .hf import reference

        if batch is None:
            batch = lambda mb: M.batch_tokens(spec, step, mb)  # noqa: E731
        ref_loss, grads = reference(hf_model, spec, batch, device)
    else:
        names = M.all_param_names(spec)
        P = {n: M.init_param(spec.model, n, spec.seed, device, torch.float32) for n in names}
        loss = M.reference_loss(spec, P, step, device, batch)
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
    res = {"max_grad_rel_err": worst, "worst_param": worst_name, "ref_loss": ref_loss}
    if holds_last:
        res["loss_rel_err"] = abs(loss_sum - ref_loss) / max(abs(ref_loss), 1e-30)
    return res
