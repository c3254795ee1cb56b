"""A pure function computed in a forked child process while the caller goes on with other work.

`slimpipe check` runs the rules (validate) and the deadlock proof (a replay) over the same plan;
neither needs the other's result, and on the 1.6M-instruction plan of bench/scale_1m.py they take
about 2.5 s and 0.9 s of one processor. Forked after the plan is loaded, the child shares the
plan's pages (copy on write) and sends back only the replay's small result (pickled through a
pipe), so the two run on two processors. This is what os.fork is for on Linux; the
multiprocessing module would pickle the plan to a fresh interpreter instead (seconds).

Forking is only done where it is safe and can pay: Linux, at least two processors this process
may run on, and one thread in the process (a forked copy of a threaded process can hang on a lock
another thread held). Anywhere else, and whenever the child fails in any way (an exception, a
signal, a result that does not unpickle), the caller computes the value itself: the answer is
always the function's own, raised exceptions included.
"""
from __future__ import annotations

import os
import pickle
import signal
import sys
import threading
from typing import Any, Callable

_FAILED = object()


def processors() -> int:
    """The processors this process may run on (its affinity mask), 1 where that is unknown."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def can_fork() -> bool:
    """Whether start() forks here: Linux, two or more processors, a single-threaded process."""
    return (sys.platform.startswith("linux") and hasattr(os, "fork") and processors() >= 2
            and threading.active_count() == 1)


def _bound_to(parent: int) -> None:
    """In the child: die with the parent (Linux's PR_SET_PDEATHSIG: a parent killed by SIGTERM or
    SIGKILL leaves no child computing on) and let go of the parent's stdout and stderr (a caller
    reading them to their end, `$(slimpipe check ...)`, then waits for the parent alone)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the line above: nobody wants the value
        os._exit(1)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.close(null)


class Forked:
    """fn() being computed in a child process: result() its value, cancel() to drop it."""

    def __init__(self, fn: Callable[[], Any], pid: int, fd: int):
        self._fn, self._pid, self._fd = fn, pid, fd

    def result(self) -> Any:
        """The child's value, once it is done; where the child failed, fn() computed here. Once."""
        if self._fd is None:
            raise RuntimeError("a forked job's result is taken once")
        value = _FAILED
        fd, self._fd = self._fd, None
        try:
            with os.fdopen(fd, "rb") as f:
                data = f.read()  # to the child's end (it writes once, then exits)
        except BaseException:  # Ctrl-C while waiting: stop the child, reap it, let the interrupt through
            self._stop()
            raise
        _, status = os.waitpid(self._pid, 0)
        if os.waitstatus_to_exitcode(status) == 0 and data:
            try:
                value = pickle.loads(data)
            except Exception:  # noqa: BLE001 - any unpickling failure: compute it here instead
                value = _FAILED
        return self._fn() if value is _FAILED else value

    def cancel(self) -> None:
        """Stop the child and reap it (its value is not wanted); nothing once result() was taken."""
        if self._fd is None:
            return
        os.close(self._fd)
        self._fd = None
        self._stop()

    def _stop(self) -> None:
        try:
            os.kill(self._pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(self._pid, 0)
        except ChildProcessError:
            pass


class Done:
    """A value already computed, with start()'s result() and cancel()."""

    def __init__(self, value: Any):
        self._value = value

    def result(self) -> Any:
        return self._value

    def cancel(self) -> None:
        pass


class _Here:
    """start()'s stand-in where it does not fork: fn() computed when result() is called."""

    def __init__(self, fn: Callable[[], Any]):
        self._fn = fn

    def result(self) -> Any:
        return self._fn()

    def cancel(self) -> None:
        pass


def start(fn: Callable[[], Any]) -> Forked | _Here:
    """Begin fn() (no arguments; a pure function of what this process holds) in a forked child
    where can_fork(); otherwise return a stand-in that calls fn() in result(). The child writes
    pickle.dumps(fn()) to a pipe and leaves with os._exit (no atexit handlers, no flush of this
    process's buffered output); an exception in it makes result() call fn() here, so the caller
    sees the exception raised as without a child."""
    if not can_fork():
        return _Here(fn)
    sys.stdout.flush()  # output buffered before the fork would otherwise be printed twice
    sys.stderr.flush()
    r, w = os.pipe()
    parent = os.getpid()
    try:
        pid = os.fork()
    except OSError:  # no memory or process slot for a child: compute it here
        os.close(r)
        os.close(w)
        return _Here(fn)
    if pid == 0:  # the child
        code = 1
        try:
            os.close(r)
            _bound_to(parent)
            data = pickle.dumps(fn(), protocol=pickle.HIGHEST_PROTOCOL)
            with os.fdopen(w, "wb") as f:
                f.write(data)
            code = 0
        except BaseException:  # noqa: BLE001 - the parent computes it again and sees the error
            pass
        finally:
            os._exit(code)
    os.close(w)
    return Forked(fn, pid, r)
