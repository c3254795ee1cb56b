"""Step-end collectives (outside the plan's streams), bounded by the timeout and named like a wait."""
from __future__ import annotations

from .errors import ExecError, PeerGone
from .transport import Aborted, PeerLost


def gather(transport, watch, timeout: float, obj, what: str) -> list:
    """Every rank's `obj` (JSON-serialisable), in rank order; an ExecError naming `what` if a rank
    is gone or the group's timeout passes."""
    watch.block(what, "every rank", timeout)
    try:
        return transport.all_gather(obj)
    except Aborted as e:
        raise ExecError(f"{watch.where()}: stopped waiting on every rank for {what}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a dead peer (gloo: connection closed) or the group's timeout
        raise PeerGone(f"{watch.where()}: lost the connection while waiting on every rank for {what} "
                       f"({PeerLost(getattr(transport, 'backend', transport.kind), e)})") from e
    finally:
        watch.unblock()
