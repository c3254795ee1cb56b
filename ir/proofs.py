"""Proofs remembered between commands: which plan files `slimpipe check` has proved.

`slimpipe check plan.json` proves a plan (the rules, then the deadlock replay); the commands that
act on a plan file afterwards (simulate, export, the executor) refuse a plan that would not
pass, so without a memory each of them proves it again: on a 1.6M-instruction plan that is 2-3 s a
command. A proof is remembered as a file named by a key: the SHA-256 of the plan file's
bytes together with a fingerprint of the code that proved it (the checker's sources: passes.check
makes the key), so an edited plan or a changed checker is proved again. The file holds what the
proof computed that a later command would compute again: the plan's unit-cost figures from its
deadlock replay (what `simulate --unit-costs` prints), a few kB. The same idea as the
result caches of linters and type checkers (ruff, mypy).

Where: $SLIMPIPE_CACHE_DIR, else $XDG_CACHE_HOME/slimpipe (an absolute path; a relative one is
ignored, as the XDG spec says), else ~/.cache/slimpipe, in a `proved/` folder (made 0700: whoever
can write there can mark any plan proved). SLIMPIPE_NO_CACHE set to anything but '' or '0' turns
it off, as does a home folder that cannot be found: every command then proves again. A store that
cannot be read or written is treated as empty: the cache never makes a command fail. It grows by
one small file per plan file checked and checker version and is never pruned (remove the folder
to clear it).
"""
from __future__ import annotations

import hashlib
import os
import stat

ENV_DIR = "SLIMPIPE_CACHE_DIR"
ENV_OFF = "SLIMPIPE_NO_CACHE"


def digest(data: bytes) -> str:
    """SHA-256 of a plan file's bytes, hex (64 characters)."""
    return hashlib.sha256(data).hexdigest()


def cache_dir() -> str | None:
    """The folder proofs are kept in, or None when the cache is off (SLIMPIPE_NO_CACHE set to
    anything but '', '0')."""
    if os.environ.get(ENV_OFF, "") not in ("", "0"):
        return None
    base = os.environ.get(ENV_DIR)
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        if not os.path.isabs(xdg):
            home = os.path.expanduser("~")
            if not os.path.isabs(home):  # no HOME and no passwd entry: "~" would land in the working folder
                return None
            xdg = os.path.join(home, ".cache")
        base = os.path.join(xdg, "slimpipe")
    return os.path.join(base, "proved")


def known(key: str) -> bool:
    """Whether a proof under `key` (hex) was noted. False when the cache is off or unreadable."""
    d = cache_dir()
    return d is not None and os.path.isfile(os.path.join(d, key))


def read(key: str) -> bytes | None:
    """What was noted with the proof under `key` (b"" for nothing), or None when no proof is
    known (or the store cannot be read)."""
    d = cache_dir()
    if d is None:
        return None
    try:
        fd = os.open(os.path.join(d, key), os.O_RDONLY | os.O_NONBLOCK)  # a FIFO put there must not block
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # not a file we wrote
            return None
        with os.fdopen(fd, "rb") as f:
            fd = None
            return f.read(1 << 20)  # noted figures are a few kB; a larger file is not ours
    except OSError:
        return None
    finally:
        if fd is not None:
            os.close(fd)


def note(key: str, content: bytes = b"") -> None:
    """Remember a proof under `key` (hex), with `content` (what the proof found that later
    commands may use: passes.check notes the unit-cost figures). Does nothing when the
    cache is off or not writable. The file appears whole or not at all (written beside, then
    renamed), so a reader never sees half of it."""
    d = cache_dir()
    if d is None:
        return
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        tmp = os.path.join(d, f".{key}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(content)
            os.replace(tmp, os.path.join(d, key))
        except OSError:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    except OSError:
        pass
