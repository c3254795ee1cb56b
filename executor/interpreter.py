"""The schedule runtime of one rank: walks its instruction stream and dispatches each instruction
by kind (a table kind -> handler) to the stage that holds the chunk, the transport, the KV-exchange
service or the optimizer. The stages (stage.py) own buffers and forward/backward of a unit; this
module owns the order, the pairing of KVF_SEND/KVB_SEND with the next F/B, the step's end and
the error location.

Waiting happens in one place (waiting.Waiter), bounded by the timeout: while blocked, the rank
serves the KV-exchange requests it has agreed to (kv.KVService). Every failure inside a step
becomes an ExecError whose text starts with the rank and the instruction
('rank 2 #17 'F mb3 s1 c0': cause'); a failed wait names the rank it waited on. The
fault-injection switch (faults.Injector) acts before an instruction runs.
"""
from __future__ import annotations

import time
from time import thread_time

import torch

from ir import RECVS, Instr, Kind, split_units

from .attention import default_scale
from .data import StepBatches
from .errors import ExecError, InjectedFault, PeerGone, UnitError
from .faults import Injector, Watch, cause
from .kv import Exchange, KVService
from .metrics import ActivationTracker
from .collectives import gather
from .params import GradReducer, Parameters, lr_at
from .reference import reference_check
from .stage import AttentionEnv, Stage
from .transport import Aborted, PeerLost
from .waiting import Waiter
from .wire import WireTags

__all__ = ["ExecError", "InjectedFault", "Rank"]

TIED_TAG = 2 ** 31 - 1  # above every plan message's transport tag (ir.limits: an odd stride never reaches it)


def served_since(served: list, fwd0: float, bwd0: float):
    """[forward s, backward s] of KV requests served since the counters read (fwd0, bwd0)
    (KVService.served), or None when none was."""
    f, b = served[0] - fwd0, served[1] - bwd0
    return [f, b] if f or b else None


class Rank:
    """One rank's runtime: its stages, parameters and optimizer, and the dispatch table."""

    def __init__(self, plan, rank: int, transport, backend, *, device, dtype=torch.float32, lr=1e-3,
                 timeout=300.0, check_reference=False, watch: Watch | None = None, fault=None, fault_at=None,
                 source=None, hf_model: str | None = None, replica: int = 0, replicas: int = 1, train=None,
                 autocast: bool = False, post_ahead: int | None = None):
        """`rank` is the pipeline rank (0..pp-1) of data-parallel replica `replica` of `replicas`;
        `train` (optional) carries the optimizer schedule: warmup, lr_decay, decay_steps, min_lr, clip;
        `post_ahead`: on gloo, receives are posted that many compute units early (post_early; 0: at
        the receive; None: at the start of their run of compute units)."""
        self.plan, self.spec, self.r = plan, plan.spec, rank
        self.replica, self.replicas, self.train, self.lr = replica, replicas, train, lr
        self.stream = plan.ranks[rank]
        self.tp, self.backend, self.device, self.dtype = transport, backend, torch.device(device), dtype
        self.timeout, self.autocast = timeout, autocast
        self.check_reference = check_reference
        self.pc, self.step = -1, 0
        self.watch = watch or Watch(rank)
        self.watch.where = self.here
        self.inject = Injector(fault, fault_at, rank, self.watch, timeout)
        spec = self.spec
        self.wire = WireTags(spec)
        attn_dtype = torch.bfloat16 if autocast else dtype  # what attention and the KV exchange carry
        self.kv = KVService(spec, attn_dtype, transport, self.wire, backend, default_scale(spec.model.head_dim))
        self.waiter = Waiter(transport, self.watch, timeout, self.here, self.kv.serve)
        # gloo matched by tags: receives may be posted post_ahead compute units early (post_early)
        ahead = len(self.stream) if post_ahead is None else post_ahead
        self.post_ahead = ahead if (transport.kind == "dist" and getattr(transport, "watch", False)
                                    and transport.match == "tag") else 0
        # post_early's windows: the compute units in stream order, and after each instruction the first
        # one that is neither a compute unit nor a send/recv (the scan stops there)
        stream, compute, comm = self.stream, self.EARLY_AFTER, self.COMM
        self.units = [x for x, ins in enumerate(stream) if ins.kind in compute]
        self.unit_ord = {x: o for o, x in enumerate(self.units)}
        self.stop_after, nxt = [0] * len(stream), len(stream)
        for x in range(len(stream) - 1, -1, -1):
            self.stop_after[x] = nxt
            if stream[x].kind not in compute and stream[x].kind not in comm:
                nxt = x
        self.posted_to = 0  # receives before this index were posted (post_early) or their run has run
        self.early: dict = {}
        self.hf_model = hf_model
        self.params = Parameters(spec, spec.placement[rank], self.device, dtype, lr, hf_model)
        self.reducer = GradReducer(transport, replicas, self.params.chunks) if replicas > 1 else None
        self.tracker = ActivationTracker(self.params.storage_ptrs())
        self.batches = StepBatches(spec, self.device, source, replica)
        env = AttentionEnv(backend, self.kv.scale, self.kv, self.waiter.wait)
        self.stages = [Stage(spec, s, c, self.params.chunks[c], device=self.device, dtype=dtype, tracker=self.tracker,
                             env=env, batches=self.batches, autocast=autocast)
                       for c, s in enumerate(spec.placement[rank])]
        by_index = {st.index: st for st in self.stages}
        for st in self.stages:
            st.next_local = by_index.get(st.index + 1)
            st.prev_local = by_index.get(st.index - 1)
        for mb, s, c in split_units(self.stream):  # their forward keeps a WeightGradStore
            if 0 <= c < len(self.stages):
                self.stages[c].split_units.add((mb, s))
        self.holds_last = any(st.is_last for st in self.stages)
        self.report: dict = {}

    # ------------------------------------------------------------------ location
    def where(self, i) -> str:
        n = len(self.stream)
        me = f"rank {self.r}" if self.replicas == 1 else f"rank {self.r} of replica {self.replica}"
        if 0 <= i < n:
            return f"{me} #{i} '{self.stream[i]}'"
        return f"{me} (end of step, after #{n - 1})" if i >= n else me

    def here(self) -> str:
        return self.where(self.pc)

    def act_spec(self, mb, s):
        return [((self.spec.micro_batch_size, self.spec.slice_lens[mb][s], self.spec.model.hidden), self.dtype)]

    # ------------------------------------------------------------------ handlers
    def forward(self, ins: Instr):
        mb, s, c = ins.mb, ins.slice, ins.chunk
        if self.opt_done:
            raise UnitError("runs after this step's OPT: the optimizer step must follow every backward of the step")
        stage = self.stages[c]
        if stage.has_unit(mb, s) or stage.ran_backward(mb, s):
            raise UnitError("this unit's forward already ran in this step")
        kvf, self.next_kvf = self.next_kvf, []
        if any((e.mb, e.slice, e.chunk) != (mb, s, c) for e in kvf):
            raise UnitError("a preceding KVF_SEND names another unit")
        loss = stage.forward(mb, s, kvf)
        if loss is not None:
            self.loss_sum += loss

    def backward(self, ins: Instr):
        mb, s, c = ins.mb, ins.slice, ins.chunk
        if self.opt_done:
            raise UnitError("runs after this step's OPT, so its gradient would miss the optimizer step (OPT must "
                            "follow every backward of the step)")
        stage = self.stages[c]
        if stage.ran_backward(mb, s):
            raise UnitError("this unit's backward already ran in this step")
        if not stage.has_unit(mb, s):
            raise UnitError(f"its forward 'F mb{mb} s{s} c{c}' has not run (a backward needs its unit's forward first)")
        kvb, self.next_kvb = self.next_kvb, []
        if any((e.mb, e.slice, e.chunk) != (mb, s, c) for e in kvb):
            raise UnitError("a preceding KVB_SEND names another unit")
        stage.backward(mb, s, kvb, split=ins.kind == Kind.I)

    def weight(self, ins: Instr):
        if self.opt_done:
            raise UnitError("runs after this step's OPT, so its weight gradient would miss the optimizer step (OPT "
                            "must follow every backward of the step)")
        self.stages[ins.chunk].backward_weight(ins.mb, ins.slice)

    def kvf_send(self, ins):  # several may precede one unit: one per partner or helper
        self.next_kvf.append(Exchange(ins))

    def kvb_send(self, ins):
        self.next_kvb.append(Exchange(ins))

    def kv_recv(self, ins):
        self.kv.agree(ins)

    def reduce_grad(self, ins):
        """REDUCE_GRAD c: chunk c's last backward is done; average its gradients over the replicas
        while the rest of the step runs (a no-op without data parallelism)."""
        if self.reducer is not None:
            self.reducer.start(ins.chunk)

    def opt(self, ins):
        if self.opt_done:
            raise UnitError("a second OPT in one step (every rank holding parameters runs exactly one OPT per step)")
        self.close_compute()
        t = self.train
        lr = None
        if t is not None:
            if t.clip > 0:
                norm = self.global_grad_norm()
                self.figures["grad_norm"] = norm
                if norm > t.clip:
                    self.params.scale_grads(t.clip / (norm + 1e-6))
            lr = lr_at(self.step, self.lr, t.warmup, t.lr_decay, t.decay_steps, t.min_lr)
            self.figures["lr"] = lr
        self.params.step(lr)
        self.opt_done = True

    def global_grad_norm(self) -> float:
        """The gradient norm over all pipeline ranks (of one replica: after averaging, the
        replicas hold the same gradients); the same value on every rank."""
        rows = gather(self.tp, self.watch, self.timeout, self.params.grad_sq_norm(),
                      "the exchange of gradient norms (gradient clipping)")
        p = self.spec.pp
        return sum(rows[:p]) ** 0.5

    HANDLERS = {
        Kind.F: forward,
        Kind.B: backward,
        Kind.I: backward,
        Kind.W: weight,
        Kind.KVF_SEND: kvf_send,
        Kind.KVB_SEND: kvb_send,
        Kind.KVF_RECV: kv_recv,
        Kind.KVB_RECV: kv_recv,
        Kind.KVF_HELP: kv_recv,  # a helper serves like a partner; it has no unit of its own to run
        Kind.KVB_HELP: kv_recv,
        Kind.OPT: opt,
        Kind.REDUCE_GRAD: reduce_grad,
    }
    COMM = frozenset({Kind.SEND_ACT, Kind.SEND_GRAD, Kind.RECV_ACT, Kind.RECV_GRAD})
    EARLY_AFTER = frozenset({Kind.F, Kind.B, Kind.I, Kind.W})  # compute units: post_early before them

    # ------------------------------------------------------------------ communication
    def comm_run(self, start: int, end: int):
        """Issue a run of consecutive send/recv instructions as one batch, then wait the receives.
        Timing (--trace): the run's instructions share the posting time evenly, in program order;
        a receive's event then lasts until its data is there."""
        ops, recv_at = [], []
        early = {x: self.early.pop(x) for x in range(start, end) if x in self.early}
        t_post = time.monotonic()
        for i in range(start, end):
            ins = self.stream[i]
            k = ins.kind
            self.pc = i
            self.inject(i, self.step, self.here)
            stage = self.stages[ins.chunk]
            if k == Kind.SEND_ACT:
                ops.append(("send", ins.peer, self.wire(ins.tag, -1), [stage.output(ins.mb, ins.slice)]))
            elif k == Kind.SEND_GRAD:
                ops.append(("send", ins.peer, self.wire(ins.tag, -1), [stage.take_input_grad(ins.mb, ins.slice)]))
            elif i not in early:
                ops.append(self.recv_op(ins))
                recv_at.append(i)
        pend = dict(zip(recv_at, self.tp.batch(ops))) if ops else {}  # a peer already gone: PeerLost, reported by run_step
        pend.update(early)
        share = (time.monotonic() - t_post) / (end - start)
        cursor = t_post
        sv = self.kv.served
        for i in range(start, end):  # program order; a receive's event lasts until its data is there
            ins = self.stream[i]
            served = None
            if i in pend:
                self.pc = i
                what = "activation" if ins.kind == Kind.RECV_ACT else "gradient"
                f0, b0 = sv
                (t,) = self.waiter.wait(pend[i], f"its {what}", ins.peer)
                served = served_since(sv, f0, b0)
                stage = self.stages[ins.chunk]
                dest = stage.acts_in if ins.kind == Kind.RECV_ACT else stage.grads_in
                dest[(ins.mb, ins.slice)] = t
                done = max(cursor + share, time.monotonic())
            else:
                done = cursor + share
            self.events.append([i, cursor, done, None, served])
            cursor = done

    def comm_end(self, i: int) -> int:
        """The end (exclusive) of the run of send/recv instructions starting at i (i itself if none)."""
        stream, n, comm = self.stream, len(self.stream), self.COMM
        while i < n and stream[i].kind in comm:
            i += 1
        return i

    def recv_op(self, ins):
        return ("recv", ins.peer, self.wire(ins.tag, -1), self.act_spec(ins.mb, ins.slice))

    def post_early(self, i: int) -> None:
        """Before compute instruction i: post the receives of the comm runs after the next
        post_ahead compute units (i included) that are not posted yet. gloo moves a message when
        both sides have posted it; a receive posted after its send makes the sender's gloo thread
        wake up and push the data while that rank computes, and the receiver's irecv call blocks
        until it has (2-5 ms, a timeslice, with both ranks computing on two cores; 2.9 ms median at
        p=4), against 0.1 ms for a receive already waiting. Receives stay posted in program order
        (the per-peer watchers rely on it): the scan stops at the first instruction that is neither
        a compute unit nor a send/recv, and comm_run posts what was not posted. Sends still go when
        their data exists. A receive buffer is allocated up to post_ahead units early; with all (the
        default) every receive of a run of compute units is posted when the run starts, which left
        0.5-4.7 ms per step between a rank's instructions on fidelity's cases, against 0.8-27 ms with
        one unit (bench/results/post_ahead.json; slimpipe 7-9 ms either way). O(receives posted) per
        call: posted_to marks what was posted."""
        if not self.post_ahead:
            return
        stream, units = self.stream, self.units
        o = self.unit_ord[i] + self.post_ahead - 1  # the last unit of the window
        stop = self.stop_after[i]
        last = units[o] if o < len(units) else len(stream)
        target = stop if last >= stop else self.comm_end(last + 1)
        lo, self.posted_to = max(self.posted_to, i + 1), max(self.posted_to, target)
        recvs = [x for x in range(lo, target) if stream[x].kind in RECVS]
        if recvs:
            self.early.update(zip(recvs, self.tp.batch([self.recv_op(stream[x]) for x in recvs])))

    # ------------------------------------------------------------------ step
    def sync_tied(self):
        """Tied embeddings with the embedding (stage 0) and the LM head (last stage) on two ranks: each
        holds a copy; they swap gradients and both add them (a + b == b + a exactly), so the copies
        take the same optimizer step and stay equal. Posted after all of the step's plan messages
        on both ranks, so per-pair posting order matches too."""
        cfg, owner = self.spec.model, self.spec.stage_rank()
        if not cfg.tie_embeddings or owner[0] == owner[-1] or self.r not in (owner[0], owner[-1]):
            return
        peer = owner[-1] if self.r == owner[0] else owner[0]
        p = next(P["embed"] for P in self.params.chunks if "embed" in P)
        g = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        (pend,) = self.tp.batch([("send", peer, TIED_TAG, [g]), ("recv", peer, TIED_TAG, [(tuple(p.shape), p.dtype)])])
        (other,) = self.waiter.wait(pend, "its gradient of the tied embedding", peer)
        p.grad = g + other

    def close_compute(self):
        """Serve what is still owed to others; every unit must have run its backward; on step 1,
        the reference check (the gradients are complete now, before any optimizer step)."""
        self.waiter.wait(self.kv.all_served(), "the requests of a KV exchange it agreed to serve", self.kv.owners)
        for st in self.stages:
            k = st.first_pending()
            if k is not None:
                raise ExecError(f"{self.here()}: the unit 'F mb{k[0]} s{k[1]} c{st.chunk}' ran forward but its "
                                f"backward has not run (the optimizer step needs every gradient of the step)")
            if st.wstores:
                k = sorted(st.wstores)[0]
                raise ExecError(f"{self.here()}: the unit 'I mb{k[0]} s{k[1]} c{st.chunk}' ran its input-gradient "
                                f"backward but its W has not run (its weight gradients are missing)")
        if self.reducer is not None:
            self.reducer.finish(self.waiter.wait)
        self.sync_tied()
        if self.check_reference and self.step == 0:
            src = self.batches.source
            self.report.update(reference_check(self.spec, self.params.chunks, self.step, self.device,
                                               lambda mb, d: src.batch(self.step, mb, d), self.hf_model,
                                               self.replicas, self.dtype, self.autocast))

    def run_step(self, step: int) -> dict:
        """Run the stream once; returns this rank's step figures."""
        self.step, self.loss_sum, self.pc = step, 0.0, 0
        for st in self.stages:
            st.reset()
        self.kv.reset()
        self.batches.begin(step)
        self.next_kvf, self.next_kvb = [], []
        self.opt_done = False
        self.figures: dict = {}
        self.tracker.reset_peak()
        # [index, start, end, CPU seconds of this thread or None, KV requests served meanwhile: [forward s,
        # backward s] or None] of every executed instruction (start and end: time.monotonic, one clock for
        # the machine's processes; CPU time shows what a busy machine hid); served_after: [forward s,
        # backward s] served after the last instruction (the step's close)
        self.events, self.served_after = [], None
        if self.device.type == "cuda" and self.tp.kind == "dist":  # in-process ranks share the device
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        m0 = time.monotonic()
        # CPU of the step: the whole process (compute thread, gloo's threads, the watchers) and the
        # compute thread, where the rank is a process of its own (not with --local's threads)
        p0 = time.process_time() if self.tp.kind == "dist" else None
        c0 = thread_time()
        try:
            self._run_stream()
        except ExecError:
            raise
        except UnitError as e:  # a stage refused the instruction: name it
            raise ExecError(f"{self.here()}: {e}") from None
        except Aborted as e:  # in-process: another rank failed while this one was serving
            raise ExecError(f"{self.here()}: stopped: {e}") from None
        except PeerLost as e:  # posting a message (p2p or KV exchange) to a rank that is gone
            raise PeerGone(f"{self.here()}: lost the connection to {e.who} while posting a message "
                           f"to it ({e})") from e
        except Exception as e:  # noqa: BLE001 - any failure of an instruction: one line naming it
            raise ExecError(f"{self.here()}: {cause(e)}") from e
        c1 = thread_time()  # before the process's: its interval holds the thread's
        cpu = None if p0 is None else [time.process_time() - p0, c1 - c0]
        out = {"seconds": time.perf_counter() - t0, "loss": self.loss_sum, "peak_activation_bytes": self.tracker.peak,
               "events": self.events, "span": [m0, time.monotonic()], "cpu": cpu,
               "served_after": self.served_after, **self.figures}
        if self.device.type == "cuda":
            out["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated(self.device)
        return out

    def _run_stream(self):
        stream, n, H, comm = self.stream, len(self.stream), self.HANDLERS, self.COMM
        inject, serve, events, early = self.inject, self.kv.serve, self.events, self.post_ahead
        sv = self.kv.served
        self.early, self.posted_to = {}, 0
        i = 0
        while i < n:
            k = stream[i].kind
            if k in comm:
                j = self.comm_end(i)
                self.comm_run(i, j)
                i = j
                continue
            self.pc = i
            inject(i, self.step, self.here)
            if early and k in self.EARLY_AFTER:
                self.post_early(i)
            t0, c0 = time.monotonic(), thread_time()
            f0, b0 = sv
            H[k](self, stream[i])
            serve()
            events.append([i, t0, time.monotonic(), thread_time() - c0, served_since(sv, f0, b0)])
            i += 1
        self.pc = n
        f0, b0 = sv
        if not self.opt_done:
            self.close_compute()
            if self.params.flat:
                raise ExecError(f"{self.here()}: the step ended without an OPT instruction, so this rank's "
                                f"parameters were never updated (every rank holding parameters runs exactly one "
                                f"OPT per step, after its last backward)")
        for p in self.tp.pending_sends():
            self.waiter.wait(p, "a send to complete", getattr(p, "peer", None))
        self.served_after = served_since(sv, f0, b0)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
