"""Sliced attention (per-slice K/V list, lse merge, exchanges of token ranges of the prefix)
equals full causal softmax attention, forward and gradients, for every CPU backend."""
from types import SimpleNamespace

import pytest
import torch

from executor.attention import MATH, SDPA, SliceAttention, merge
from executor.stage import LayerCtx


def reference(q, k, v, scale):
    """Plain masked softmax over the whole sequence (GQA by repetition)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) * scale
    n = s.shape[-1]
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v


class _NoTracker:
    def add(self, owner, t):
        pass


class _Ex:
    """An exchange as its owner sees it: the prefix tokens [lo, hi) it ships."""

    def __init__(self, lo, hi):
        self.lo, self.hi, self.peer = lo, hi, 1


class Ctx(LayerCtx):
    """The stage's LayerCtx (prefix split, gathering of shipped ranges, dK/dV at token offsets)
    with its 'remote' side run by the same backend here instead of on another rank."""

    def __init__(self, be, scale, prefix, acc, offsets, lens, fwd=(), bwd=()):
        self.backend, self.scale, self.prefix, self.acc = be, scale, prefix, acc
        self.offsets, self.lens, self.tracker, self.key = offsets, lens, _NoTracker(), (0, 0)
        self.unit = SimpleNamespace(kvf=[_Ex(*r) for r in fwd], kvb=[_Ex(*r) for r in bwd])

    def serve(self):
        pass

    def fwd_remote_start(self, q, exchanges):
        return [self.backend.fwd(q, *self.shipped(ex.lo, ex.hi), False, self.scale) for ex in exchanges]

    def fwd_remote_finish(self, handles):
        return handles

    def bwd_remote_start(self, q, out, lse, dout, exchanges):
        res = []
        for ex in exchanges:
            dq, dk, dv = self.backend.bwd(dout, q, *self.shipped(ex.lo, ex.hi), out, lse, False, self.scale)
            res.append((ex.lo, ex.hi, dq.float(), dk, dv))
        return res

    def bwd_remote_finish(self, handles):
        return handles


def sliced(q, k, v, lens, be, scale, exch):
    """Run slices ascending, backward descending, exactly as the interpreter does. exch: slice ->
    (forward ranges, backward ranges), each a list of shipped token ranges of its prefix."""
    offs = [sum(lens[:j]) for j in range(len(lens))]
    ks = [k[:, :, o:o + n].detach().clone().requires_grad_() for o, n in zip(offs, lens)]
    vs = [v[:, :, o:o + n].detach().clone().requires_grad_() for o, n in zip(offs, lens)]
    qs = [q[:, :, o:o + n].detach().clone().requires_grad_() for o, n in zip(offs, lens)]
    acc = [None] * len(lens)
    outs = []
    for j in range(len(lens)):
        ctx = Ctx(be, scale, [(ks[i].detach(), vs[i].detach()) for i in range(j)], acc, offs, lens, *exch.get(j, ()))
        outs.append(SliceAttention.apply(qs[j], ks[j], vs[j], ctx))
    return qs, ks, vs, outs, acc


@pytest.mark.parametrize("be", [MATH, SDPA], ids=lambda b: b.name)
@pytest.mark.parametrize("lens,exch", [
    ((16,), {}),
    ((8, 8, 8, 8), {}),
    ((13, 9, 6, 4), {}),
    # whole slices, one partner (the unit-cost pairing's form)
    ((8, 8, 8, 8), {3: ([(0, 16)], [(0, 8)]), 2: ([(0, 8)], [])}),
    # several partners per unit, token ranges across slice boundaries, gaps kept local
    ((13, 9, 6, 4), {3: ([(0, 5), (5, 20), (25, 28)], [(3, 22)]), 1: ([(2, 9)], [(0, 13)])}),
    ((8, 8, 8, 8), {3: ([(4, 12), (12, 21)], [(0, 3), (20, 24)]), 2: ([(1, 2)], [(0, 16)])}),
    # many short slices: the local prefix in blocks of at most GATHER_SLICES query lengths
    ((4,) * 10, {}),
    ((2, 12, 3, 3, 5), {4: ([(1, 3)], [(13, 15)])}),
])
def test_sliced_equals_full_causal(be, lens, exch):
    torch.manual_seed(0)
    b, h, hk, d, S = 2, 4, 2, 16, sum(lens)
    scale = d ** -0.5
    q, k, v = torch.randn(b, h, S, d), torch.randn(b, hk, S, d), torch.randn(b, hk, S, d)
    dout = torch.randn(b, h, S, d)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = reference(qr, kr, vr, scale)
    ref.backward(dout)
    qs, ks, vs, outs, acc = sliced(q, k, v, lens, be, scale, exch)
    out = torch.cat(outs, 2)
    assert (out - ref).abs().max().item() < 1e-5
    offs = [sum(lens[:j]) for j in range(len(lens))]
    for j in reversed(range(len(lens))):  # descending; earlier slices get later slices' dK/dV
        outs[j].backward(dout[:, :, offs[j]:offs[j] + lens[j]])
        if acc[j] is not None:  # ks[j] is a leaf here: add the later slices' dK/dV directly
            ks[j].grad += acc[j][0]
            vs[j].grad += acc[j][1]
    for got, want in ((torch.cat([t.grad for t in qs], 2), qr.grad), (torch.cat([t.grad for t in ks], 2), kr.grad),
                      (torch.cat([t.grad for t in vs], 2), vr.grad)):
        assert ((got - want).norm() / want.norm()).item() < 1e-5


@pytest.mark.parametrize("lens,ranges,want", [
    ((4,) * 10, [], [(0, 16), (16, 32), (32, 36)]),   # cut at GATHER_SLICES (4) query lengths
    ((8, 8, 8, 8), [], [(0, 24)]),                     # seq1f1b's n=4: one block for the prefix
    ((8, 8, 8, 8), [(4, 12)], [(0, 4), (12, 24)]),     # an exchange leaves two blocks
    ((2, 12, 3, 3), [], [(0, 2), (2, 14), (14, 17)]),  # a slice longer than the cap stands alone
])
def test_local_blocks(lens, ranges, want):
    """The prefix tokens attended here, as the blocks of contiguous tokens SliceAttention calls."""
    offs = [sum(lens[:j]) for j in range(len(lens))]
    j = len(lens) - 1
    prefix = [(torch.randn(1, 2, n, 4), torch.randn(1, 2, n, 4)) for n in lens[:j]]
    ctx = Ctx(SDPA, 0.5, prefix, [None] * len(lens), offs, lens)
    blocks = ctx.local_blocks([_Ex(lo, hi) for lo, hi in ranges], lens[j])
    assert [(lo, hi) for lo, hi, _, _ in blocks] == want
    k_all = torch.cat([k for k, _ in prefix], 2)
    for lo, hi, k, _v in blocks:
        assert k.is_contiguous() and torch.equal(k, k_all[:, :, lo:hi])
    whole = [b for b in blocks if (b[0], b[1]) in zip(offs, [o + n for o, n in zip(offs, lens)])]
    for lo, _hi, k, _v in whole:  # a whole slice is attended in place (no copy)
        assert k.data_ptr() == prefix[offs.index(lo)][0].data_ptr()


def test_merge_of_two_halves_is_full_softmax():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    o1, l1 = MATH.fwd(q, k[:, :, :7], v[:, :, :7], False, 0.3)
    o2, l2 = MATH.fwd(q, k[:, :, 7:], v[:, :, 7:], False, 0.3)
    o, l = merge(o1, l1, o2, l2)
    of, lf = MATH.fwd(q, k, v, False, 0.3)
    assert (o - of).abs().max() < 1e-6 and (l - lf).abs().max() < 1e-5
