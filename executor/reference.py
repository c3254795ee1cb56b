"""The reference check: the unsliced, unpipelined model on the same batch (fp32), compared with
what the pipelined step computed on this rank."""
from __future__ import annotations

import torch

from . import model as M


def reference_check(spec, chunks, step: int, device, loss_sum: float, holds_last: bool) -> dict:
    """Relative errors of each of this rank's parameter gradients (`chunks`: {name: Parameter}
    dicts) and, on the rank holding the last stage, of the loss."""
    names = M.all_param_names(spec)
    P = {n: M.init_param(spec.model, n, spec.seed, device, torch.float32) for n in names}
    loss = M.reference_loss(spec, P, step, device)
    loss.backward()
    worst, worst_name = 0.0, ""
    for Pc in chunks:
        for n, p in Pc.items():
            ref = P[n].grad
            got = p.grad if p.grad is not None else torch.zeros_like(p)
            err = float((got.float() - ref).norm() / ref.norm().clamp_min(1e-30))
            if err > worst:
                worst, worst_name = err, n
    res = {"max_grad_rel_err": worst, "worst_param": worst_name, "ref_loss": float(loss.detach())}
    if holds_last:
        res["loss_rel_err"] = abs(loss_sum - float(loss.detach())) / max(abs(float(loss.detach())), 1e-30)
    return res
