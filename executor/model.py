"""A Llama-style decoder as plain functions over a {name: tensor} parameter dict.

Embedding, per layer RMSNorm -> GQA attention with RoPE (absolute positions) -> residual ->
RMSNorm -> SwiGLU MLP -> residual, then final RMSNorm, LM head and token cross-entropy. The
ModelConfig's variant fields are honoured here: head_dim, q/k/v/o and MLP biases, Qwen3's per-head
q/k norms, tied embeddings (the last stage's head is "embed"), rms_eps, rope_theta and the
linear / llama3 RoPE scalings.
Each parameter is initialised from its own generator seeded by (seed, name), so a rank can build
exactly its stages' parameters and any rank can build the full reference model.
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F

EPS = 1e-5
ROPE_THETA = 10000.0
INIT_STD = 0.02


def layer_names(i: int, cfg=None) -> list[str]:
    """Parameter names of decoder layer i (with cfg: also its biases and q/k norms)."""
    p = f"layers.{i}."
    names = ["attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w1", "w3", "w2"]
    if cfg is not None:
        names += ["bq", "bk", "bv"] if cfg.qkv_bias else []
        names += ["bo"] if cfg.o_bias else []
        names += ["b1", "b3", "b2"] if cfg.mlp_bias else []
        names += ["q_norm", "k_norm"] if cfg.qk_norm else []
    return [p + n for n in names]


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
            "w2": (h, cfg.ffn), "bq": (cfg.heads * d,), "bk": (cfg.kv_heads * d,), "bv": (cfg.kv_heads * d,),
            "bo": (h,), "b1": (cfg.ffn,), "b3": (cfg.ffn,), "b2": (h,), "q_norm": (d,), "k_norm": (d,)}[short]


def stage_param_names(spec, stage: int) -> list[str]:
    """Parameters of one pipeline stage, in a fixed order. With tied embeddings the last stage
    holds "embed" (the same matrix as stage 0's) in place of "lm_head"."""
    cfg = spec.model
    first = spec.stage_first_layer()[stage]
    names = ["embed"] if stage == 0 else []
    for i in range(first, first + spec.stage_layers[stage]):
        names += layer_names(i, cfg)
    if stage == spec.num_stages - 1:
        names += ["norm"]
        if not cfg.tie_embeddings:
            names += ["lm_head"]
        elif stage != 0:
            names += ["embed"]
    return names


def all_param_names(spec) -> list[str]:
    """Every parameter of the model once, in stage order."""
    return list(dict.fromkeys(n for s in range(spec.num_stages) for n in stage_param_names(spec, s)))


def stage_params(spec, stages, make) -> list[dict]:
    """{name: parameter} of each of `stages` (one rank's chunks), parameters built by make(name);
    a name two chunks share (tied embeddings on one rank) is one Parameter object."""
    made: dict = {}
    out = []
    for s in stages:
        P = {}
        for n in stage_param_names(spec, s):
            if n not in made:
                made[n] = make(n)
            P[n] = made[n]
        out.append(P)
    return out


def unique_params(params: list[dict]) -> list:
    """The distinct parameters of stage_params' dicts (for the optimizer)."""
    return list({id(p): p for P in params for p in P.values()}.values())


def init_param(cfg, name: str, seed: int, device="cpu", dtype=torch.float32) -> torch.nn.Parameter:
    """Deterministic initial value of one parameter (independent of which rank builds it)."""
    shape = param_shape(cfg, name)
    if name.endswith("norm"):
        t = torch.ones(shape)
    elif name.rsplit(".", 1)[-1].startswith("b"):
        t = torch.zeros(shape)
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


class RMSNorm(torch.autograd.Function):
    """y = (x * rstd).to(x.dtype) * w with rstd = rsqrt(mean(x^2) + EPS) in fp32. Saves only x and the
    fp32 rstd (4 bytes per token); x * rstd is recomputed in backward. (Plain autograd also keeps
    x * rstd and the output.)"""

    @staticmethod
    def forward(ctx, x, w, eps=EPS):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, rstd, w)
        return (xf * rstd).to(x.dtype) * w

    @staticmethod
    def backward(ctx, dy):
        x, rstd, w = ctx.saved_tensors
        n = x.float() * rstd
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (dy * n.to(x.dtype)).reshape(-1, w.shape[0]).sum(0).to(w.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            dn = (dy * w).float()
            dx = (rstd * (dn - n * (dn * n).mean(-1, keepdim=True))).to(x.dtype)
        return dx, dw, None


def rmsnorm(x, w, eps=EPS):
    return RMSNorm.apply(x, w, eps)


def rmsnorm_reference(x, w, eps=EPS):
    """The same norm under plain autograd (what RMSNorm must match)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


class SwiGLUDown(torch.autograd.Function):
    """(silu(gate) * up) @ w2.t(). Saves only gate and up: silu(gate) and the product (the down
    projection's input) are recomputed in backward. (Plain autograd keeps gate, silu(gate), up and
    the product.)"""

    @staticmethod
    def forward(ctx, gate, up, w2, wg=None, param=None):
        ctx.save_for_backward(gate, up, w2)
        ctx.wg, ctx.weight = wg, (w2 if param is None else param)
        return (F.silu(gate) * up) @ w2.t()

    @staticmethod
    def backward(ctx, dy):
        gate, up, w2 = ctx.saved_tensors
        s = F.silu(gate)
        dw2 = None
        if ctx.needs_input_grad[2]:
            dw2 = _weight_grad(ctx.wg, ctx.weight, s * up, dy)
        dp = dy @ w2
        dgate = torch.ops.aten.silu_backward(dp * up, gate) if ctx.needs_input_grad[0] else None
        dup = dp * s if ctx.needs_input_grad[1] else None
        return dgate, dup, dw2, None, None


def swiglu_down(gate, up, w2, wg=None, param=None):
    """(silu(gate) * up) @ w2.t(); `wg` see Linear; `param`: the Parameter w2 was cast from."""
    return SwiGLUDown.apply(gate, up, w2, wg, param)


def swiglu_down_reference(gate, up, w2, wg=None, param=None):
    return (F.silu(gate) * up) @ w2.t()


def rope_inv_freq(cfg, device="cpu") -> torch.Tensor:
    """Inverse frequencies of RoPE for a ModelConfig (or a bare head_dim: theta 10000): rope_theta,
    "linear" scaling (positions / factor) and Llama 3.1's "llama3" band-wise rescaling, as in
    transformers' modeling_rope_utils."""
    if isinstance(cfg, int):
        d, theta, kind = cfg, ROPE_THETA, "default"
    else:
        d, theta, kind = cfg.head_dim, cfg.rope_theta, cfg.rope_type
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=device, dtype=torch.int64).float() / d))
    if kind == "linear":
        inv = inv / cfg.rope_factor
    elif kind == "llama3":
        factor, lo, hi, old = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_max_pos
        low_wavelen, high_wavelen = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def rope_tables(cfg, start: int, length: int, device, dtype):
    """cos/sin for absolute positions start .. start+length-1: [length, head_dim]. `cfg` is the
    ModelConfig (or, for the default RoPE, just the head dim)."""
    inv = rope_inv_freq(cfg, device)
    pos = torch.arange(start, start + length, device=device, dtype=torch.float32)
    ang = torch.outer(pos, inv)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def _rotate_half(x, sign: float = 1.0):
    """[-x2, x1] for x = [x1, x2] along the last dimension (sign=-1: [x2, -x1], its transpose)."""
    half = x.shape[-1] // 2
    out = torch.empty_like(x)
    torch.mul(x[..., half:], -sign, out=out[..., :half])
    torch.mul(x[..., :half], sign, out=out[..., half:])
    return out


class RoPE(torch.autograd.Function):
    """x * cos + rotate_half(x) * sin for x [b, heads, seq, d], cos/sin [seq, d]. Saves cos and sin,
    what plain autograd keeps too; its backward is the inverse rotation,
    dx = dy * cos + rotate_half^T(dy * sin), where plain autograd's slices and cat zero-fill and copy
    two half-size gradients per call (the gradient of x[..., :half] is a full-size zero tensor with
    half written)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.dtype = x.dtype
        return x * cos + _rotate_half(x) * sin

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return (dy * cos + _rotate_half(dy * sin, -1.0)).to(ctx.dtype), None, None


def rope(x, cos, sin):
    """x: [b, heads, seq, d] (rotate-half convention, as transformers' apply_rotary_pos_emb)."""
    return RoPE.apply(x, cos, sin)


def rope_reference(x, cos, sin):
    """rope under plain autograd (what RoPE must match)."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


class Embed(torch.autograd.Function):
    """w[tok] for w [V, H], tok [b, s] (int64) -> [b, s, H]. Backward adds the rows of dy into
    w.grad in place (index_add_) and returns no gradient for w: the plain gather's backward makes a
    zero [V, H] tensor per call and autograd then adds it to w.grad, two passes over the whole
    table per unit (a micro-batch cut in n slices pays them n times). On CUDA it keeps autograd's
    kernel (index_add_ adds with atomics there, so two runs would differ in the last bits). Saves
    tok, as the plain gather does."""

    @staticmethod
    def forward(ctx, w, tok):
        ctx.save_for_backward(tok)
        ctx.weight = w
        return w[tok]

    @staticmethod
    def backward(ctx, dy):
        (tok,) = ctx.saved_tensors
        w, ctx.weight = ctx.weight, None
        # on CUDA index_add_ adds with atomics (run-to-run different bits): autograd's own kernel there
        embed_grad(w, tok, dy, dense=w.is_cuda)
        return None, None


def embed_grad(w, tok, dy, dense: bool = False) -> None:
    """w.grad += the gather's gradient (rows of dy [b, s, H] at tok [b, s]): in place with index_add_,
    or (dense) through autograd's [V, H] kernel and an add."""
    if dense:
        g = torch.ops.aten.embedding_dense_backward(dy, tok, w.shape[0], -1, False).to(w.dtype)
        if w.grad is None:
            w.grad = g
        else:
            w.grad.add_(g)
        return
    rows = dy.reshape(-1, dy.shape[-1]).to(w.dtype)
    if w.grad is None:
        w.grad = torch.zeros_like(w)
    w.grad.index_add_(0, tok.reshape(-1), rows)


def embed(w, tok):
    """The token embedding w[tok] (see Embed)."""
    return Embed.apply(w, tok)


def accumulate_grad(w, dy, x) -> None:
    """w.grad += dy^T x for w [out, in], dy [..., out], x [..., in]: in the gradient's own GEMM once
    it exists (addmm_ with beta 1), not a matmul and then an add over the whole weight, which a
    micro-batch cut in n slices pays n times per weight. Mixed dtypes (bf16 activations under
    autocast, fp32 weights) take the matmul and the add."""
    dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
    g = w.grad
    if g is None:
        w.grad = (dy2.t() @ x2).to(w.dtype)
    elif dy2.dtype == x2.dtype == g.dtype:
        g.addmm_(dy2.t(), x2)
    else:
        g.add_(dy2.t() @ x2)


class WeightGradStore:
    """The weight gradients of one unit, for the split backward (I now, W later).

    A unit's forward hands its store to every matmul Function. In the unit's backward, while
    `deferred` is set (the I instruction), they compute only their input gradient and leave
    (weight, matmul input, output gradient) here; `run()` (the W instruction) then adds
    dW = dY^T X to each weight's .grad. Biases, norm weights and the embedding's gather get their
    gradients in I (cheap, nothing to keep). The pattern of DualPipe's WeightGradStore and torch's
    stage_backward_weight, written for our Functions. The store travels with the graph (ctx), not
    in ambient state: ranks run as threads with --local, and CUDA runs backward on its own thread."""

    __slots__ = ("items", "deferred")

    def __init__(self):
        self.items: list = []
        self.deferred = False

    def put(self, w, x, dy) -> None:
        self.items.append((w, x, dy))

    def tensors(self):
        """The activations the store keeps alive (for the memory tracker)."""
        for _, x, dy in self.items:
            yield x
            yield dy

    @torch.no_grad()
    def run(self) -> None:
        for w, x, dy in self.items:
            accumulate_grad(w, dy, x)
        self.items = []


class GradNow:
    """The `wg` of a unit whose backward is one B: the matmul Functions add dW into the weight's
    .grad inside its GEMM (accumulate_grad) and give autograd no weight gradient."""

    deferred = False


GRAD_NOW = GradNow()


def _weight_grad(wg, w, x, dy):
    """dW = dY^T X for autograd (wg None), or None with dW added to w.grad now (GradNow, or a store
    that does not defer) or (w, x, dy) left in the unit's store when it defers."""
    if wg is None:
        return dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
    if wg.deferred:
        wg.put(w, x, dy)
    else:
        accumulate_grad(w, dy, x)
    return None


class Linear(torch.autograd.Function):
    """h @ w.t(). Saves h and w, exactly what the plain matmul's autograd keeps (not F.linear: its
    autograd keeps other tensors, 0.6% more saved bytes on the tiny model, and the memory model
    counts these). dW goes to the unit's WeightGradStore `wg` when it defers, else into the
    weight's .grad at once (accumulate_grad): autograd gets no weight gradient either way."""

    @staticmethod
    def forward(ctx, h, w, wg=None, weight=None):
        ctx.save_for_backward(h, w)
        # the Parameter itself (a saved tensor unpacks as another object; under autocast `w` is its
        # bf16 cast and `weight` the Parameter the deferred dW goes to)
        ctx.wg, ctx.weight = wg, w if weight is None else weight
        return h @ w.t()

    @staticmethod
    def backward(ctx, dy):
        h, w = ctx.saved_tensors
        dh = dy @ w if ctx.needs_input_grad[0] else None
        dw = _weight_grad(ctx.wg, ctx.weight, h, dy) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None


def _proj(h, w, b=None, wg=None):
    """h @ w.t() (+ b); `wg`: the unit's WeightGradStore when its backward is split, GRAD_NOW when it
    is one B (both through Linear, which saves what the plain matmul's autograd saves), or None:
    the plain matmul under autograd (the reference model)."""
    if wg is None:
        y = h @ w.t()
    elif torch.is_autocast_enabled(h.device.type):
        # what autocast does to the plain matmul, done before the Function: its backward runs
        # outside autocast and multiplies tensors of one dtype
        dt = torch.get_autocast_dtype(h.device.type)
        y = Linear.apply(h.to(dt), w.to(dt), wg, w)
    else:
        y = Linear.apply(h, w, wg)
    return y if b is None else y + b


def layer_forward(P: dict, i: int, cfg, x, cos, sin, attend, wg=None):
    """One decoder layer. `attend(q, k, v)` ([b, heads, seq, d] tensors) is the attention core;
    `wg` the unit's WeightGradStore or GRAD_NOW (see Linear; None: plain autograd)."""
    p = f"layers.{i}."
    b, s, _ = x.shape
    d, eps = cfg.head_dim, cfg.rms_eps
    h = rmsnorm(x, P[p + "attn_norm"], eps)
    q = _proj(h, P[p + "wq"], P.get(p + "bq"), wg).view(b, s, cfg.heads, d)
    k = _proj(h, P[p + "wk"], P.get(p + "bk"), wg).view(b, s, cfg.kv_heads, d)
    v = _proj(h, P[p + "wv"], P.get(p + "bv"), wg).view(b, s, cfg.kv_heads, d).transpose(1, 2)
    if cfg.qk_norm:  # Qwen3: RMSNorm over each head's vector, before RoPE
        q, k = rmsnorm(q, P[p + "q_norm"], eps), rmsnorm(k, P[p + "k_norm"], eps)
    q, k = rope(q.transpose(1, 2), cos, sin), rope(k.transpose(1, 2), cos, sin)
    a = attend(q, k, v.contiguous())
    # SliceAttention returns a [b, heads, s, d] view of [b, s, heads, d] memory: this is a view, so
    # the out-projection's saved input is the attention's saved output (no second copy)
    x = x + _proj(a.transpose(1, 2).reshape(b, s, cfg.heads * d), P[p + "wo"], P.get(p + "bo"), wg)
    h = rmsnorm(x, P[p + "mlp_norm"], eps)
    gate, up = _proj(h, P[p + "w1"], P.get(p + "b1"), wg), _proj(h, P[p + "w3"], P.get(p + "b3"), wg)
    # under autocast gate/up are bf16: the Function gets w2 in their dtype (a no-op otherwise), so its
    # backward, which runs outside autocast, multiplies tensors of one dtype; a deferred dW goes to
    # the Parameter itself
    y = swiglu_down(gate, up, P[p + "w2"].to(gate.dtype), wg, P[p + "w2"])
    if cfg.mlp_bias:
        y = y + P[p + "b2"]
    return x + y


class HeadCrossEntropy(torch.autograd.Function):
    """sum over tokens of cross_entropy(float(h @ w.t()), labels) / denom, for h [b, s, H], w [V, H],
    labels [b, s] (int64); returns a 0-d fp32 loss.

    Fused (fuse=True; the executor's last stage when the unit's backward is one B): the forward also computes the loss's gradients,
    dh = g @ w and dW = g^T h with g = (softmax(logits) - onehot(labels)) / denom, adds dW to the
    weight's .grad at once and saves only dh ([b, s, H], as many bytes as h): the logits are made
    once, where keeping h and recomputing them in backward cost one more LM-head matmul (the head's
    forward + backward took 1.32-1.34x as long, bench/results/head_fused.json). It takes the loss's own gradient to be 1, which
    is what the executor's last stage seeds (Stage.backward); backward refuses any other (on CPU).
    Otherwise: saves h, the labels and the fp32 log-sum-exp (4 bytes per token) and backward
    recomputes the logits; with `wg` (the unit runs I then W) it leaves (w, h, g) to the
    WeightGradStore for W."""

    @staticmethod
    def forward(ctx, h, w, labels, denom, wg=None, fuse=False):
        if fuse and wg is not None:
            raise ValueError("the fused loss head computes dW in the forward: not with a split backward (wg)")
        ctx.wg, ctx.weight, ctx.denom, ctx.fused = wg, w, denom, fuse
        logits = (h @ w.t()).float()
        picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        e, total, lse = _exp_parts(logits)
        loss = ((lse - picked).sum() / denom).to(torch.float32)
        if not ctx.fused:
            del logits, e
            ctx.save_for_backward(h, w, labels, lse)
            return loss
        with torch.autocast(h.device.type, enabled=False):  # the gradient as backward (outside autocast) makes it
            g = _softmax_grad(e, total, labels, 1.0 / denom).to(h.dtype)
            del logits, e
            dh = g @ w.to(h.dtype) if ctx.needs_input_grad[0] else None
            if ctx.needs_input_grad[1]:
                accumulate_grad(w, g, h)
        ctx.save_for_backward(dh)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        if ctx.fused:
            if dloss.device.type == "cpu" and float(dloss) != 1.0:
                raise RuntimeError(f"the fused loss head takes the loss's gradient to be 1, got {float(dloss)}")
            (dh,) = ctx.saved_tensors
            return dh, None, None, None, None, None
        h, w, labels, _lse = ctx.saved_tensors
        e, total, _ = _exp_parts((h @ w.t()).float())  # as the forward made them: the same bits as the fused head
        g = _softmax_grad(e, total, labels, dloss / ctx.denom).to(h.dtype)
        dh = g @ w if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            dw = _weight_grad(ctx.wg, ctx.weight, h, g)
        return dh, dw, None, None, None, None


def _exp_parts(logits):
    """e = exp(logits - max) (in place in the fp32 logits [b, s, V]), its row sums [b, s, 1] and the
    log-sum-exp [b, s]: one exp over the logits serves the loss and the gradient (torch.logsumexp
    and then a softmax take two: fused / plain autograd went from 1.058 to 0.980 at vocabulary 4096,
    bench/results/head_fused.json)."""
    top = logits.amax(-1, keepdim=True)
    e = logits.sub_(top).exp_()
    total = e.sum(-1, keepdim=True)
    return e, total, (top + total.log()).squeeze(-1)


def _softmax_grad(e, total, labels, scale):
    """(softmax - onehot(labels)) * scale from _exp_parts' e and row sums, in place in e."""
    g = e.mul_(total.reciprocal().mul_(scale))
    g.scatter_add_(-1, labels.unsqueeze(-1), torch.full_like(total, -scale))
    return g


def head_weight(P: dict):
    """The LM head matrix: "lm_head", or the embedding when they are tied."""
    w = P.get("lm_head")
    return P["embed"] if w is None else w


def head_loss(P: dict, x, labels, denom: float, eps: float = EPS, wg=None, fuse: bool = False):
    """Final norm, LM head and the summed token cross-entropy divided by `denom` (`wg`: the unit's
    WeightGradStore, see Linear; `fuse`: the loss is the root of its backward, seeded with 1, so
    the head's gradients are made in the forward, see HeadCrossEntropy)."""
    return HeadCrossEntropy.apply(rmsnorm(x, P["norm"], eps), head_weight(P), labels, denom, wg, fuse)


def head_loss_reference(P: dict, x, labels, denom: float, eps: float = EPS, wg=None):
    """head_loss under plain autograd (what the custom Functions must match)."""
    h = rmsnorm_reference(x, P["norm"], eps)
    logits = h @ head_weight(P).t()
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
    return ce / denom


def full_causal(q, k, v):
    """Reference attention: the whole sequence at once (square causal mask)."""
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), is_causal=True)


def reference_loss(spec, P: dict, step: int, device="cpu", batch=None):
    """The unsliced, unpipelined model on the step's batch: mean token loss per micro-batch,
    averaged over micro-batches (what the pipelined step computes). batch(mb) gives the tokens
    (default: the synthetic batch_tokens of the step)."""
    cfg = spec.model
    m = spec.microbatches
    cos, sin = rope_tables(cfg, 0, spec.seq_len, device, P["embed"].dtype)
    total = 0.0
    for mb in range(m):
        tok = (batch(mb) if batch is not None else batch_tokens(spec, step, mb)).to(device)
        x = P["embed"][tok[:, :-1]]
        for i in range(cfg.layers):
            x = layer_forward(P, i, cfg, x, cos, sin, full_causal)
        total = total + head_loss(P, x, tok[:, 1:], spec.micro_batch_size * spec.seq_len * m, cfg.rms_eps)
    return total
