"""A rank's parameters (one {name: Parameter} dict per chunk it holds) and their optimizer."""
from __future__ import annotations

import torch

from . import model as M


class Parameters:
    """Parameters of stages `stages` (in chunk order), initialised deterministically from the
    plan's seed, and AdamW over all of them (None on a rank without parameters)."""

    def __init__(self, spec, stages, device, dtype, lr: float):
        cfg = spec.model
        self.chunks = [{n: M.init_param(cfg, n, spec.seed, device, dtype) for n in M.stage_param_names(spec, s)}
                       for s in stages]
        self.flat = [p for P in self.chunks for p in P.values()]
        self.optimizer = torch.optim.AdamW(self.flat, lr=lr) if self.flat else None

    def storage_ptrs(self):
        """Storages of the parameters (excluded from the activation count)."""
        return (p.untyped_storage().data_ptr() for p in self.flat)

    def step(self) -> None:
        """One optimizer step, then drop the gradients."""
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
