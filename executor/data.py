"""Where a step's tokens come from. Today: the synthetic batch of model.batch_tokens (the same on
every rank for a (step, micro-batch)), fetched once per step and micro-batch."""
from __future__ import annotations

from . import model as M


class SyntheticBatches:
    """Tokens [micro_batch_size, seq_len + 1] (inputs and next-token labels) of each micro-batch
    of the current step; the first and the last stage of a rank share one copy."""

    def __init__(self, spec, device):
        self.spec, self.device = spec, device
        self.step = 0
        self.cache: dict = {}

    def begin(self, step: int) -> None:
        self.step, self.cache = step, {}

    def tokens(self, mb: int):
        t = self.cache.get(mb)
        if t is None:
            t = self.cache[mb] = M.batch_tokens(self.spec, self.step, mb, self.device)
        return t
