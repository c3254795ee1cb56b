"""KV exchange: the owner's side (one Exchange per KVF_SEND/KVB_SEND, several per unit allowed,
per-layer requests) and the serving side (a ServeJob per KVF_RECV/KVB_RECV of a partner or
KVF_HELP/KVB_HELP of a helper, answered whenever the rank waits and between the layers of its own
units, so an exchange never needs both ranks to stand at the same instruction).

Each exchange ships the K/V of the owner's tokens [lo, hi) (any range inside the unit's prefix,
across slice boundaries) with the slice's queries; the server computes that non-causal block and
returns out + lse (forward) or dq + dK/dV of the range (backward). Per pair of ranks the messages
are posted in one order on both sides: an owner's requests go out exchange after exchange, and a
server answers the jobs of one owner in the order it agreed to them (one at a time per owner)."""
from __future__ import annotations

import time

import torch

from ir import KV_FWD, Instr


class Exchange:
    """One KV exchange seen from the owner: partner rank, plan tag, shipped tokens [lo, hi)."""

    __slots__ = ("peer", "tag", "lo", "hi", "mb", "slice", "chunk")

    def __init__(self, ins: Instr):
        self.peer, self.tag, self.lo, self.hi = ins.peer, ins.tag, ins.lo, ins.hi
        self.mb, self.slice, self.chunk = ins.mb, ins.slice, ins.chunk


class ServeJob:
    """The serving side of one exchange (partner or helper): answer the owner's per-layer
    requests in order."""

    __slots__ = ("owner", "tag", "fwd", "layers", "order", "pos", "pending", "specs")

    def __init__(self, spec, dtype, ins: Instr):
        cfg = spec.model
        self.owner, self.tag, self.fwd = ins.peer, ins.tag, ins.kind in KV_FWD
        stage = spec.placement[ins.peer][ins.chunk]
        self.layers = spec.stage_layers[stage]
        self.order = list(range(self.layers)) if self.fwd else list(range(self.layers - 1, -1, -1))
        self.pos, self.pending = 0, None
        b, d, dt = spec.micro_batch_size, cfg.head_dim, dtype
        qs = (b, cfg.heads, spec.slice_lens[ins.mb][ins.slice], d)
        ks = ((b, cfg.kv_heads, ins.hi - ins.lo, d), dt)
        if self.fwd:
            self.specs = [(qs, dt), ks, ks]
        else:
            self.specs = [(qs, dt), (qs, dt), (qs[:3], torch.float32), (qs, dt), ks, ks]

    def progress(self, svc: "KVService") -> bool:
        """Serve what has arrived; True if anything moved."""
        moved = False
        while self.pos < len(self.order):
            li = self.order[self.pos]
            if self.pending is None:
                self.pending = svc.requests.post_recv(self.owner, svc.wire(self.tag, li, 0 if self.fwd else 1, 0), self.specs)
            if not self.pending.ready():
                return moved
            parts = self.pending.value()
            self.pending = None
            svc.answer(self, li, parts)
            self.pos += 1
            moved = True
        return moved

    @property
    def done(self) -> bool:
        return self.pos >= len(self.order)


class KVService:
    """This rank's exchanges: requests it sends as owner, and the jobs it serves as partner.

    Requests and replies travel on channels of their own (transport.CHANNELS), and a partner
    serves the exchanges of one owner one after another, in the order it agreed to them (the
    checker's p2p-order rule makes that the owner's order): so each channel carries the messages of
    a rank pair in one order on both sides, which is all NCCL's tagless matching needs."""

    def __init__(self, spec, dtype, transport, wire, backend, scale: float):
        self.spec, self.dtype, self.tp, self.wire, self.backend, self.scale = spec, dtype, transport, wire, backend, scale
        self._channels = None
        self.jobs: list[ServeJob] = []
        # wall seconds this rank has spent answering requests (the attention block and the reply),
        # [forward, backward], over the run: the interpreter takes the differences per instruction
        # (--trace), since a rank serves inside its own units and inside its waits alike
        self.served = [0.0, 0.0]

    @property
    def requests(self):
        return self._channel(0)

    @property
    def replies(self):
        return self._channel(1)

    def _channel(self, i):
        if self._channels is None:  # made at first use: a plan without exchanges has no KV process groups
            self._channels = (self.tp.channel("kvq"), self.tp.channel("kvr"))
        return self._channels[i]

    def reset(self) -> None:
        self.jobs = []

    def agree(self, ins: Instr) -> None:
        """KVF_RECV / KVB_RECV / KVF_HELP / KVB_HELP: serve this exchange from now on."""
        self.jobs.append(ServeJob(self.spec, self.dtype, ins))

    def request(self, ex: Exchange, li, bwd, tensors, reply_specs):
        """Owner side: ship one layer's request; the returned Pending gives the reply."""
        self.requests.send(ex.peer, self.wire(ex.tag, li, bwd, 0), [t.contiguous() for t in tensors])
        return self.replies.post_recv(ex.peer, self.wire(ex.tag, li, bwd, 1), reply_specs)

    def serve(self) -> bool:
        """Answer whatever requests have arrived; True if anything moved."""
        moved = False
        if self.jobs:
            with torch.no_grad():
                busy = set()  # owners with an earlier exchange still open: theirs come first
                for job in self.jobs:
                    if job.owner in busy:
                        continue
                    moved |= job.progress(self)
                    if not job.done:
                        busy.add(job.owner)
            if moved:
                self.jobs = [j for j in self.jobs if not j.done]
        return moved

    def answer(self, job: ServeJob, li, parts) -> None:
        t0 = time.monotonic()
        be, sc = self.backend, self.scale
        if job.fwd:
            q, K, V = parts
            out, lse = be.fwd(q, K, V, False, sc)
            reply = [out.to(q.dtype), lse.float()]
        else:
            q, out, lse, dout, K, V = parts
            dq, dk, dv = be.bwd(dout, q, K, V, out, lse, False, sc)
            reply = [dq.to(q.dtype), dk.to(K.dtype), dv.to(V.dtype)]
        self.replies.send(job.owner, self.wire(job.tag, li, 0 if job.fwd else 1, 1), [t.contiguous() for t in reply])
        self.served[0 if job.fwd else 1] += time.monotonic() - t0

    def owners(self):
        """Whom the open jobs serve: a rank, or 'ranks a, b' (for wait messages)."""
        owners = sorted({j.owner for j in self.jobs})
        return owners[0] if len(owners) == 1 else "ranks " + ", ".join(map(str, owners))

    def all_served(self) -> "AllServed":
        return AllServed(self)


class AllServed:
    """A Pending that is ready once every agreed exchange is served (waiting on it serves them)."""

    block = None  # nothing to block in: the Waiter serves until ready (transport.Pending.block)

    def __init__(self, svc: KVService):
        self.svc = svc

    def ready(self):
        return not self.svc.jobs

    def value(self):
        return None
