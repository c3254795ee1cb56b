"""The per-rank interpreter: walks one rank's instruction stream with a dispatch table.

State is keyed by unit (micro-batch, slice, chunk): the unit's input leaf and output (kept for its
backward), received activations/gradients, and per (micro-batch, chunk) and layer the K/V of each
slice (a list per slice, never concatenated) and the dK/dV accumulated for earlier slices by later
slices' backwards. Everything of a unit is dropped as soon as its backward is done.

Waiting happens in one place, `Rank.wait`, bounded by the timeout: while blocked, a rank serves
the KV-exchange requests it has agreed to (KVF_RECV/KVB_RECV), so an exchange never needs both
ranks to stand at the same instruction. Every failure inside a step becomes an ExecError whose
text starts with the rank and the instruction ('rank 2 #17 'F mb3 s1 c0': cause'); a failed wait
names the rank it waited on. The fault-injection switch (faults.py) acts at the top of the loop.
"""
from __future__ import annotations

import time

import torch

from ir import Instr, Kind, SlimpipeError

from .faults import FAULT_ENV, Watch, cause, die
from .transport import Aborted, PeerLost

from . import model as M
from .attention import SliceAttention, default_scale
from .metrics import ActivationTracker


class ExecError(SlimpipeError):
    """A plan cannot be run as written (a missing buffer, a timeout): one line, exit 1."""

    exit_code = 1


class InjectedFault(RuntimeError):
    """The failure SLIMPIPE_FAULT asked for (action=fail)."""


class Exchange:
    """One KV exchange seen from the owner: partner rank, plan tag, shipped prefix slices x."""

    __slots__ = ("peer", "tag", "x", "mb", "slice", "chunk")

    def __init__(self, ins: Instr):
        self.peer, self.tag, self.x = ins.peer, ins.tag, ins.x
        self.mb, self.slice, self.chunk = ins.mb, ins.slice, ins.chunk


class Unit:
    """A forward unit kept for its backward."""

    __slots__ = ("x", "y", "kvf", "kvb")

    def __init__(self):
        self.x = self.y = self.kvf = self.kvb = None


class LayerCtx:
    """What SliceAttention needs for one (unit, layer): backend, earlier slices' K/V, where
    their gradients go, and the unit's exchanges."""

    __slots__ = ("rank", "unit", "li", "prefix", "acc", "backend", "scale", "key")

    def __init__(self, rank, unit, li, prefix, acc, key):
        self.rank, self.unit, self.li, self.prefix, self.acc, self.key = rank, unit, li, prefix, acc, key
        self.backend, self.scale = rank.backend, rank.scale

    def fwd_remote_slices(self):
        return self.unit.kvf.x if self.unit.kvf is not None else 0

    def bwd_remote_slices(self):
        return self.unit.kvb.x if self.unit.kvb is not None else 0

    def fwd_remote_start(self, q, prefix):
        return self.rank.kv_request(self.unit.kvf, self.li, 0, [q] + [k for k, _ in prefix] + [v for _, v in prefix],
                                    [(q.shape, q.dtype), (q.shape[:3], torch.float32)])

    def fwd_remote_finish(self, h):
        return self.rank.wait(h, "its KV-exchange forward reply", self.unit.kvf.peer)

    def bwd_remote_start(self, q, prefix, out, lse, dout):
        ks, vs = [k for k, _ in prefix], [v for _, v in prefix]
        specs = [(q.shape, q.dtype)] + [(k.shape, k.dtype) for k in ks] + [(v.shape, v.dtype) for v in vs]
        return self.rank.kv_request(self.unit.kvb, self.li, 1, [q, out, lse, dout.to(q.dtype)] + ks + vs, specs)

    def bwd_remote_finish(self, h):
        parts = self.rank.wait(h, "its KV-exchange backward reply", self.unit.kvb.peer)
        x = (len(parts) - 1) // 2
        return parts[0].float(), parts[1:1 + x], parts[1 + x:]

    def accumulate(self, i, dk, dv):
        slot = self.acc[i]
        if slot is None:
            # own copies: the parts may be views of a receive buffer, and later adds are in place
            dk = dk.to(self.prefix[i][0].dtype, copy=True).contiguous()
            dv = dv.to(self.prefix[i][1].dtype, copy=True).contiguous()
            self.acc[i] = [dk, dv]
            owner = ("acc", self.key[0], i, self.key[1])
            self.rank.tracker.add(owner, dk)
            self.rank.tracker.add(owner, dv)
        else:
            slot[0].add_(dk)
            slot[1].add_(dv)


class ServeJob:
    """The partner side of one exchange: answer the owner's per-layer requests in order."""

    __slots__ = ("owner", "tag", "fwd", "layers", "order", "pos", "pending", "specs")

    def __init__(self, rank, ins: Instr):
        spec = rank.spec
        cfg = spec.model
        self.owner, self.tag, self.fwd = ins.peer, ins.tag, ins.kind == Kind.KVF_RECV
        stage = spec.placement[ins.peer][ins.chunk]
        self.layers = spec.stage_layers[stage]
        self.order = list(range(self.layers)) if self.fwd else list(range(self.layers - 1, -1, -1))
        self.pos, self.pending = 0, None
        b, d, dt = spec.micro_batch_size, cfg.head_dim, rank.dtype
        lens = spec.slice_lens[ins.mb]
        qs = (b, cfg.heads, lens[ins.slice], d)
        ks = [((b, cfg.kv_heads, lens[i], d), dt) for i in range(ins.x)]
        if self.fwd:
            self.specs = [(qs, dt)] + ks + ks
        else:
            self.specs = [(qs, dt), (qs, dt), (qs[:3], torch.float32), (qs, dt)] + ks + ks

    def progress(self, rank) -> bool:
        """Serve what has arrived; True if anything moved."""
        moved = False
        while self.pos < len(self.order):
            li = self.order[self.pos]
            if self.pending is None:
                self.pending = rank.tp.post_recv(self.owner, rank.wire(self.tag, li, 0 if self.fwd else 1, 0), self.specs)
            if not self.pending.ready():
                return moved
            parts = self.pending.value()
            self.pending = None
            rank.kv_serve(self, li, parts)
            self.pos += 1
            moved = True
        return moved

    @property
    def done(self) -> bool:
        return self.pos >= len(self.order)


class Rank:
    """One rank's runtime: its stages' parameters, optimizer, buffers and the dispatch table."""

    def __init__(self, plan, rank: int, transport, backend, *, device, dtype=torch.float32, lr=1e-3,
                 timeout=300.0, check_reference=False, watch: Watch | None = None, fault=None, fault_at=None):
        self.plan, self.spec, self.r = plan, plan.spec, rank
        self.stream = plan.ranks[rank]
        self.tp, self.backend, self.device, self.dtype = transport, backend, torch.device(device), dtype
        self.timeout = timeout
        self.check_reference = check_reference
        self.pc, self.step = -1, 0
        self.watch = watch or Watch(rank)
        self.watch.where = lambda: self.where(self.pc)
        self.fault = fault
        self.fault_at = fault_at if fault is not None else None  # instruction index on this rank, or None
        spec = self.spec
        cfg = spec.model
        self.scale = default_scale(cfg.head_dim)
        self.stages = list(spec.placement[rank])
        owner = spec.stage_rank()
        self.stage_chunk = spec.stage_chunk()
        self.last = spec.num_stages - 1
        self.first_layer = spec.stage_first_layer()
        self.local_next = [s < self.last and owner[s + 1] == rank for s in self.stages]
        self.local_prev = [s > 0 and owner[s - 1] == rank for s in self.stages]
        self.params = [{n: M.init_param(cfg, n, spec.seed, self.device, dtype) for n in M.stage_param_names(spec, s)}
                       for s in self.stages]
        flat = [p for P in self.params for p in P.values()]
        self.optimizer = torch.optim.AdamW(flat, lr=lr) if flat else None
        self.tracker = ActivationTracker(p.untyped_storage().data_ptr() for p in flat)
        self.report: dict = {}

    # ------------------------------------------------------------------ helpers
    def wire(self, tag: int, li: int = 0, bwd: int = 0, reply: int = 0) -> int:
        """Transport tag: plan tags spaced out so each KV message of each layer has its own."""
        sub = 0 if li < 0 else 1 + 4 * li + 2 * bwd + reply
        return tag * (4 * max(self.spec.stage_layers) + 1) + sub

    def act_spec(self, mb, s):
        return [((self.spec.micro_batch_size, self.spec.slice_lens[mb][s], self.spec.model.hidden), self.dtype)]

    def where(self, i) -> str:
        n = len(self.stream)
        if 0 <= i < n:
            return f"rank {self.r} #{i} '{self.stream[i]}'"
        return f"rank {self.r} (end of step, after #{n - 1})" if i >= n else f"rank {self.r}"

    def wait(self, pending, what: str, peer):
        """The one blocking point: poll, serve KV requests meanwhile, give up after the timeout.
        `peer` (a rank, or a callable giving rank(s)) is named when the wait fails."""
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
                    raise ExecError(f"{self.where(self.pc)}: stopped waiting{watch.peer_text()} for {what}: {e}") from None
                except Exception as e:  # noqa: BLE001 - the transport lost the peer (gloo: connection closed)
                    why = f"({e})" if isinstance(e, PeerLost) else f"({cause(e)})"
                    raise ExecError(f"{self.where(self.pc)}: lost the connection while waiting{watch.peer_text()} "
                                    f"for {what} {why}") from e
                if self.serve():
                    continue
                if time.monotonic() > deadline:
                    raise ExecError(f"{self.where(self.pc)}: timed out after {self.timeout:g} s waiting{watch.peer_text()} "
                                    f"for {what}")
                tp.wait_change(v, 0.05)
        finally:
            watch.unblock()

    def inject(self):
        """Act out SLIMPIPE_FAULT at the current instruction (only in the step it names)."""
        f = self.fault
        if self.step != f.step - 1:
            return
        here = self.where(self.pc)
        if f.action == "fail":
            raise InjectedFault(f"{FAULT_ENV}='{f.text}'")
        if f.action == "exit":
            die(self.r, f"{here}: injected crash ({FAULT_ENV}='{f.text}'): exiting at once with code 3", 3)
        self.watch.block(f"the end of an injected delay of {f.seconds:g} s", None, f.seconds + self.timeout)
        try:
            time.sleep(f.seconds)
        finally:
            self.watch.unblock()

    def serve(self) -> bool:
        moved = False
        if self.jobs:
            with torch.no_grad():
                for job in self.jobs:
                    moved |= job.progress(self)
            if moved:
                self.jobs = [j for j in self.jobs if not j.done]
        return moved

    # ------------------------------------------------------------------ KV exchange
    def kv_request(self, ex: Exchange, li, bwd, tensors, reply_specs):
        self.tp.send(ex.peer, self.wire(ex.tag, li, bwd, 0), [t.contiguous() for t in tensors])
        return self.tp.post_recv(ex.peer, self.wire(ex.tag, li, bwd, 1), reply_specs)

    def kv_serve(self, job: ServeJob, li, parts):
        be, sc = self.backend, self.scale
        if job.fwd:
            x = (len(parts) - 1) // 2
            q, K, V = parts[0], torch.cat(parts[1:1 + x], 2), torch.cat(parts[1 + x:], 2)
            out, lse = be.fwd(q, K, V, False, sc)
            reply = [out.to(q.dtype), lse.float()]
        else:
            q, out, lse, dout = parts[:4]
            ks = parts[4:]
            x = len(ks) // 2
            lens = [k.shape[2] for k in ks[:x]]
            K, V = torch.cat(ks[:x], 2), torch.cat(ks[x:], 2)
            dq, dk, dv = be.bwd(dout, q, K, V, out, lse, False, sc)
            reply = [dq.to(q.dtype)] + list(dk.split(lens, 2)) + list(dv.split(lens, 2))
        self.tp.send(job.owner, self.wire(job.tag, li, 0 if job.fwd else 1, 1), [t.contiguous() for t in reply])

    # ------------------------------------------------------------------ compute
    def attend(self, lc: LayerCtx, s: int, q, k, v):
        cache = self.kv[lc.key][lc.li]
        cache[s] = (k, v)
        self.tracker.add(("u", lc.key[0], s, lc.key[1]), k)
        self.tracker.add(("u", lc.key[0], s, lc.key[1]), v)
        lc.prefix = [(kk.detach(), vv.detach()) for kk, vv in cache[:s]]
        return SliceAttention.apply(q.contiguous(), k, v, lc)

    def forward(self, ins: Instr):
        mb, s, c = ins.mb, ins.slice, ins.chunk
        spec, cfg = self.spec, self.spec.model
        stage = self.stages[c]
        key = (mb, s, c)
        if key in self.units:
            raise ExecError(f"{self.where(self.pc)}: unit already ran forward")
        u = self.units[key] = Unit()
        u.kvf, self.next_kvf = self.next_kvf, None
        if u.kvf is not None and (u.kvf.mb, u.kvf.slice, u.kvf.chunk, ins.kind) != (mb, s, c, Kind.F):
            raise ExecError(f"{self.where(self.pc)}: the preceding KVF_SEND names another unit")
        off, ln = spec.slice_offsets(mb)[s], spec.slice_lens[mb][s]
        P = self.params[c]
        owner = ("u", mb, s, c)
        tr = self.tracker

        def pack(t):
            tr.add(owner, t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if stage == 0:
                tok = self.tokens(mb)
                x = P["embed"][tok[:, off:off + ln]]
            else:
                x = self.acts_in.pop(key, None)
                if x is None:
                    raise ExecError(f"{self.where(self.pc)}: no input activation (missing RECV_ACT?)")
                x = x.detach().requires_grad_(True)
                u.x = x
            kv_key = (mb, c)
            if kv_key not in self.kv:
                L = spec.stage_layers[stage]
                self.kv[kv_key] = [[None] * spec.slices for _ in range(L)]
                self.acc[kv_key] = [[None] * spec.slices for _ in range(L)]
            cos, sin = M.rope_tables(cfg.head_dim, off, ln, self.device, self.dtype)
            first = self.first_layer[stage]
            for li in range(spec.stage_layers[stage]):
                lc = LayerCtx(self, u, li, None, self.acc[kv_key][li], kv_key)
                x = M.layer_forward(P, first + li, cfg, x, cos, sin, lambda q, k, v, lc=lc: self.attend(lc, s, q, k, v))
            if stage == self.last:
                tok = self.tokens(mb)
                denom = spec.micro_batch_size * spec.seq_len * spec.microbatches
                x = M.head_loss(P, x, tok[:, 1 + off:1 + off + ln], denom)
                self.loss_sum += float(x.detach())
        u.y = x
        if self.local_next[c]:
            self.acts_in[(mb, s, self.stage_chunk[stage + 1])] = x.detach()

    def backward(self, ins: Instr):
        mb, s, c = ins.mb, ins.slice, ins.chunk
        key = (mb, s, c)
        u = self.units.pop(key, None)
        if u is None:
            raise ExecError(f"{self.where(self.pc)}: backward before its forward")
        u.kvb, self.next_kvb = self.next_kvb, None
        if u.kvb is not None and (u.kvb.mb, u.kvb.slice, u.kvb.chunk) != (mb, s, c):
            raise ExecError(f"{self.where(self.pc)}: the preceding KVB_SEND names another unit")
        stage = self.stages[c]
        if stage == self.last:
            roots, grads = [u.y], [torch.ones_like(u.y)]
        else:
            dy = self.grads_in.pop(key, None)
            if dy is None:
                raise ExecError(f"{self.where(self.pc)}: no output gradient (missing RECV_GRAD?)")
            roots, grads = [u.y], [dy]
        kv_key = (mb, c)
        caches, accs = self.kv[kv_key], self.acc[kv_key]
        for li in range(len(caches)):
            a = accs[li][s]
            if a is not None:
                k, v = caches[li][s]
                roots += [k, v]
                grads += a
        torch.autograd.backward(roots, grads)
        for li in range(len(caches)):
            caches[li][s] = None
            accs[li][s] = None
        self.tracker.release(("u", mb, s, c))
        self.tracker.release(("acc", mb, s, c))
        if s == 0:
            del self.kv[kv_key], self.acc[kv_key]
        if stage > 0:
            g = u.x.grad
            if self.local_prev[c]:
                self.grads_in[(mb, s, self.stage_chunk[stage - 1])] = g
            else:
                self.grads_out[key] = g
        u.x = u.y = None

    def tokens(self, mb):
        t = self.tok_cache.get(mb)
        if t is None:
            t = self.tok_cache[mb] = M.batch_tokens(self.spec, self.step, mb, self.device)
        return t

    # ------------------------------------------------------------------ communication
    def comm_run(self, start: int, end: int):
        """Issue a run of consecutive send/recv instructions as one batch, then wait the receives."""
        ops, recv_at = [], []
        for i in range(start, end):
            ins = self.stream[i]
            k = ins.kind
            key = (ins.mb, ins.slice, ins.chunk)
            self.pc = i
            if i == self.fault_at:
                self.inject()
            if k == Kind.SEND_ACT:
                u = self.units.get(key)
                if u is None or u.y is None:
                    raise ExecError(f"{self.where(i)}: nothing to send (its forward has not run)")
                ops.append(("send", ins.peer, self.wire(ins.tag, -1), [u.y.detach()]))
            elif k == Kind.SEND_GRAD:
                g = self.grads_out.pop(key, None)
                if g is None:
                    raise ExecError(f"{self.where(i)}: nothing to send (its backward has not run)")
                ops.append(("send", ins.peer, self.wire(ins.tag, -1), [g]))
            else:
                ops.append(("recv", ins.peer, self.wire(ins.tag, -1), self.act_spec(ins.mb, ins.slice)))
                recv_at.append(i)
        pend = self.tp.batch(ops)  # a peer already gone: PeerLost, reported by run_step
        for i, p in zip(recv_at, pend):
            self.pc = i
            ins = self.stream[i]
            what = "activation" if ins.kind == Kind.RECV_ACT else "gradient"
            (t,) = self.wait(p, f"its {what}", ins.peer)
            dest = self.acts_in if ins.kind == Kind.RECV_ACT else self.grads_in
            dest[(ins.mb, ins.slice, ins.chunk)] = t

    # ------------------------------------------------------------------ other instructions
    def kvf_send(self, ins):
        self.next_kvf = Exchange(ins)

    def kvb_send(self, ins):
        self.next_kvb = Exchange(ins)

    def kv_recv(self, ins):
        self.jobs.append(ServeJob(self, ins))

    def opt(self, ins):
        self.close_compute()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.opt_done = True

    def _owners(self):
        owners = sorted({j.owner for j in self.jobs})
        return owners[0] if len(owners) == 1 else "ranks " + ", ".join(map(str, owners))

    def close_compute(self):
        """Serve what is still owed to others; every unit must have run its backward; on step 1,
        the reference check (the gradients are complete now, before any optimizer step)."""
        self.wait(_JobsDone(self), "the requests of a KV exchange it agreed to serve", self._owners)
        if self.units:
            k = sorted(self.units)[0]
            raise ExecError(f"rank {self.r}: unit mb{k[0]} s{k[1]} c{k[2]} never ran backward")
        if self.check_reference and self.step == 0:
            self.report.update(self.reference_check())

    # ------------------------------------------------------------------ step
    HANDLERS = {
        Kind.F: forward,
        Kind.B: backward,
        Kind.KVF_SEND: kvf_send,
        Kind.KVB_SEND: kvb_send,
        Kind.KVF_RECV: kv_recv,
        Kind.KVB_RECV: kv_recv,
        Kind.OPT: opt,
    }
    COMM = frozenset({Kind.SEND_ACT, Kind.SEND_GRAD, Kind.RECV_ACT, Kind.RECV_GRAD})

    def run_step(self, step: int) -> dict:
        """Run the stream once; returns this rank's step figures."""
        self.step, self.loss_sum, self.pc = step, 0.0, 0
        self.units, self.acts_in, self.grads_in, self.grads_out = {}, {}, {}, {}
        self.kv, self.acc, self.jobs, self.tok_cache = {}, {}, [], {}
        self.next_kvf = self.next_kvb = None
        self.opt_done = False
        self.tracker.reset_peak()
        if self.device.type == "cuda" and self.tp.kind == "dist":  # in-process ranks share the device
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        try:
            self._run_stream()
        except ExecError:
            raise
        except Aborted as e:  # in-process: another rank failed while this one was serving
            raise ExecError(f"{self.where(self.pc)}: stopped: {e}") from None
        except PeerLost as e:  # posting a message (p2p or KV exchange) to a rank that is gone
            raise ExecError(f"{self.where(self.pc)}: lost the connection to {e.who} while posting a message "
                            f"to it ({e})") from e
        except Exception as e:  # noqa: BLE001 - any failure of an instruction: one line naming it
            raise ExecError(f"{self.where(self.pc)}: {cause(e)}") from e
        out = {"seconds": time.perf_counter() - t0, "loss": self.loss_sum, "peak_activation_bytes": self.tracker.peak}
        if self.device.type == "cuda":
            out["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated(self.device)
        return out

    def _run_stream(self):
        stream, n, H, comm = self.stream, len(self.stream), self.HANDLERS, self.COMM
        i = 0
        while i < n:
            k = stream[i].kind
            if k in comm:
                j = i + 1
                while j < n and stream[j].kind in comm:
                    j += 1
                self.comm_run(i, j)
                i = j
                continue
            self.pc = i
            if i == self.fault_at:
                self.inject()
            H[k](self, stream[i])
            self.serve()
            i += 1
        self.pc = n
        if not self.opt_done:
            self.close_compute()
        for p in self.tp.pending_sends():
            self.wait(p, "a send to complete", getattr(p, "peer", None))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ reference
    def reference_check(self) -> dict:
        """Unsliced, unpipelined model on the same batch (fp32): relative errors of the loss
        (on the rank holding the last stage) and of each of this rank's parameter gradients."""
        spec = self.spec
        names = M.all_param_names(spec)
        P = {n: M.init_param(spec.model, n, spec.seed, self.device, torch.float32) for n in names}
        loss = M.reference_loss(spec, P, self.step, self.device)
        loss.backward()
        worst, worst_name = 0.0, ""
        for Pc in self.params:
            for n, p in Pc.items():
                ref = P[n].grad
                got = p.grad if p.grad is not None else torch.zeros_like(p)
                err = float((got.float() - ref).norm() / ref.norm().clamp_min(1e-30))
                if err > worst:
                    worst, worst_name = err, n
        res = {"max_grad_rel_err": worst, "worst_param": worst_name, "ref_loss": float(loss.detach())}
        if self.last in self.stages:
            res["loss_rel_err"] = abs(self.loss_sum - float(loss.detach())) / max(abs(float(loss.detach())), 1e-30)
        return res


class _JobsDone:
    """Ready once the rank has served every exchange it agreed to (waiting on it serves them)."""

    def __init__(self, rank):
        self.rank = rank

    def ready(self):
        return not self.rank.jobs

    def value(self):
        return None
