"""Value types for command-line options, shared by `slimpipe` and the executor: each one turns
the text into a number or raises argparse.ArgumentTypeError with what is allowed, so a bad value
is one line (argparse names the option) and exit 2, before any work."""
from __future__ import annotations

import argparse
import math
import re
import sys

from .limits import INT_MAX


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        unit = re.fullmatch(r"\s*([-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)\s*[a-zA-Z]+\s*", text)
        hint = f" (write it without a unit, e.g. {unit.group(1).lstrip('+-')}; times are in seconds)" if unit else ""
        raise argparse.ArgumentTypeError(f"{text!r} is not a number{hint}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return v


def _at_most_int_max(v: int, low: int) -> int:
    if v > INT_MAX:
        shown = str(v) if len(str(v)) <= 24 else f"{str(v)[:12]}...({len(str(v))} digits)"
        raise argparse.ArgumentTypeError(f"{shown} is too large; give an integer from {low} to {INT_MAX}")
    return v


def positive_int(text: str) -> int:
    """An integer from 1 to INT_MAX (2**31 - 1: a count slimpipe and torch hold as a C int)."""
    v = _int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} is not allowed; give an integer >= 1")
    return _at_most_int_max(v, 1)


def nonneg_int(text: str) -> int:
    """An integer from 0 to INT_MAX."""
    v = _int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{v} is not allowed; give an integer >= 0")
    v = _at_most_int_max(v, 0)
    return v


def positive_float(text: str) -> float:
    """A finite number > 0."""
    v = _float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text} is not allowed; give a number > 0")
    return v


def nonneg_float(text: str) -> float:
    """A finite number >= 0."""
    v = _float(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text} is not allowed; give a number >= 0")
    return v


MAX_SECONDS = 10 ** 6  # 11.6 days: a timeout or time limit beyond it is a typo (and overflows the clocks' time_t)


def timeout_seconds(text: str) -> float:
    """Seconds > 0, at most MAX_SECONDS (a timeout)."""
    v = positive_float(text)
    if v > MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"{text} is too large; give a number of seconds > 0 and at most {MAX_SECONDS}")
    return v


def limit_seconds(text: str) -> float:
    """Seconds >= 0 (0: no limit), at most MAX_SECONDS (a search's time limit)."""
    v = nonneg_float(text)
    if v > MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"{text} is too large; give seconds from 0 (no limit) to {MAX_SECONDS}")
    return v


MAX_THREADS = 1024  # torch.set_num_threads(100000) crashes the process (libgomp)


def thread_count(text: str) -> int:
    """An integer from 1 to MAX_THREADS."""
    v = positive_int(text)
    if v > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"{v} is too large; give an integer from 1 to {MAX_THREADS}")
    return v


def glue_negative_values(argv: list[str] | None) -> list[str]:
    """['--memory-budget', '-1GiB'] -> ['--memory-budget=-1GiB']: argparse takes a value that starts
    with '-' and is not a plain number ('-1GiB', '-0.5s') for an option and answers "expected one
    argument", which does not name the value. No option of slimpipe or the executor starts with '-' and a digit, so
    such a token after a long option is its value, and the option's own check then names it.
    argv None: this process's arguments (sys.argv[1:])."""
    out: list[str] = []
    for tok in sys.argv[1:] if argv is None else argv:
        if (out and tok[:1] == "-" and tok[1:2].isdigit() and out[-1].startswith("--") and "=" not in out[-1]
                and out[-1] != "--"):
            out[-1] = f"{out[-1]}={tok}"
        else:
            out.append(tok)
    return out


def reopen_closed_streams() -> None:
    """Point sys.stdout / sys.stderr at /dev/null where the process was started with that stream
    closed (`cmd >&-`): Python leaves it None, the first print to it fails, and print(file=None)
    falls back to stdout, so an error line would land in the command's output. For the entry
    points of `slimpipe` and the executor, before anything prints."""
    import os

    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w"))
