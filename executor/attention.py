"""Attention backends and the sliced attention of one unit.

Every backend offers two block operations on [batch, heads, seq, head_dim] tensors (K/V may
have fewer heads: GQA):
    fwd(q, k, v, causal, scale) -> (out, lse)      lse: [batch, heads, seq_q], float32
    bwd(dout, q, k, v, out, lse, causal, scale) -> (dq, dk, dv)
`bwd` takes the *final* (merged) out and lse of the query rows, so a block's gradient is exact
even though the block saw only part of the keys (the flash-attention / ring-attention identity).
Causal blocks are always square (a slice over its own keys), where top-left and bottom-right
alignment coincide; prefix blocks are non-causal. Slice j's attention = merge of the causal block
over its own K/V and non-causal blocks over the earlier slices' K/V (executor.stage.LayerCtx.
local_blocks: a few slices gathered per block, the K/V cache itself kept per slice).
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from .errors import BackendUnavailable


class Backend(NamedTuple):
    name: str
    fwd: Callable
    bwd: Callable


def merge(out, lse, out2, lse2):
    """Merge two partial attentions of the same queries (float32 in, float32 out)."""
    w = torch.sigmoid(lse2 - lse).unsqueeze(-1)
    out = out - w * (out - out2)
    lse = lse - F.logsigmoid(lse - lse2)
    return out, lse


# ---------------------------------------------------------------- math (plain torch, any device)
def _group(q, k):
    b, h, sq, d = q.shape
    hk = k.shape[1]
    return q.reshape(b, hk, h // hk, sq, d), k.unsqueeze(2)


def _scores(q, k, causal, scale):
    qg, kg = _group(q, k)
    s = torch.matmul(qg.float(), kg.float().transpose(-1, -2)) * scale
    if causal:
        sq, sk = s.shape[-2], s.shape[-1]
        mask = torch.ones(sq, sk, dtype=torch.bool, device=s.device).tril(sk - sq)
        s = s.masked_fill(~mask, float("-inf"))
    return s  # [b, hk, g, sq, sk]


def math_fwd(q, k, v, causal, scale):
    s = _scores(q, k, causal, scale)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    out = torch.matmul(p, v.float().unsqueeze(2))
    b, h, sq, d = q.shape
    return out.reshape(b, h, sq, d).to(q.dtype), lse.reshape(b, h, sq)


def math_bwd(dout, q, k, v, out, lse, causal, scale):
    b, h, sq, d = q.shape
    hk = k.shape[1]
    g = h // hk
    s = _scores(q, k, causal, scale)
    p = torch.exp(s - lse.reshape(b, hk, g, sq, 1).float())
    do = dout.float().reshape(b, hk, g, sq, d)
    o = out.float().reshape(b, hk, g, sq, d)
    dv = torch.matmul(p.transpose(-1, -2), do).sum(2)
    dp = torch.matmul(do, v.float().unsqueeze(2).transpose(-1, -2))
    delta = (do * o).sum(-1, keepdim=True)
    ds = p * (dp - delta) * scale
    dq = torch.matmul(ds, k.float().unsqueeze(2)).reshape(b, h, sq, d)
    dk = torch.matmul(ds.transpose(-1, -2), q.float().reshape(b, hk, g, sq, d)).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


MATH = Backend("math", math_fwd, math_bwd)


# ---------------------------------------------------------------- torch SDPA flash kernels
def _expand(k, h):
    hk = k.shape[1]
    return k if hk == h else k.repeat_interleave(h // hk, dim=1)


def _reduce(dk, hk):
    b, h, s, d = dk.shape
    return dk if hk == h else dk.reshape(b, hk, h // hk, s, d).sum(2)


@functools.lru_cache(maxsize=None)
def _cpu_gqa_native() -> bool:
    """Whether torch's CPU flash kernels take K/V with fewer heads than Q (GQA) as they are (torch
    2.5+ does, in forward and backward, returning dK/dV with the K/V heads); otherwise K/V are
    repeated to Q's heads and dK/dV summed back. Native GQA skips two copies and two reductions
    per layer and unit (a stage's layers went from 1.028-1.033x torch autograd to 1.009x,
    bench/layer_vs_torch.py)."""
    try:
        q, kv = torch.zeros(1, 2, 4, 8), torch.zeros(1, 1, 4, 8)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, kv, kv, 0.0, True, scale=1.0)
        _, dk, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            out, q, kv, kv, out, lse, 0.0, True, scale=1.0)
        return tuple(dk.shape) == tuple(kv.shape)
    except RuntimeError:
        return False


def sdpa_fwd(q, k, v, causal, scale):
    h = q.shape[1]
    if not q.is_cuda and k.shape[1] != h and _cpu_gqa_native():
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return out, lse.float()
    ke, ve = _expand(k, h), _expand(v, h)
    if q.is_cuda:
        res = torch.ops.aten._scaled_dot_product_flash_attention(q, ke, ve, 0.0, causal, False, scale=scale)
        return res[0], res[1].float()
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, ke, ve, 0.0, causal, scale=scale)
    return out, lse.float()


def sdpa_bwd(dout, q, k, v, out, lse, causal, scale):
    h, hk = q.shape[1], k.shape[1]
    out, dout = out.to(q.dtype), dout.to(q.dtype)
    if q.is_cuda:
        out, dout = out.contiguous(), dout.contiguous()
    # the CPU kernel reads any strides: out and dout arrive as [b, heads, s, d] views of [b, s, heads,
    # d] memory (seq_major, the out-projection's gradient), and copying them head-major cost two
    # passes over [s, heads * d] per layer and unit (the same bits either way)
    lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    if not q.is_cuda and hk != h and _cpu_gqa_native():
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse.contiguous(), 0.0, causal, scale=scale)
    ke, ve = _expand(k, h), _expand(v, h)
    if q.is_cuda:
        empty = torch.empty(0, device=q.device)
        seed = torch.zeros((), dtype=torch.int64, device=q.device)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, ke, ve, out, lse.contiguous(), empty, empty, q.shape[2], k.shape[2], 0.0, causal,
            seed, seed, scale=scale)
    else:
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, ke, ve, out, lse.contiguous(), 0.0, causal, scale=scale)
    return dq, _reduce(dk, hk), _reduce(dv, hk)


SDPA = Backend("sdpa", sdpa_fwd, sdpa_bwd)


# ---------------------------------------------------------------- flash-attn 2 (CUDA)
def _flash_backend():
    """flash_attn 2's low-level forward/backward (they take and return the softmax lse).
    Keyword arguments are matched against the installed version's signature."""
    from flash_attn import flash_attn_interface as fai  # noqa: raises ImportError when absent

    f_fwd, f_bwd = fai._flash_attn_forward, fai._flash_attn_backward
    fwd_params = set(inspect.signature(f_fwd).parameters)
    bwd_params = set(inspect.signature(f_bwd).parameters)

    def common(params, causal, scale):
        kw = {"dropout_p": 0.0, "softmax_scale": scale, "causal": causal, "window_size": (-1, -1),
              "window_size_left": -1, "window_size_right": -1, "softcap": 0.0, "alibi_slopes": None,
              "return_softmax": False, "deterministic": False, "rng_state": None}
        return {k: v for k, v in kw.items() if k in params}

    def fwd(q, k, v, causal, scale):
        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        res = f_fwd(q=qt, k=kt, v=vt, **common(fwd_params, causal, scale))
        out, lse = (res[0], res[5]) if len(res) >= 8 else (res[0], res[1])
        return out.transpose(1, 2), lse.float()

    def bwd(dout, q, k, v, out, lse, causal, scale):
        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        ot = out.to(q.dtype).transpose(1, 2).contiguous()
        dot = dout.to(q.dtype).transpose(1, 2).contiguous()
        dq, dk, dv = torch.empty_like(qt), torch.empty_like(kt), torch.empty_like(vt)
        f_bwd(dout=dot, q=qt, k=kt, v=vt, out=ot, softmax_lse=lse.contiguous(), dq=dq, dk=dk, dv=dv,
              **common(bwd_params, causal, scale))
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)

    return Backend("flash-attn2", fwd, bwd)


def self_test(be: Backend, device, dtype=torch.float32, head_dim: int = 64) -> str | None:
    """Check a backend's block forward/backward against MATH on small GQA tensors of the plan's
    head_dim (causal and prefix blocks, merged lse passed to bwd): None if it agrees, else the
    reason (flash-attn, say, supports only some head dims)."""
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        mk = lambda *sh: torch.randn(*sh, generator=g).to(device=device, dtype=dtype)  # noqa: E731
        d = head_dim
        q, k, v, kp, vp = mk(1, 4, 64, d), mk(1, 2, 64, d), mk(1, 2, 64, d), mk(1, 2, 32, d), mk(1, 2, 32, d)
        dout = mk(1, 4, 64, d)
        tol = 1e-3 if dtype == torch.float32 else 5e-2
        res = []
        for b in (be, MATH):
            o, l = b.fwd(q, k, v, True, d ** -0.5)
            o2, l2 = b.fwd(q, kp, vp, False, d ** -0.5)
            o, l = merge(o.float(), l, o2.float(), l2)
            o = o.to(dtype)
            res.append([o, *b.bwd(dout, q, k, v, o, l, True, d ** -0.5), *b.bwd(dout, q, kp, vp, o, l, False, d ** -0.5)])
        for a, r in zip(*res):
            err = float((a.float() - r.float()).norm() / r.float().norm().clamp_min(1e-12))
            if not err < tol:
                return f"relative error {err:.2e} against the math reference"
        return None
    except Exception as e:  # noqa: BLE001 - any failure means: do not use this backend
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def pick_backend(choice: str, device: torch.device, dtype=torch.float32, head_dim: int = 64) -> Backend:
    """auto: flash-attn on CUDA when importable, else torch SDPA; each candidate is self-tested
    and skipped (auto) or refused (forced) if it disagrees with the plain math reference.
    'math' is the plain reference itself."""
    if choice == "math":
        return MATH
    cands = []
    if choice in ("flash", "auto") and device.type == "cuda":
        try:
            cands.append(_flash_backend())
        except (ImportError, AttributeError) as e:
            if choice == "flash":
                raise BackendUnavailable(f"--attention flash: flash_attn is not usable here ({e})") from None
    elif choice == "flash":
        raise BackendUnavailable("--attention flash needs --device cuda")
    if choice in ("sdpa", "auto"):
        cands.append(SDPA)
    for be in cands:
        why = self_test(be, device, dtype, head_dim)
        if why is None:
            return be
        if choice != "auto":
            raise BackendUnavailable(f"--attention {choice}: backend {be.name} failed its self-test ({why})")
        print(f"executor: attention backend {be.name} skipped: {why}", flush=True)
    return MATH


# ---------------------------------------------------------------- the sliced attention Function
def seq_major(out):
    """out ([b, heads, s, d]) as a view of [b, s, heads, d] memory, so that the out-projection's
    out.transpose(1, 2).reshape(b, s, heads * d) is a view of the same storage, not a copy."""
    if out.transpose(1, 2).is_contiguous():
        return out
    b, h, s, d = out.shape
    return torch.empty((b, s, h, d), dtype=out.dtype, device=out.device).transpose(1, 2).copy_(out)


class SliceAttention(torch.autograd.Function):
    """Attention of one slice's queries over its own K/V (causal) and the earlier slices' K/V.
    Its output is [b, heads, s, d] in [b, s, heads, d] memory (seq_major): the layout the
    out-projection reads, so the saved output and the projection's saved input are one tensor.

    `lc` (an executor.stage.LayerCtx-like object) supplies: backend, scale, the unit's KV exchanges
    (fwd_exchanges/bwd_exchanges: each ships a token range of the prefix to another rank) with
    their request/reply hooks, local_blocks(exchanges, q_len) ([(lo, hi, K, V)]: the prefix tokens
    attended here, in blocks of contiguous tokens), accumulate_range(lo, hi, dk, dv) for the
    prefix's gradients, and serve() (answer others' requests between layers).
    """

    @staticmethod
    def forward(ctx, q, k, v, lc):
        be, scale = lc.backend, lc.scale
        lc.serve()
        exchanges = lc.fwd_exchanges()
        handles = lc.fwd_remote_start(q, exchanges) if exchanges else ()
        out, lse = be.fwd(q, k, v, True, scale)
        out = out.float()
        for _lo, _hi, kp, vp in lc.local_blocks(exchanges, q.shape[2]):
            o2, l2 = be.fwd(q, kp, vp, False, scale)
            out, lse = merge(out, lse, o2.float(), l2)
        if handles:
            for o2, l2 in lc.fwd_remote_finish(handles):
                out, lse = merge(out, lse, o2.float(), l2)
        out = seq_major(out.to(q.dtype))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.lc = lc
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        lc = ctx.lc
        be, scale = lc.backend, lc.scale
        lc.serve()
        exchanges = lc.bwd_exchanges()
        handles = lc.bwd_remote_start(q, out, lse, dout, exchanges) if exchanges else ()
        dq, dk, dv = be.bwd(dout, q, k, v, out, lse, True, scale)
        dq = dq.float()
        for lo, hi, kp, vp in lc.local_blocks(exchanges, q.shape[2]):
            dqi, dki, dvi = be.bwd(dout, q, kp, vp, out, lse, False, scale)
            dq += dqi
            lc.accumulate_range(lo, hi, dki, dvi)
        if handles:
            for lo, hi, dqr, dks, dvs in lc.bwd_remote_finish(handles):
                dq += dqr
                lc.accumulate_range(lo, hi, dks, dvs)
        ctx.lc = None
        return dq.to(q.dtype), dk, dv, None


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
