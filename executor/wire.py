"""Wire tags: the plan's tags spaced out so each KV-exchange message of each layer (request and
reply, forward and backward) travels under its own transport tag."""
from __future__ import annotations

from ir.limits import WIRE_TAG_LIMIT, wire_stride

from .errors import UnitError


class WireTags:
    """plan tag (+ layer, direction, reply) -> transport tag, for one plan."""

    __slots__ = ("stride",)

    def __init__(self, spec):
        self.stride = wire_stride(spec.stage_layers)  # tags below ir.limits.tag_limit fit in 31 bits

    def __call__(self, tag: int, li: int = 0, bwd: int = 0, reply: int = 0) -> int:
        """li < 0: the plain p2p message of the instruction (activation, gradient)."""
        sub = 0 if li < 0 else 1 + 4 * li + 2 * bwd + reply
        wire = tag * self.stride + sub
        if not 0 <= wire < WIRE_TAG_LIMIT:  # only a plan run with --no-check gets here
            raise UnitError(f"its tag {tag} is too large: the executor sends it as transport tag {wire}, and "
                            f"torch.distributed's tags are 31-bit (plan tags must be below "
                            f"{WIRE_TAG_LIMIT // self.stride})")
        return wire
