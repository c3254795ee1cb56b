"""Transports: torch.distributed point-to-point (gloo/NCCL) and an in-process hub (one thread per
rank). Both expose the same non-blocking surface; the interpreter owns every wait (one place,
with a timeout):

    send(dst, tag, tensors)              non-blocking; tensors must not be modified afterwards
    post_recv(src, tag, specs)           -> Pending; specs = [(shape, dtype)] known from the plan
    batch(ops)                           consecutive sends/recvs issued together (NCCL safety)
    version() / wait_change(v, timeout)  sleep until something may have arrived
    pending_sends()                      sends not yet complete (waited at step end)
    all_gather(obj)                      step-end metrics, outside the plan's streams
    channel(name)                        a view whose messages match apart from the others'

Matching (`match`): "tag" pairs a receive with the send of the same (source, tag), as gloo does;
"order" ignores tags and pairs the messages of one rank pair in posting order, as NCCL does (on
torch.distributed every message then travels with tag 0; gloo matches equal tags in order). The
KV exchange travels on channels of its own ("kvq" requests, "kvr" replies: their own process
groups on torch.distributed), so its messages never interleave with the pipeline's p2p messages of
the same rank pair, and within each channel a pair's messages come in one order on both sides.

all_reduce_start(buf) -> Pending: the sum of `buf` over this rank's data-parallel replicas (the same
pipeline rank in each replica). Peers are pipeline ranks of the plan (0..pp-1); with data
parallelism a transport belongs to one replica and maps them to global ranks (replica * pp + peer:
the row-major (dp, pp) mesh).
"""
from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from datetime import timedelta

import torch


class Aborted(RuntimeError):
    """Another rank of the in-process run failed."""


class PeerLost(RuntimeError):
    """torch.distributed reported a failed message (gloo: the peer closed or reset the connection,
    or the group's timeout passed). The text is the backend's, without source paths and advice."""

    def __init__(self, backend: str, e: BaseException, peers: tuple = ()):
        text = re.sub(r"\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", " ".join(str(e).split()))
        text = text.split(" This is typically")[0].strip() or type(e).__name__
        self.peers = tuple(peers)
        super().__init__(f"{backend}: {text[:300]}")

    @property
    def who(self) -> str:
        """'rank 2', 'ranks 1, 3', or 'a peer' when the backend did not say which."""
        if not self.peers:
            return "a peer"
        return f"rank {self.peers[0]}" if len(self.peers) == 1 else "ranks " + ", ".join(map(str, self.peers))


class Pending:
    """A posted receive (or a send in flight): ready() polls, value() returns the tensors once
    ready (or raises what the transport saw); peer is the other rank, for messages."""

    __slots__ = ("_poll", "_get", "peer", "block")
    # block(timeout): where set, the waiting rank may block in it (its own thread waits the message;
    # see DistTransport._watched); it returns at completion, error or timeout, never raises

    def __init__(self, poll, get, peer=None, block=None):
        self._poll, self._get, self.peer, self.block = poll, get, peer, block

    def ready(self) -> bool:
        return self._poll()

    def value(self):
        return self._get()


# ------------------------------------------------------------------ in-process
MATCH_MODES = ("tag", "order")
WAIT_MODES = ("direct", "watcher")
CHANNELS = ("p2p", "kvq", "kvr")


class Channel:
    """A transport view whose sends and receives travel on channel `name` (the KV exchange's)."""

    def __init__(self, tp, name: str):
        self._tp, self.name = tp, name

    def send(self, dst, tag, tensors):
        self._tp.send(dst, tag, tensors, channel=self.name)

    def post_recv(self, src, tag, specs):
        return self._tp.post_recv(src, tag, specs, channel=self.name)

    def __getattr__(self, attr):
        return getattr(self._tp, attr)


class LocalHub:
    """Shared mailbox of an in-process run: messages keyed (channel, src, dst, tag) - without the
    tag when match="order" - FIFO per key."""

    def __init__(self, world: int, timeout: float, match: str = "tag"):
        if match not in MATCH_MODES:
            raise ValueError(f"match={match!r}; allowed: {', '.join(MATCH_MODES)}")
        self.match = match
        self.world = world
        self.timeout = timeout
        self.boxes: dict[tuple[int, int, int], deque] = {}
        self.cond = threading.Condition()
        self.ver = 0
        self.error: str | None = None
        self.barrier = threading.Barrier(world)
        self.slots: list = [None] * world
        self.reduce_slots: dict = {}  # (group, sequence number) -> {global rank: tensor}
        self.reduce_readers: dict = {}

    def abort(self, msg: str) -> None:
        with self.cond:
            if self.error is None:
                self.error = msg
            self.ver += 1
            self.cond.notify_all()
        self.barrier.abort()

    def endpoint(self, rank: int, pp: int | None = None) -> "LocalTransport":
        """Global rank `rank`'s transport; `pp` ranks per replica (default: one replica)."""
        return LocalTransport(self, rank, pp or self.world)


class LocalTransport:
    kind = "local"

    def __init__(self, hub: LocalHub, rank: int, pp: int):
        self.hub, self.rank, self.world = hub, rank, hub.world
        self.base = rank - rank % pp
        self.dp_group = tuple(range(rank % pp, hub.world, pp))
        self.reduces = 0

    def _key(self, channel, src, dst, tag):
        return (channel, src, dst, tag if self.hub.match == "tag" else 0)

    def channel(self, name: str) -> Channel:
        return Channel(self, name)

    def send(self, dst, tag, tensors, channel="p2p"):
        h = self.hub
        # detached views: the receiver gets fresh autograd leaves, no copy is made
        msg = [t.detach() for t in tensors]
        with h.cond:
            h.boxes.setdefault(self._key(channel, self.rank, self.base + dst, tag), deque()).append(msg)
            h.ver += 1
            h.cond.notify_all()

    def post_recv(self, src, tag, specs, channel="p2p"):
        h = self.hub
        key = self._key(channel, self.base + src, self.rank, tag)
        got = []

        def poll():
            if got:
                return True
            if h.error is not None:
                raise Aborted(h.error)
            with h.cond:
                q = h.boxes.get(key)
                if q:
                    got.append(q.popleft())
                    if not q:
                        del h.boxes[key]
                    return True
            return False

        def get():
            return got[0]

        return Pending(poll, get)

    def batch(self, ops):
        out = []
        for op in ops:
            if op[0] == "send":
                self.send(*op[1:])
            else:
                out.append(self.post_recv(*op[1:]))
        return out

    def version(self) -> int:
        return self.hub.ver

    def wait_change(self, since: int, timeout: float) -> None:
        h = self.hub
        with h.cond:
            if h.ver == since and h.error is None:
                h.cond.wait(timeout)

    def pending_sends(self) -> list:
        return []

    def all_reduce_start(self, buf):
        """Sum over the replicas, added in replica order (every replica gets the same bits)."""
        h = self.hub
        key = (self.dp_group, self.reduces)
        self.reduces += 1
        with h.cond:
            h.reduce_slots.setdefault(key, {})[self.rank] = buf
            h.ver += 1
            h.cond.notify_all()
        group, got = self.dp_group, []

        def poll():
            if got:
                return True
            if h.error is not None:
                raise Aborted(h.error)
            with h.cond:
                slot = h.reduce_slots[key]
                if len(slot) < len(group):
                    return False
                total = slot[group[0]].clone()
                for r in group[1:]:
                    total += slot[r]
                got.append(total)
                readers = h.reduce_readers.get(key, 0) + 1
                if readers == len(group):
                    del h.reduce_slots[key]
                    h.reduce_readers.pop(key, None)
                else:
                    h.reduce_readers[key] = readers
                return True

        return Pending(poll, lambda: got[0], peer=None)

    def all_gather(self, obj):
        h = self.hub
        h.slots[self.rank] = obj
        try:
            h.barrier.wait(h.timeout)
        except threading.BrokenBarrierError:
            raise Aborted(h.error or "in-process barrier broken (timeout)") from None
        out = list(h.slots)
        try:
            h.barrier.wait(h.timeout)  # only keeps the slots until every rank has read them
        except threading.BrokenBarrierError:
            pass  # every rank has read them (a rank that read them and failed at once broke it): the data stands
        return out


# ------------------------------------------------------------------ torch.distributed
def _pack(tensors):
    if len(tensors) == 1 and tensors[0].is_contiguous():
        return tensors[0].detach().reshape(-1).view(torch.uint8)
    return torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors])


def _unpack(buf, specs):
    out, off = [], 0
    for shape, dtype in specs:
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        out.append(buf[off:off + n].view(dtype).view(shape))
        off += n
    return out


def _nbytes(specs):
    return sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for s, d in specs)


class DistTransport:
    """torch.distributed p2p. Messages are packed into one byte buffer (shapes come from the plan,
    so there is no shape handshake); tags keep concurrent messages of one rank pair apart."""

    kind = "dist"

    def __init__(self, rank: int, world: int, device: torch.device, timeout: float, match: str = "tag",
                 groups: dict | None = None, pp: int | None = None, dp_group=None, wait: str = "watcher"):
        import torch.distributed as dist

        if match not in MATCH_MODES:
            raise ValueError(f"match={match!r}; allowed: {', '.join(MATCH_MODES)}")
        if wait not in WAIT_MODES:
            raise ValueError(f"wait={wait!r}; allowed: {', '.join(WAIT_MODES)}")
        self.match = match
        self.groups = {"p2p": None, **(groups or {})}  # channel -> process group (None: the default one)
        self.dist = dist
        self.backend = dist.get_backend()
        self.rank, self.world, self.device = rank, world, device
        self.base = rank - rank % (pp or world)
        self.dp_group = dp_group
        self.timeout = timeout
        self.sends: list = []  # Pendings of sends until complete
        self.cond = threading.Condition()
        self.ver = 0
        # gloo's p2p Work reports is_completed() only after wait(): a watcher thread per message
        # waits (bounded) and flags it; NCCL's is_completed() polls a CUDA event.
        self.watch = device.type != "cuda"
        self.threads: list[threading.Thread] = []
        self.fifos: dict = {}  # (direction, peer) -> _Fifo (see _watched)
        self.direct = self.watch and wait == "direct"  # see _watched

    def _watched(self, work, result, queue=None):
        """A Pending that becomes ready when `work` completes; result() gives the value.

        On gloo a thread must wait() the Work to learn that it completed. `queue` names a FIFO
        watcher that serves this message after the earlier ones of the same queue (one thread per
        queue, kept for the run); without one the message gets a thread of its own. A FIFO serves the
        plan's p2p messages, keyed (direction, peer): the interpreter waits a peer's receives in the
        order it posts them (program order), so the head of that queue is always the receive it
        needs first, and sends are waited only at the step's end. Starting a thread per message
        cost a rank 15-18 ms per step at p=2 (96 threads, up to 4 ms each while the peer computes).

        wait="direct" (a plan without KV exchanges: nothing to serve while blocked): a queued message
        gets no watcher. Its Pending has block(timeout), in which the waiting rank's own thread
        wait()s the Work, so gloo's completion wakes the rank itself rather than a watcher that then
        wakes the rank: one thread hand-off per message instead of two, which matters when ranks
        share processors (bench/p2p_wait.py). ready() is then true only once block() has returned.
        """
        if not self.watch:
            return Pending(work.is_completed, lambda: (work.wait(), result())[1])
        state = []
        block = None
        if queue is not None and self.direct:
            def block(timeout):
                if not state:  # gloo gives up at the timeout (the Waiter then names the peer)
                    _settle(work, state, max(timeout, 0.001))
        elif queue is not None:
            self._fifo(queue).put(work, state)
        else:
            th = threading.Thread(target=self._finish, args=(work, state), daemon=True)
            th.start()
            self.threads = [t for t in self.threads if t.is_alive()]
            self.threads.append(th)

        def get():
            if state[0] is not None:
                raise PeerLost(self.backend, state[0])
            return result()

        return Pending(lambda: bool(state), get, block=block)

    def _finish(self, work, state) -> None:
        """Wait `work` (bounded), record None or its error in `state`, wake the rank's waits."""
        # later than the interpreter's own deadline, so its timeout (naming the peer) wins
        _settle(work, state, self.timeout * 1.1 + 5)
        with self.cond:
            self.ver += 1
            self.cond.notify_all()

    def _fifo(self, key) -> "_Fifo":
        q = self.fifos.get(key)
        if q is None:
            q = self.fifos[key] = _Fifo(self._finish)
            self.threads.append(q.thread)
        return q

    def _track_send(self, work, buf, dst) -> None:
        """Keep a send in flight (and its buffer alive) until it completes."""
        p = self._watched(work, lambda b=buf: None, ("send", dst))
        p.peer = dst
        self.sends.append(p)

    def _recv_buffer(self, specs):
        return torch.empty(_nbytes(specs), dtype=torch.uint8, device=self.device)

    def _post(self, peers, fn, *args, **kwargs):
        """Post a message (isend, irecv, a batch): gloo raises here once a peer is gone, which
        becomes PeerLost naming the peer(s)."""
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:
            raise PeerLost(self.backend, e, peers) from e

    def channel(self, name: str) -> Channel:
        if name not in self.groups:
            if self.match == "order":  # tagless: sharing the p2p group would interleave the two
                raise ValueError(f"channel {name!r} has no process group (init_dist(kv=True) makes the KV channels)")
            self.groups[name] = None  # matched by tag: the default group keeps them apart
        return Channel(self, name)

    def _tag(self, tag: int) -> int:
        return tag if self.match == "tag" else 0

    def send(self, dst, tag, tensors, channel="p2p"):
        buf = _pack(tensors)
        group = self.groups[channel]
        self._track_send(self._post((dst,), self.dist.isend, buf, self.base + dst, group=group, tag=self._tag(tag)),
                         buf, dst)

    def post_recv(self, src, tag, specs, channel="p2p"):
        buf = self._recv_buffer(specs)
        group = self.groups[channel]
        return self._watched(self._post((src,), self.dist.irecv, buf, self.base + src, group=group,
                                        tag=self._tag(tag)), lambda: _unpack(buf, specs),
                             ("recv", src) if channel == "p2p" else None)

    def batch(self, ops):
        if len(ops) == 1:
            op = ops[0]
            if op[0] == "send":
                self.send(*op[1:])
                return []
            return [self.post_recv(*op[1:])]
        p2p, bufs = [], []
        for kind, peer, tag, payload in ops:
            buf = _pack(payload) if kind == "send" else self._recv_buffer(payload)
            p2p.append(self.dist.P2POp(self.dist.isend if kind == "send" else self.dist.irecv, buf, self.base + peer,
                                       tag=self._tag(tag)))
            bufs.append(buf)
        out = []
        works = self._post(tuple(sorted({op[1] for op in ops})), self.dist.batch_isend_irecv, p2p)
        for work, buf, (kind, peer, _tag, payload) in zip(works, bufs, ops):
            if kind == "send":
                self._track_send(work, buf, peer)
            else:
                out.append(self._watched(work, lambda b=buf, sp=payload: _unpack(b, sp), ("recv", peer)))
        return out

    def version(self) -> int:
        return self.ver

    def wait_change(self, since: int, timeout: float) -> None:
        if not self.watch:
            time.sleep(min(timeout, 0.0002))
            return
        with self.cond:
            if self.ver == since:
                self.cond.wait(timeout)

    def pending_sends(self) -> list:
        self.sends = [p for p in self.sends if not p.ready()]
        out, self.sends = self.sends, []
        return out

    def close(self) -> None:
        """Let the watcher threads finish, then leave the process group. Every part is bounded:
        the joins share one deadline, the barrier has the group's timeout, and the caller's
        supervisor (runner.run_dist) ends the process if destroy_process_group blocks."""
        deadline = time.monotonic() + self.timeout
        for q in self.fifos.values():
            q.close()
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.dist.barrier()
        self.dist.destroy_process_group()

    def all_reduce_start(self, buf):
        """Sum of `buf` over the data-parallel group, in flight; the Pending gives the result."""
        work = self.dist.all_reduce(buf, op=self.dist.ReduceOp.SUM, group=self.dp_group, async_op=True)
        return self._watched(work, lambda: buf)

    def all_gather(self, obj):
        """Every rank's `obj` (JSON-serialisable step-end metrics), in rank order. Plain tensor
        collectives rather than all_gather_object, which needs NumPy (not a dependency)."""
        data = json.dumps(obj).encode()
        size = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world)]
        self.dist.all_gather(sizes, size)
        lengths = [int(x.item()) for x in sizes]
        buf = torch.zeros(max(lengths), dtype=torch.uint8)
        buf[:len(data)] = torch.tensor(list(data), dtype=torch.uint8)
        outs = [torch.empty_like(buf, device=self.device) for _ in range(self.world)]
        self.dist.all_gather(outs, buf.to(self.device))
        return [json.loads(bytes(o[:n].cpu().tolist())) for o, n in zip(outs, lengths)]


def _settle(work, state: list, seconds: float) -> None:
    """Wait a gloo Work for at most `seconds`; append None, or the error it raised (surfaced by the
    Pending's value()), to `state`. The watcher threads (_finish) and a direct wait (block) share it."""
    try:
        work.wait(timedelta(seconds=seconds))
        state.append(None)
    except Exception as e:  # noqa: BLE001 - surfaced by value()
        state.append(e)


class _Fifo:
    """One watcher thread waiting a queue of Works in order (DistTransport._watched)."""

    def __init__(self, finish):
        self.finish, self.items, self.cond = finish, deque(), threading.Condition()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def put(self, work, state) -> None:
        with self.cond:
            self.items.append((work, state))
            self.cond.notify()

    def close(self) -> None:
        """Let the thread end once its queue is empty."""
        self.put(None, None)

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.items:
                    self.cond.wait()
                work, state = self.items.popleft()
            if work is None:
                return
            self.finish(work, state)


def init_dist(rank: int, world: int, device: torch.device, timeout: float, match: str = "tag",
              kv: bool = False, pp: int | None = None, wait: str = "watcher") -> DistTransport:
    """Join the torchrun job: gloo on CPU, NCCL on CUDA, every wait bounded by `timeout`. With `kv`
    (the plan has KV exchanges; every rank reads the same plan, so all agree) the KV channels get
    process groups of their own. With `pp` < world, the ranks form a 2-D device mesh (dp, pp) =
    (world / pp, pp), row-major: global rank = replica * pp + pipeline rank; gradients are reduced
    over the mesh's dp groups. `wait`: how a rank blocks on a gloo message, "direct" or "watcher"
    (DistTransport._watched); a plan with KV exchanges needs "watcher" (ranks serve while they wait)."""
    import torch.distributed as dist

    if kv and wait == "direct":
        raise ValueError("wait='direct' with KV exchanges: their ranks serve requests while they wait; use 'watcher'")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout))
    groups = {}
    if kv:
        for name in CHANNELS[1:]:
            groups[name] = dist.new_group(list(range(world)), timeout=timedelta(seconds=timeout))
    dp_group = None
    if pp is not None and pp < world:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world // pp, pp), mesh_dim_names=("dp", "pp"))
        dp_group = mesh.get_group("dp")
    return DistTransport(rank, world, device, timeout, match, groups, pp, dp_group, wait)
