"""The executor's error types, one per cause, each with its exit code (read by the launcher:
runner._failure / cli.main). Nothing here is recognised by its message text."""
from __future__ import annotations

from ir import SlimpipeError


class ExecError(SlimpipeError):
    """A plan cannot be run as written (a missing buffer, a timeout, a lost peer); the text
    already starts with the rank and instruction. One line, exit 1."""

    exit_code = 1


class PeerGone(ExecError):
    """The transport lost a peer rank while this rank waited on it (the peer crashed, was
    interrupted or stopped). Exit 1; under torchrun the rank gives a signal that ended the
    peer (Ctrl-C) a moment to arrive first, so that an interrupted job says it was interrupted."""


class UnitError(SlimpipeError):
    """A unit's state does not allow the instruction (its forward has not run, no input arrived).
    Raised by the stage without a location; the runtime turns it into an ExecError naming the
    rank and instruction."""

    exit_code = 1


class BackendUnavailable(SlimpipeError):
    """The --attention choice cannot run here (flash-attn missing, no CUDA, a failed self-test):
    a usage error, exit 2."""

    exit_code = 2


class InjectedFault(RuntimeError):
    """The failure SLIMPIPE_FAULT asked for (action=fail)."""
