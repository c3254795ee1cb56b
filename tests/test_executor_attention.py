"""Sliced attention (per-slice K/V list, lse merge, exchange of a prefix) equals full causal
softmax attention, forward and gradients, for every CPU backend."""
import pytest
import torch

from executor.attention import MATH, SDPA, SliceAttention, merge


def reference(q, k, v, scale):
    """Plain masked softmax over the whole sequence (GQA by repetition)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) * scale
    n = s.shape[-1]
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v


class Ctx:
    """Stand-in for the interpreter's LayerCtx; the 'remote' side runs the same backend here."""

    def __init__(self, be, scale, prefix, acc, xf=0, xb=0):
        self.backend, self.scale, self.prefix, self.acc, self.xf, self.xb = be, scale, prefix, acc, xf, xb

    def fwd_remote_slices(self):
        return self.xf

    def bwd_remote_slices(self):
        return self.xb

    def fwd_remote_start(self, q, prefix):
        K, V = torch.cat([k for k, _ in prefix], 2), torch.cat([v for _, v in prefix], 2)
        return self.backend.fwd(q, K, V, False, self.scale)

    def fwd_remote_finish(self, h):
        return h

    def bwd_remote_start(self, q, prefix, out, lse, dout):
        lens = [k.shape[2] for k, _ in prefix]
        K, V = torch.cat([k for k, _ in prefix], 2), torch.cat([v for _, v in prefix], 2)
        dq, dk, dv = self.backend.bwd(dout, q, K, V, out, lse, False, self.scale)
        return dq, dk.split(lens, 2), dv.split(lens, 2)

    def bwd_remote_finish(self, h):
        return h

    def accumulate(self, i, dk, dv):
        if self.acc[i] is None:
            self.acc[i] = [dk.clone(), dv.clone()]
        else:
            self.acc[i][0] += dk
            self.acc[i][1] += dv


def sliced(q, k, v, lens, be, scale, exch):
    """Run slices ascending, backward descending, exactly as the interpreter does."""
    offs = [sum(lens[:j]) for j in range(len(lens))]
    ks = [k[:, :, o:o + n].detach().clone().requires_grad_() for o, n in zip(offs, lens)]
    vs = [v[:, :, o:o + n].detach().clone().requires_grad_() for o, n in zip(offs, lens)]
    qs = [q[:, :, o:o + n].detach().clone().requires_grad_() for o, n in zip(offs, lens)]
    acc = [None] * len(lens)
    outs = []
    for j in range(len(lens)):
        x = exch.get(j, (0, 0))
        ctx = Ctx(be, scale, [(ks[i].detach(), vs[i].detach()) for i in range(j)], acc, *x)
        outs.append(SliceAttention.apply(qs[j], ks[j], vs[j], ctx))
    return qs, ks, vs, outs, acc


@pytest.mark.parametrize("be", [MATH, SDPA], ids=lambda b: b.name)
@pytest.mark.parametrize("lens,exch", [
    ((16,), {}),
    ((8, 8, 8, 8), {}),
    ((13, 9, 6, 4), {}),
    ((8, 8, 8, 8), {3: (2, 1), 2: (1, 0)}),
    ((13, 9, 6, 4), {3: (1, 2), 1: (0, 1)}),
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


def test_merge_of_two_halves_is_full_softmax():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    o1, l1 = MATH.fwd(q, k[:, :, :7], v[:, :, :7], False, 0.3)
    o2, l2 = MATH.fwd(q, k[:, :, 7:], v[:, :, 7:], False, 0.3)
    o, l = merge(o1, l1, o2, l2)
    of, lf = MATH.fwd(q, k, v, False, 0.3)
    assert (o - of).abs().max() < 1e-6 and (l - lf).abs().max() < 1e-5
