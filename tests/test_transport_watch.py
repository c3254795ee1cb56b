"""DistTransport's completion watching on gloo: the plan's p2p messages share one watcher thread per
(direction, peer), served in posting order; other messages get a thread each. With wait="direct" the
plan's messages get no thread: the waiting rank blocks in the Work itself (Pending.block)."""
import threading
import time

import pytest

from executor.errors import ExecError, PeerGone
from executor.faults import Watch
from executor.transport import DistTransport, PeerLost
from executor.waiting import Waiter


class FakeWork:
    """A gloo-like Work: wait() blocks until release() (or raises the given error)."""

    def __init__(self, error=None):
        self.done = threading.Event()
        self.error = error

    def release(self):
        self.done.set()

    def wait(self, timeout=None):
        if not self.done.wait(5 if timeout is None else timeout.total_seconds()):
            raise RuntimeError("[../gloo/transport/unbound_buffer.cc:81] Timed out waiting for recv operation")
        if self.error is not None:
            raise self.error


def transport(direct=False):
    tp = object.__new__(DistTransport)
    tp.watch, tp.timeout, tp.backend, tp.direct = True, 5.0, "gloo", direct
    tp.cond, tp.ver, tp.threads, tp.fifos = threading.Condition(), 0, [], {}
    return tp


def until(pred, limit=5.0):
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < limit, "timed out"
        time.sleep(0.001)


def test_one_thread_per_peer_queue_whatever_the_message_count():
    tp = transport()
    before = threading.active_count()
    works = [FakeWork() for _ in range(50)]
    pend = [tp._watched(w, lambda i=i: i, ("recv", i % 2)) for i, w in enumerate(works)]
    assert threading.active_count() - before == 2  # two peers, two watchers
    for w in works:
        w.release()
    until(lambda: all(p.ready() for p in pend))
    assert [p.value() for p in pend] == list(range(50))
    for q in tp.fifos.values():
        q.close()
    for t in tp.threads:
        t.join(5)
    assert threading.active_count() == before


def test_a_queue_reports_completions_in_posting_order():
    tp = transport()
    a, b = FakeWork(), FakeWork()
    pa, pb = tp._watched(a, lambda: "a", ("recv", 1)), tp._watched(b, lambda: "b", ("recv", 1))
    b.release()  # the later message completes first: it is seen once the earlier one is
    time.sleep(0.05)
    assert not pb.ready() and not pa.ready()
    a.release()
    until(lambda: pa.ready() and pb.ready())
    assert (pa.value(), pb.value()) == ("a", "b")


def test_a_failed_message_raises_peer_lost_and_the_queue_goes_on():
    tp = transport()
    bad, good = FakeWork(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer")), FakeWork()
    pbad, pgood = tp._watched(bad, lambda: 1, ("send", 3)), tp._watched(good, lambda: 2, ("send", 3))
    bad.release()
    good.release()
    until(lambda: pbad.ready() and pgood.ready())
    with pytest.raises(PeerLost, match="^gloo: Connection closed by peer$"):
        pbad.value()
    assert pgood.value() == 2


def test_unqueued_messages_get_a_thread_each():
    tp = transport()
    before = threading.active_count()
    works = [FakeWork() for _ in range(3)]
    pend = [tp._watched(w, lambda: None) for w in works]
    assert threading.active_count() - before == 3
    for w in works:
        w.release()
    until(lambda: all(p.ready() for p in pend))


def waiter(tp, timeout=5.0):
    return Waiter(tp, Watch(1), timeout, lambda: "rank 1 #7 'RECV_ACT mb0 s0 c0'", lambda: False)


def test_direct_messages_start_no_thread_and_the_rank_blocks_in_them():
    tp = transport(direct=True)
    before = threading.active_count()
    works = [FakeWork() for _ in range(4)]
    pend = [tp._watched(w, lambda i=i: i, ("recv" if i % 2 else "send", 0)) for i, w in enumerate(works)]
    assert threading.active_count() == before and not tp.fifos
    assert not any(p.ready() for p in pend)  # gloo's Work says nothing until it is waited
    wake = threading.Timer(0.05, works[1].release)
    wake.start()
    assert waiter(tp).wait(pend[1], "its activation", 0) == 1  # blocked in the Work, woken by its completion
    wake.join()
    assert pend[1].ready() and not pend[3].ready()
    for w in works:
        w.release()
    assert [waiter(tp).wait(p, "a send to complete", 0) for p in pend] == [0, 1, 2, 3]


def test_direct_wait_names_the_peer_on_timeout_and_on_a_lost_connection():
    tp = transport(direct=True)
    p = tp._watched(FakeWork(), lambda: 1, ("recv", 0))
    with pytest.raises(ExecError, match=r"^rank 1 #7 'RECV_ACT mb0 s0 c0': timed out after 0\.2 s waiting on rank 0 "
                                        r"for its activation$"):
        waiter(tp, timeout=0.2).wait(p, "its activation", 0)
    lost = FakeWork(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer"))
    lost.release()
    p = tp._watched(lost, lambda: 1, ("recv", 0))
    with pytest.raises(PeerGone, match=r"^rank 1 #7 'RECV_ACT mb0 s0 c0': lost the connection while waiting on "
                                       r"rank 0 for its activation \(gloo: Connection closed by peer\)$"):
        waiter(tp).wait(p, "its activation", 0)


def test_unqueued_messages_are_watched_even_in_direct_mode():
    """A data-parallel all-reduce overlaps the rank's compute: it keeps its watcher thread."""
    tp = transport(direct=True)
    before = threading.active_count()
    w = FakeWork()
    p = tp._watched(w, lambda: "sum")
    assert threading.active_count() - before == 1 and p.block is None
    w.release()
    until(p.ready)
    assert p.value() == "sum"
