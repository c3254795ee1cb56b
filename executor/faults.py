"""Failure handling of one rank: what it is doing right now (so every exit can say it in one line),
the fault-injection switch SLIMPIPE_FAULT, and the one way out of a failed process.

A rank that fails prints ONE line, `executor: rank R: error: rank R #I 'INSTR': cause`, and leaves
with os._exit (torch's teardown can block on a dead peer). Peers that were waiting on it print the
same kind of line naming the rank they waited on.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

from ir import SlimpipeError, SpecError, parse

from .errors import InjectedFault

FAULT_ENV = "SLIMPIPE_FAULT"
FAULT_HELP = """fault injection (for tests of the failure paths):
  SLIMPIPE_FAULT='rank=R,instr=I,action=fail|delay|exit|stop[,seconds=S][,step=K]'
    rank R, at instruction I of its stream (an index, or the text form such as 'F mb3 s1 c0'),
    in training step K (default 1; a step the run executes, else refused): fail raises an error there (exit 1); delay sleeps S seconds
    (default 5) before running it; exit prints one line and ends the process abruptly with
    os._exit(3), like a crash; stop stops the process with SIGSTOP (as Ctrl-Z or a debugger would).
    Other ranks then fail within --timeout, naming whom they waited on."""
ACTIONS = ("fail", "delay", "exit", "stop")


class Fault:
    """One injected fault, parsed from SLIMPIPE_FAULT."""

    __slots__ = ("rank", "instr", "action", "seconds", "step", "text")

    def __init__(self, rank: int, instr, action: str, seconds: float, step: int, text: str):
        self.rank, self.instr, self.action, self.seconds, self.step, self.text = rank, instr, action, seconds, step, text

    @classmethod
    def parse(cls, text: str) -> "Fault":
        bad = f"{FAULT_ENV}={text!r}"
        fields: dict[str, str] = {}
        for part in text.split(","):
            if not part.strip():
                continue
            k, eq, v = part.partition("=")
            k = k.strip()
            if not eq or k not in ("rank", "instr", "action", "seconds", "step"):
                raise SpecError(f"{bad}: cannot read {part.strip()!r}; write e.g. rank=1,instr=7,action=fail")
            fields[k] = v.strip()
        for k in ("rank", "instr", "action"):
            if k not in fields:
                raise SpecError(f"{bad}: {k}= is missing; write e.g. rank=1,instr=7,action=fail")
        if fields["action"] not in ACTIONS:
            raise SpecError(f"{bad}: action must be one of {', '.join(ACTIONS)}")
        try:
            rank = int(fields["rank"])
            step = int(fields.get("step", "1"))
            seconds = float(fields.get("seconds", "5"))
        except ValueError as e:
            raise SpecError(f"{bad}: {e}") from None
        instr = fields["instr"]
        if instr.lstrip("-").isdigit():
            instr = int(instr)
        else:
            try:
                instr = parse(instr)
            except Exception as e:  # noqa: BLE001 - one line, exit 2
                raise SpecError(f"{bad}: instr= is neither an index nor an instruction ({e})") from None
        if rank < 0 or step < 1 or not seconds >= 0:
            raise SpecError(f"{bad}: rank must be >= 0, step >= 1, seconds >= 0")
        return cls(rank, instr, fields["action"], seconds, step, text)

    def index_in(self, plan) -> int | None:
        """This fault's instruction index on its rank's stream, or None when it is not for `plan`."""
        if self.rank >= plan.spec.pp:
            raise SpecError(f"{FAULT_ENV}={self.text!r}: rank {self.rank} is not in this plan (pp={plan.spec.pp})")
        stream = plan.ranks[self.rank]
        if isinstance(self.instr, int):
            if not 0 <= self.instr < len(stream):
                raise SpecError(f"{FAULT_ENV}={self.text!r}: rank {self.rank} has instructions #0..#{len(stream) - 1}")
            return self.instr
        try:
            return list(stream).index(self.instr)
        except ValueError:
            raise SpecError(f"{FAULT_ENV}={self.text!r}: rank {self.rank} has no instruction '{self.instr}'") from None


    def check_steps(self, steps: int, first: int = 0) -> None:
        """SpecError unless this fault's step is one the run executes: steps first+1..steps (1-based;
        `first` is the step a --resume checkpoint ends). A fault in a step never run would be silently
        skipped, and the run's success taken for a test of the failure path."""
        run = f"{first + 1}..{steps}" if first + 1 < steps else f"{steps}"  # the steps this run executes
        if self.step > steps:
            raise SpecError(f"{FAULT_ENV}={self.text!r}: step {self.step} is never run: this run has --steps {steps}; "
                            f"give step={run} or --steps {self.step} or more")
        if self.step <= first:
            raise SpecError(f"{FAULT_ENV}={self.text!r}: step {self.step} is never run: --resume starts after step "
                            f"{first}; give step={run}")


def fault_from_env(plan, steps: int | None = None, first: int = 0) -> tuple[Fault | None, int | None]:
    """(the fault, its instruction index) from SLIMPIPE_FAULT; SpecError (exit 2) if malformed, or,
    given the run's `steps` (and `first`, see Fault.check_steps), if its step is not run."""
    text = os.environ.get(FAULT_ENV, "").strip()
    if not text:
        return None, None
    f = Fault.parse(text)
    at = f.index_in(plan)
    if steps is not None:
        f.check_steps(steps, first)
    return f, at


class Injector:
    """Acts out one rank's SLIMPIPE_FAULT at its instruction index `at`, in the step it names."""

    __slots__ = ("fault", "at", "rank", "watch", "timeout")

    def __init__(self, fault: Fault | None, at: int | None, rank: int, watch: "Watch", timeout: float):
        self.fault, self.rank, self.watch, self.timeout = fault, rank, watch, timeout
        self.at = at if fault is not None else None

    def __call__(self, pc: int, step: int, where) -> None:
        """Called before instruction `pc` of step `step` (0-based) runs; `where()` names it."""
        f = self.fault
        if pc != self.at or step != f.step - 1:
            return
        if f.action == "fail":
            raise InjectedFault(f"{FAULT_ENV}='{f.text}'")
        if f.action == "exit":
            die(self.rank, f"{where()}: injected crash ({FAULT_ENV}='{f.text}'): exiting at once with code 3", 3)
        if f.action == "stop":
            write_line(line(self.rank, f"{where()}: injected stop ({FAULT_ENV}='{f.text}'): SIGSTOP", "fault"))
            os.kill(os.getpid(), signal.SIGSTOP)
            return
        self.watch.block(f"the end of an injected delay of {f.seconds:g} s", None, f.seconds + self.timeout)
        try:
            time.sleep(f.seconds)
        finally:
            self.watch.unblock()


class Watch:
    """What one rank is doing now, read by the supervisor and the signal handler: where (a callable
    giving 'rank R #I \\'INSTR\\''), and while blocked: what it waits for, on whom, until when."""

    __slots__ = ("rank", "where", "what", "peer", "deadline", "since", "step", "steps")

    def __init__(self, rank: int):
        self.rank = rank
        self.where = lambda: f"rank {rank}"
        self.what = self.peer = None
        self.deadline = self.since = 0.0
        self.step, self.steps = -1, 0  # the step running (0-based; -1 before the first) of how many

    def in_step(self) -> str:
        """'in step 5 of 200' (1-based), or 'before the first step' (start-up, the reference model)."""
        if self.step < 0:
            return "before the first step"
        if self.step >= self.steps:
            return f"after the last step ({self.steps})"
        return f"in step {self.step + 1} of {self.steps}"

    def block(self, what: str, peer, timeout: float) -> None:
        self.since = time.monotonic()
        self.deadline = self.since + timeout
        self.peer, self.what = peer, what

    def unblock(self) -> None:
        self.what = None

    def peer_text(self) -> str:
        peer = self.peer() if callable(self.peer) else self.peer
        if peer is None:
            return ""
        return f" on rank {peer}" if isinstance(peer, int) else f" on {peer}"

    def doing(self) -> str:
        """'waiting on rank 0 for the activation (12.0 s so far)' or 'not waiting (computing)'."""
        what = self.what
        if what is None:
            return "while computing (not waiting on any rank)"
        return f"while waiting{self.peer_text()} for {what} ({time.monotonic() - self.since:.1f} s so far)"

    def overdue(self, grace: float) -> bool:
        return self.what is not None and time.monotonic() > self.deadline + grace


def cause(e: BaseException, limit: int = 300) -> str:
    """An exception as a short single-line cause."""
    text = " ".join(str(e).split()) or type(e).__name__
    if len(text) > limit:
        text = text[:limit] + "..."
    return text if isinstance(e, SlimpipeError) else f"{type(e).__name__}: {text}"


_exiting = threading.Lock()


def line(rank, msg: str, label: str = "error") -> str:
    """'executor: rank 2: error: MSG'; label '' leaves the word out (MSG says what happened)."""
    who = f"rank {rank}: " if rank is not None else ""
    return f"executor: {who}{label + ': ' if label else ''}{msg}"


def write_line(text: str) -> None:
    """`text` and its newline to stderr in one write(): all ranks share torchrun's stderr pipe, and
    print() writes text and newline separately, so concurrent ranks could splice their lines.
    A stderr without a file descriptor (captured in-process) gets an ordinary write."""
    data = text[:3000] + "\n"
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        sys.stderr.write(data)
        sys.stderr.flush()
        return
    sys.stderr.flush()
    os.write(fd, data.encode("utf-8", "replace"))


def die(rank, msg: str, code: int = 1, *, from_signal: bool = False, label: str = "error") -> None:
    """Print the rank's one line and end the process now. Only the first caller prints; a later
    one (another thread) waits for the exit, a signal handler returns."""
    if not _exiting.acquire(blocking=False):
        if from_signal:
            return
        threading.Event().wait()
    if os.environ.get("SLIMPIPE_TRACEBACK") and sys.exc_info()[0] is not None:
        import traceback

        traceback.print_exc()
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001 - stdout may be gone
        pass
    try:
        write_line(line(rank, msg, label))
    finally:
        os._exit(code)


def _proc_state(pid: int) -> str | None:
    """The one-letter state of a process on this host (/proc/PID/stat), or None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return None


def end_stopped_peers(procs, rank: int) -> str:
    """When this rank fails: its peers on this host that are stopped (SIGSTOP, Ctrl-Z, a
    debugger's stop) cannot act on the SIGTERM the launcher sends, and torchrun waits 30 s more
    before it kills them; end them now with SIGKILL. `procs`: (host, pid) of every rank, gathered
    when the ranks joined (None before). Returns words for this rank's line ('' if none)."""
    if not procs:
        return ""
    host, ended = socket.gethostname(), []
    for q, (h, pid) in enumerate(procs):
        if q != rank and h == host and _proc_state(pid) in ("T", "t"):
            try:
                os.kill(pid, signal.SIGKILL)
                ended.append(f"rank {q} (pid {pid})")
            except OSError:
                pass
    if not ended:
        return ""
    return (f"; {', '.join(ended)} {'was' if len(ended) == 1 else 'were'} stopped (SIGSTOP or a debugger) and could "
            f"not answer the launcher's SIGTERM: ended with SIGKILL")
