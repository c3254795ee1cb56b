"""A Llama-style decoder as plain functions over a {name: tensor} parameter dict.

Embedding, per layer RMSNorm -> GQA attention with RoPE (absolute positions) -> residual ->
RMSNorm -> SwiGLU MLP -> residual, then final RMSNorm, untied LM head and token cross-entropy.
Each parameter is initialised from its own generator seeded by (seed, name), so a rank can build
exactly its stages' parameters and any rank can build the full reference model.
"""
from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F

EPS = 1e-5
ROPE_THETA = 10000.0
INIT_STD = 0.02


def layer_names(i: int) -> list[str]:
    p = f"layers.{i}."
    return [p + n for n in ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w1", "w3", "w2")]


def param_shape(cfg, name: str) -> tuple[int, ...]:
    h, d = cfg.hidden, cfg.head_dim
    if name == "embed":
        return (cfg.vocab, h)
    if name == "lm_head":
        return (cfg.vocab, h)
    if name == "norm":
        return (h,)
    short = name.rsplit(".", 1)[-1]
    return {"attn_norm": (h,), "mlp_norm": (h,), "wq": (cfg.heads * d, h), "wk": (cfg.kv_heads * d, h),
            "wv": (cfg.kv_heads * d, h), "wo": (h, cfg.heads * d), "w1": (cfg.ffn, h), "w3": (cfg.ffn, h),
            "w2": (h, cfg.ffn)}[short]


def stage_param_names(spec, stage: int) -> list[str]:
    """Parameters of one pipeline stage, in a fixed order."""
    first = spec.stage_first_layer()[stage]
    names = ["embed"] if stage == 0 else []
    for i in range(first, first + spec.stage_layers[stage]):
        names += layer_names(i)
    if stage == spec.num_stages - 1:
        names += ["norm", "lm_head"]
    return names


def all_param_names(spec) -> list[str]:
    return [n for s in range(spec.num_stages) for n in stage_param_names(spec, s)]


def init_param(cfg, name: str, seed: int, device="cpu", dtype=torch.float32) -> torch.nn.Parameter:
    """Deterministic initial value of one parameter (independent of which rank builds it)."""
    shape = param_shape(cfg, name)
    if name.endswith("norm"):
        t = torch.ones(shape)
    else:
        g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
        t = torch.randn(shape, generator=g) * INIT_STD
    return torch.nn.Parameter(t.to(device=device, dtype=dtype))


def batch_tokens(spec, step: int, mb: int, device="cpu") -> torch.Tensor:
    """Synthetic tokens of micro-batch mb at a step: [micro_batch_size, seq_len + 1] (inputs and
    next-token labels), the same on every rank."""
    g = torch.Generator().manual_seed((spec.seed * 1_000_003 + step * 10_007 + mb) % (2**63))
    t = torch.randint(spec.model.vocab, (spec.micro_batch_size, spec.seq_len + 1), generator=g)
    return t.to(device)


def rmsnorm(x, w):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype) * w


def rope_tables(head_dim: int, start: int, length: int, device, dtype):
    """cos/sin for absolute positions start .. start+length-1: [length, head_dim]."""
    inv = 1.0 / (ROPE_THETA ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    pos = torch.arange(start, start + length, device=device, dtype=torch.float32)
    ang = torch.outer(pos, inv)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def rope(x, cos, sin):
    """x: [b, heads, seq, d] (rotate-half convention)."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


def layer_forward(P: dict, i: int, cfg, x, cos, sin, attend):
    """One decoder layer. `attend(q, k, v)` ([b, heads, seq, d] tensors) is the attention core."""
    p = f"layers.{i}."
    b, s, _ = x.shape
    d = cfg.head_dim
    h = rmsnorm(x, P[p + "attn_norm"])
    q = (h @ P[p + "wq"].t()).view(b, s, cfg.heads, d).transpose(1, 2)
    k = (h @ P[p + "wk"].t()).view(b, s, cfg.kv_heads, d).transpose(1, 2)
    v = (h @ P[p + "wv"].t()).view(b, s, cfg.kv_heads, d).transpose(1, 2)
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    a = attend(q, k, v.contiguous())
    x = x + a.transpose(1, 2).reshape(b, s, cfg.heads * d) @ P[p + "wo"].t()
    h = rmsnorm(x, P[p + "mlp_norm"])
    return x + (F.silu(h @ P[p + "w1"].t()) * (h @ P[p + "w3"].t())) @ P[p + "w2"].t()


def head_loss(P: dict, x, labels, denom: float):
    """Final norm, LM head and the summed token cross-entropy divided by `denom`."""
    h = rmsnorm(x, P["norm"])
    logits = h @ P["lm_head"].t()
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
    return ce / denom


def full_causal(q, k, v):
    """Reference attention: the whole sequence at once (square causal mask)."""
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), is_causal=True)


def reference_loss(spec, P: dict, step: int, device="cpu"):
    """The unsliced, unpipelined model on the step's batch: mean token loss per micro-batch,
    averaged over micro-batches (what the pipelined step computes)."""
    cfg = spec.model
    m = spec.microbatches
    cos, sin = rope_tables(cfg.head_dim, 0, spec.seq_len, device, P["embed"].dtype)
    total = 0.0
    for mb in range(m):
        tok = batch_tokens(spec, step, mb, device)
        x = P["embed"][tok[:, :-1]]
        for i in range(cfg.layers):
            x = layer_forward(P, i, cfg, x, cos, sin, full_causal)
        total = total + head_loss(P, x, tok[:, 1:], spec.micro_batch_size * spec.seq_len * m)
    return total
