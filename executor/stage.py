"""One model chunk on one rank (a pipeline stage): its parameters, the buffers of its units
(micro-batch, slice) and the forward/backward of one unit. The stage knows nothing of the
instruction stream; the runtime (interpreter.Rank) decides when each unit runs.

Buffers per unit: its input leaf and output (kept for its backward), received activations and
gradients, and per micro-batch and layer the K/V of each slice (a list per slice, never
concatenated) and the dK/dV accumulated for earlier slices by later slices' backwards. Everything
of a unit is dropped as soon as its backward is done."""
from __future__ import annotations

import contextlib

import torch

from ir.limits import gather_blocks

from . import model as M
from .attention import SliceAttention
from .errors import UnitError
from .kv import Exchange


class Unit:
    """A forward unit kept for its backward."""

    __slots__ = ("x", "y", "kvf", "kvb", "wg", "split")

    def __init__(self, split: bool = False):
        self.x = self.y = self.kvf = self.kvb = None
        self.split = split
        # split backward (I, W): weight gradients kept in a store for W; one B: added to .grad at once
        self.wg = M.WeightGradStore() if split else M.GRAD_NOW


class AttentionEnv:
    """What every layer's attention of a rank shares: backend, scale, the KV-exchange service and
    the rank's bounded wait."""

    __slots__ = ("backend", "scale", "kv", "wait")

    def __init__(self, backend, scale, kv, wait):
        self.backend, self.scale, self.kv, self.wait = backend, scale, kv, wait


class LayerCtx:
    """What SliceAttention needs for one (unit, layer): backend, earlier slices' K/V, where
    their gradients go, and the unit's exchanges (several per unit, each shipping the tokens
    [lo, hi) of the prefix; the rest of the prefix is attended here, slice by slice)."""

    __slots__ = ("env", "unit", "li", "prefix", "acc", "backend", "scale", "key", "tracker", "offsets", "lens")

    def __init__(self, env: AttentionEnv, unit, li, prefix, acc, key, tracker, offsets, lens):
        self.env, self.unit, self.li, self.prefix, self.acc, self.key = env, unit, li, prefix, acc, key
        self.backend, self.scale, self.tracker = env.backend, env.scale, tracker
        self.offsets, self.lens = offsets, lens

    def serve(self) -> None:
        """Answer the KV requests that have arrived (a partner serves between its own layers)."""
        self.env.kv.serve()

    # ---- the prefix split into what is shipped and what stays
    def local_blocks(self, exchanges, q_len: int):
        """[(lo, hi, K, V)]: the prefix tokens no exchange ships, attended here, as blocks of
        contiguous tokens [lo, hi), each one attention call. A block gathers consecutive slices
        (their parts that stay) up to ir.limits.GATHER_SLICES * q_len tokens (gather_blocks, which
        the cost model prices too): one call and one merge instead of one per slice, for a
        transient copy of at most that many tokens' K/V of one layer (a whole slice alone is
        attended in place, never copied)."""
        s = len(self.prefix)
        if not s:
            return []
        cuts = sorted((e.lo, e.hi) for e in exchanges)
        pieces = []  # (lo, hi) of each slice's tokens that stay, ascending
        for i in range(s):
            a, e = self.offsets[i], self.offsets[i] + self.lens[i]
            for lo, hi in cuts + [(e, e)]:
                lo_c = min(max(lo, a), e)
                if lo_c > a:
                    pieces.append((a, lo_c))
                a = max(a, min(hi, e))
                if a >= e:
                    break
        out = []
        for lo, hi in gather_blocks(pieces, q_len):
            k, v = self.shipped(lo, hi)
            out.append((lo, hi, k.contiguous(), v.contiguous()))  # a whole slice: itself, no copy
        return out

    def shipped(self, lo: int, hi: int):
        """K and V of the prefix tokens [lo, hi), gathered across slices."""
        ks, vs = [], []
        for i in range(len(self.prefix)):
            a, n = self.offsets[i], self.lens[i]
            x, y = max(lo, a), min(hi, a + n)
            if x < y:
                k, v = self.prefix[i]
                ks.append(k[:, :, x - a:y - a])
                vs.append(v[:, :, x - a:y - a])
        return (ks[0] if len(ks) == 1 else torch.cat(ks, 2)), (vs[0] if len(vs) == 1 else torch.cat(vs, 2))

    # ---- forward
    def fwd_exchanges(self):
        return self.unit.kvf or ()

    def fwd_remote_start(self, q, exchanges):
        out = []
        for ex in exchanges:
            K, V = self.shipped(ex.lo, ex.hi)
            out.append((ex, self.env.kv.request(ex, self.li, 0, [q, K, V], [(q.shape, q.dtype), (q.shape[:3], torch.float32)])))
        return out

    def fwd_remote_finish(self, handles):
        return [self.env.wait(h, "its KV-exchange forward reply", ex.peer) for ex, h in handles]

    # ---- backward
    def bwd_exchanges(self):
        return self.unit.kvb or ()

    def bwd_remote_start(self, q, out, lse, dout, exchanges):
        res = []
        for ex in exchanges:
            K, V = self.shipped(ex.lo, ex.hi)
            specs = [(q.shape, q.dtype), (K.shape, K.dtype), (V.shape, V.dtype)]
            res.append((ex, self.env.kv.request(ex, self.li, 1, [q, out, lse, dout.to(q.dtype), K, V], specs)))
        return res

    def bwd_remote_finish(self, handles):
        """[(lo, hi, dq, dK, dV)] of each exchange's range."""
        out = []
        for ex, h in handles:
            dq, dk, dv = self.env.wait(h, "its KV-exchange backward reply", ex.peer)
            out.append((ex.lo, ex.hi, dq.float(), dk, dv))
        return out

    def accumulate_range(self, lo, hi, dk, dv):
        """dK/dV of the prefix tokens [lo, hi) (one exchange's reply), added slice by slice."""
        for i in range(len(self.prefix)):
            a, n = self.offsets[i], self.lens[i]
            x, y = max(lo, a), min(hi, a + n)
            if x < y:
                self.accumulate(i, dk[:, :, x - lo:y - lo], dv[:, :, x - lo:y - lo], x - a)

    def accumulate(self, i, dk, dv, start: int = 0):
        """Add dK/dV for tokens [start, start + len) of earlier slice i (the whole slice when it
        covers it) to what its backward will take as extra output gradient."""
        slot = self.acc[i]
        k, v = self.prefix[i]
        whole = start == 0 and dk.shape[2] == k.shape[2]
        if slot is None:
            if whole:  # own copies: the parts may be views of a receive buffer, and later adds are in place
                dk = dk.to(k.dtype, copy=True).contiguous()
                dv = dv.to(v.dtype, copy=True).contiguous()
            else:
                zk, zv = torch.zeros_like(k), torch.zeros_like(v)
                zk[:, :, start:start + dk.shape[2]] = dk
                zv[:, :, start:start + dv.shape[2]] = dv
                dk, dv = zk, zv
            self.acc[i] = [dk, dv]
            owner = ("acc", self.key[0], i, self.key[1])
            self.tracker.add(owner, dk)
            self.tracker.add(owner, dv)
        elif whole:
            slot[0].add_(dk)
            slot[1].add_(dv)
        else:
            slot[0][:, :, start:start + dk.shape[2]].add_(dk)
            slot[1][:, :, start:start + dv.shape[2]].add_(dv)


class Stage:
    """Pipeline stage `index` held as chunk `chunk` of this rank. `next_local` / `prev_local` are
    the neighbouring stages when this rank holds them too (activations and gradients are then
    handed over in memory instead of sent)."""

    def __init__(self, spec, index: int, chunk: int, params: dict, *, device, dtype, tracker, env: AttentionEnv,
                 batches, autocast: bool = False):
        """autocast: bf16 autocast over the forward (parameters, residual stream and activations
        between stages stay in `dtype`; matmuls and attention, its K/V and the KV exchange in bf16)."""
        self.spec, self.index, self.chunk, self.params = spec, index, chunk, params
        self.device, self.dtype, self.tracker, self.env, self.batches = device, dtype, tracker, env, batches
        self.attn_dtype = torch.bfloat16 if autocast else None
        self.amp = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
        self.is_first, self.is_last = index == 0, index == spec.num_stages - 1
        self.layers = spec.stage_layers[index]
        self.first_layer = spec.stage_first_layer()[index]
        self.next_local: Stage | None = None
        self.prev_local: Stage | None = None
        self.split_units: set = set()  # (mb, slice) whose backward runs as I + W (set by the runtime)
        self.reset()

    def reset(self) -> None:
        """Drop every unit buffer (start of a step)."""
        self.units: dict = {}       # (mb, slice) -> Unit
        self.acts_in: dict = {}     # (mb, slice) -> activation received or handed over
        self.grads_in: dict = {}    # (mb, slice) -> output gradient received or handed over
        self.grads_out: dict = {}   # (mb, slice) -> input gradient to send
        self.kv: dict = {}          # mb -> [layer][slice] (k, v)
        self.acc: dict = {}         # mb -> [layer][slice] [dk, dv] from later slices
        self.done: set = set()      # (mb, slice) whose backward has run this step
        self.wstores: dict = {}     # (mb, slice) -> WeightGradStore: I done, W to come

    # ------------------------------------------------------------------ buffers
    def has_unit(self, mb, s) -> bool:
        return (mb, s) in self.units

    def ran_backward(self, mb, s) -> bool:
        return (mb, s) in self.done

    def output(self, mb, s):
        """The unit's output activation, to send to the next stage."""
        u = self.units.get((mb, s))
        if u is None or u.y is None:
            if (mb, s) in self.done:
                raise UnitError("nothing to send: the unit's backward already ran and freed its output activation")
            raise UnitError("nothing to send: the unit's forward has not run on this rank")
        return u.y.detach()

    def take_input_grad(self, mb, s):
        """The unit's input gradient, to send to the previous stage."""
        g = self.grads_out.pop((mb, s), None)
        if g is None:
            raise UnitError("nothing to send: the unit's backward has not run on this rank (or its input "
                            "gradient was already sent)")
        return g

    def first_pending(self):
        """(mb, slice) of a unit whose backward has not run, or None."""
        return sorted(self.units)[0] if self.units else None

    # ------------------------------------------------------------------ compute
    def _attend(self, lc: LayerCtx, s: int, q, k, v):
        if self.attn_dtype is not None:  # one dtype for the attention Function, its cache and the exchange
            q, k, v = q.to(self.attn_dtype), k.to(self.attn_dtype), v.to(self.attn_dtype)
        cache = self.kv[lc.key[0]][lc.li]
        cache[s] = (k, v)
        owner = ("u", lc.key[0], s, lc.key[1])
        self.tracker.add(owner, k)
        self.tracker.add(owner, v)
        lc.prefix = [(kk.detach(), vv.detach()) for kk, vv in cache[:s]]
        return SliceAttention.apply(q.contiguous(), k, v, lc)

    def forward(self, mb: int, s: int, kvf: list[Exchange] | None) -> float | None:
        """Forward of unit (mb, s); returns its loss share on the last stage, else None."""
        spec, cfg, c = self.spec, self.spec.model, self.chunk
        if s > 0:  # slice s attends over the K/V of slices 0..s-1 of this micro-batch, kept by their forwards
            cache = self.kv.get(mb)
            missing = [j for j in range(s) if cache is None or cache[0][j] is None] if self.layers else []
            if missing:
                j = missing[0]
                why = ("its backward already ran and freed them" if (mb, j) in self.done
                       else "its forward has not run")
                raise UnitError(f"needs the K/V of the earlier slice 'F mb{mb} s{j} c{c}' of this micro-batch, "
                                f"but {why} (forward slices run in ascending order, before any backward of the "
                                f"micro-batch's earlier slices)")
        if not self.is_first and (mb, s) not in self.acts_in:
            if self.prev_local is not None:
                raise UnitError(f"no input activation: the previous stage's forward 'F mb{mb} s{s} "
                                f"c{self.prev_local.chunk}' has not run on this rank")
            raise UnitError(f"no input activation: it has not been received (a 'RECV_ACT mb{mb} s{s} c{c}' "
                            f"must come first)")
        u = self.units[(mb, s)] = Unit((mb, s) in self.split_units)
        u.kvf = kvf
        off, ln = spec.slice_offsets(mb)[s], spec.slice_lens[mb][s]
        P = self.params
        owner = ("u", mb, s, c)
        tr = self.tracker
        loss = None

        def pack(t):
            tr.add(owner, t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), self.amp():
            if self.is_first:
                tok = self.batches.tokens(mb)
                x = M.embed(P["embed"], tok[:, off:off + ln])
            else:
                x = self.acts_in.pop((mb, s)).detach().requires_grad_(True)
                u.x = x
            if mb not in self.kv:
                self.kv[mb] = [[None] * spec.slices for _ in range(self.layers)]
                self.acc[mb] = [[None] * spec.slices for _ in range(self.layers)]
            cos, sin = M.rope_tables(cfg, off, ln, self.device, self.dtype)
            key = (mb, c)
            offsets, lens = spec.slice_offsets(mb), spec.slice_lens[mb]
            for li in range(self.layers):
                lc = LayerCtx(self.env, u, li, None, self.acc[mb][li], key, tr, offsets, lens)
                x = M.layer_forward(P, self.first_layer + li, cfg, x, cos, sin,
                                    lambda q, k, v, lc=lc: self._attend(lc, s, q, k, v), u.wg)
            if self.is_last:
                tok = self.batches.tokens(mb)
                denom = spec.micro_batch_size * spec.seq_len * spec.microbatches
                # backward seeds the loss with 1 (Stage.backward): a unit with one B fuses the head
                x = M.head_loss(P, x, tok[:, 1 + off:1 + off + ln], denom, cfg.rms_eps, u.wg if u.split else None,
                                fuse=not u.split)
                loss = float(x.detach())
        u.y = x
        if self.next_local is not None:
            self.next_local.acts_in[(mb, s)] = x.detach()
        return loss

    def backward(self, mb: int, s: int, kvb: list[Exchange] | None, split: bool = False) -> None:
        """Backward of unit (mb, s): its output gradient and the dK/dV later slices left for it.
        split=True is the split backward's I: input gradients (attention backward included) now, the
        matmul weight gradients kept in a WeightGradStore for backward_weight (W)."""
        if split and (mb, s) in self.wstores:
            raise UnitError("its input-gradient backward (I) already ran")
        c = self.chunk
        if (mb, s + 1) in self.units:  # its dK/dV for this slice's K/V comes from that backward
            raise UnitError(f"the later slice's backward 'B mb{mb} s{s + 1} c{c}' has not run (backward slices run "
                            f"in descending order: each one adds the gradient of the earlier slices' K/V)")
        if not self.is_last and (mb, s) not in self.grads_in:
            if self.next_local is not None:
                raise UnitError(f"no output gradient: the next stage's backward 'B mb{mb} s{s} "
                                f"c{self.next_local.chunk}' has not run on this rank")
            raise UnitError(f"no output gradient: it has not been received (a 'RECV_GRAD mb{mb} s{s} c{c}' "
                            f"must come first)")
        u = self.units.pop((mb, s))
        self.done.add((mb, s))
        u.kvb = kvb
        if self.is_last:
            roots, grads = [u.y], [torch.ones_like(u.y)]
        else:
            roots, grads = [u.y], [self.grads_in.pop((mb, s))]
        caches, accs = self.kv[mb], self.acc[mb]
        for li in range(len(caches)):
            a = accs[li][s]
            if a is not None:
                k, v = caches[li][s]
                roots += [k, v]
                grads += a
        if split != u.split:
            raise UnitError("the unit's backward is split (I and W) on one side of the plan only")
        if split:
            u.wg.deferred = True
        torch.autograd.backward(roots, grads)
        if split:
            self.wstores[(mb, s)] = u.wg
            owner = ("w", mb, s, self.chunk)
            for t in u.wg.tensors():
                self.tracker.add(owner, t)
        for li in range(len(caches)):
            caches[li][s] = None
            accs[li][s] = None
        self.tracker.release(("u", mb, s, self.chunk))
        self.tracker.release(("acc", mb, s, self.chunk))
        if s == 0:
            del self.kv[mb], self.acc[mb]
        if not self.is_first:
            g = u.x.grad
            if self.prev_local is not None:
                self.prev_local.grads_in[(mb, s)] = g
            else:
                self.grads_out[(mb, s)] = g
        u.x = u.y = u.wg = None

    def backward_weight(self, mb: int, s: int) -> None:
        """The split backward's W of unit (mb, s): the weight gradients its I left in the store."""
        store = self.wstores.pop((mb, s), None)
        if store is None:
            raise UnitError("no weight gradients to compute (its I has not run)")
        store.run()
        self.tracker.release(("w", mb, s, self.chunk))
