"""Memory metrics: activation bytes (what autograd saves, K/V caches, dK/dV accumulators), RSS."""
from __future__ import annotations

import resource
import statistics


class ActivationTracker:
    """Live activation bytes, deduplicated by storage and grouped by owner (a unit, an
    accumulator): an owner's tensors count until release(owner). Parameters are excluded.

    The tracker holds each counted storage until its count drops to zero: keyed by address
    alone, a storage freed early (by autograd, say) could hand its address to a new tensor that
    would then be deduplicated against it, and the measured peak would depend on the allocator."""

    def __init__(self, exclude_ptrs=()):
        self.exclude = set(exclude_ptrs)
        self.refs: dict[int, list] = {}  # storage ptr -> [nbytes, count, the storage (held)]
        self.owned: dict[object, set] = {}
        self.live = 0
        self.peak = 0

    def add(self, owner, t) -> None:
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if ptr in self.exclude or nbytes == 0:
            return
        mine = self.owned.setdefault(owner, set())
        if ptr in mine:
            return
        mine.add(ptr)
        ref = self.refs.get(ptr)
        if ref is None:
            self.refs[ptr] = [nbytes, 1, storage]
            self.live += nbytes
            if self.live > self.peak:
                self.peak = self.live
        else:
            ref[1] += 1

    def release(self, owner) -> None:
        for ptr in self.owned.pop(owner, ()):
            ref = self.refs[ptr]
            ref[1] -= 1
            if ref[1] == 0:
                del self.refs[ptr]
                self.live -= ref[0]

    def reset_peak(self) -> None:
        self.peak = self.live


def peak_rss_mib() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def median(xs):
    return statistics.median(xs) if xs else 0.0
