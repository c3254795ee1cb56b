"""Pause Python's cyclic garbage collector around passes that allocate millions of small,
acyclic records (instructions, index tuples): each full collection would otherwise walk every
live instruction of the plan again. Reference counting still frees everything as usual."""
from __future__ import annotations

import functools
import gc


def gc_paused(fn):
    """Decorator: run `fn` with the cyclic collector disabled (restored afterwards, even on error;
    nested calls leave it to the outermost)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()

    return wrapper
