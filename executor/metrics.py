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


M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)


def limit_malloc_arenas(n: int) -> bool:
    """Cap the C library's malloc arenas at n for the threads this process starts from now on
    (glibc's mallopt(M_ARENA_MAX, n)); call it before the rank's threads start. True when set; False
    where n is 0 (leave the library's default) or the C library is not glibc. Why: with the rank's
    compute thread and gloo's threads in arenas of their own, glibc's heaps kept freed tensors in
    some runs and not others: peak RSS of our gpipe p=2 bench ranks 745-1127 MiB (9 runs of 34 above
    800 MiB), with one arena 746-779 MiB in 19 of 19 at the same step time (ad hoc, alternated;
    GLIBC_TUNABLES=glibc.malloc.arena_max=1, then this)."""
    if n <= 0:
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
        if not hasattr(libc, "gnu_get_libc_version"):
            return False
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_ARENA_MAX, n) == 1


def peak_rss_mib() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def median(xs):
    return statistics.median(xs) if xs else 0.0
