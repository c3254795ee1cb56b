"""DistTransport's completion watching on gloo: the plan's p2p messages share one watcher thread per
(direction, peer), served in posting order; other messages get a thread each."""
import threading
import time

import pytest

from executor.transport import DistTransport, PeerLost


class FakeWork:
    """A gloo-like Work: wait() blocks until release() (or raises the given error)."""

    def __init__(self, error=None):
        self.done = threading.Event()
        self.error = error

    def release(self):
        self.done.set()

    def wait(self, timeout=None):
        if not self.done.wait(5):
            raise RuntimeError("fake work never released")
        if self.error is not None:
            raise self.error


def transport():
    tp = object.__new__(DistTransport)
    tp.watch, tp.timeout, tp.backend = True, 5.0, "gloo"
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
