"""A rank's parameters (one {name: Parameter} dict per chunk it holds) and their optimizer."""
from __future__ import annotations

import torch

from . import model as M


class Parameters:
    """Parameters of stages `stages` (in chunk order), initialised deterministically from the
    plan's seed or read from a Hugging Face checkpoint directory (`hf_model`: only these stages'
    tensors), and AdamW over all of them (None on a rank without parameters)."""

    def __init__(self, spec, stages, device, dtype, lr: float, hf_model: str | None = None):
        cfg = spec.model
        if hf_model is not None:
            from .hf import load_stage_params

            self.chunks = load_stage_params(hf_model, spec, stages, device, dtype)
        else:
            self.chunks = M.stage_params(spec, stages, lambda n: M.init_param(cfg, n, spec.seed, device, dtype))
        self.flat = M.unique_params(self.chunks)  # a tied embedding held by two chunks is one Parameter
        self.optimizer = torch.optim.AdamW(self.flat, lr=lr) if self.flat else None

    def storage_ptrs(self):
        """Storages of the parameters (excluded from the activation count)."""
        return (p.untyped_storage().data_ptr() for p in self.flat)

    def step(self) -> None:
        """One optimizer step, then drop the gradients."""
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
