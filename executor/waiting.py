"""The rank's one blocking point: poll a pending message, serve KV-exchange requests meanwhile,
give up after the timeout with a line naming whom it waited on and for what."""
from __future__ import annotations

import time

from .errors import ExecError, PeerGone
from .faults import cause
from .transport import Aborted, PeerLost


class Waiter:
    """Bounded waits of one rank. `where()` names the current instruction; `serve()` answers
    the KV requests that have arrived and says whether anything moved."""

    def __init__(self, transport, watch, timeout: float, where, serve):
        self.tp, self.watch, self.timeout, self.where, self.serve = transport, watch, timeout, where, serve

    def wait(self, pending, what: str, peer):
        """Block until `pending` is ready; return its value. `peer` (a rank, or a callable giving
        rank(s)) is named when the wait fails."""
        deadline = time.monotonic() + self.timeout
        tp, watch = self.tp, self.watch
        watch.block(what, peer, self.timeout)
        try:
            while True:
                v = tp.version()
                try:
                    if pending.ready():
                        return pending.value()
                except Aborted as e:  # in-process: another rank failed
                    raise ExecError(f"{self.where()}: stopped waiting{watch.peer_text()} for {what}: {e}") from None
                except Exception as e:  # noqa: BLE001 - the transport lost the peer (gloo: connection closed)
                    if time.monotonic() > deadline:  # a blocking wait gave up at the deadline
                        raise self.timed_out(what) from None
                    why = f"({e})" if isinstance(e, PeerLost) else f"({cause(e)})"
                    raise PeerGone(f"{self.where()}: lost the connection while waiting{watch.peer_text()} "
                                   f"for {what} {why}") from e
                if self.serve():
                    continue
                if pending.block is not None:
                    pending.block(deadline - time.monotonic())
                    continue
                if time.monotonic() > deadline:
                    raise self.timed_out(what)
                tp.wait_change(v, 0.05)
        finally:
            watch.unblock()

    def timed_out(self, what: str) -> ExecError:
        return ExecError(f"{self.where()}: timed out after {self.timeout:g} s waiting{self.watch.peer_text()} "
                         f"for {what}")
