"""Registry of schedule families by name."""
from ir import SpecError

from . import gpipe, interleaved_1f1b, looped_bfs, onef1b, seq1f1b, slimpipe, zero_bubble
from .common import Family, Order, bounded_inflight

FAMILIES: dict[str, Family] = {f.name: f for f in (
    gpipe.FAMILY, onef1b.FAMILY, interleaved_1f1b.FAMILY, looped_bfs.FAMILY, seq1f1b.FAMILY, slimpipe.FAMILY,
    zero_bubble.ZB_H1, zero_bubble.ZB_V, zero_bubble.INTERLEAVED_ZB)}


def get(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise SpecError(f"--schedule {name!r} is unknown; allowed: {', '.join(FAMILIES)}") from None


__all__ = ["FAMILIES", "Family", "Order", "bounded_inflight", "get"]
