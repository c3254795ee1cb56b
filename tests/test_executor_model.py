"""The executor model's memory-lean autograd Functions (RMSNorm, SwiGLU + down projection, LM head
cross-entropy, the attention output layout) equal plain autograd, forward and gradients, and keep
only what they are meant to keep."""

import pytest
import torch

from executor import model as M
from ir import ModelConfig
from executor.attention import SDPA, SliceAttention, default_scale
from executor.metrics import ActivationTracker

TOL = 1e-6


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check(fn, ref, inputs, dtype=torch.float32, tol=TOL):
    """fn and ref on clones of inputs (floating ones require grad): outputs and every gradient."""
    g = torch.Generator().manual_seed(7)
    xs = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
    xr = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
    y, yr = fn(*xs), ref(*xr)
    assert y.dtype == yr.dtype and y.shape == yr.shape
    assert rel(y, yr) < tol
    dy = torch.randn(y.shape, generator=g).to(y.dtype)
    y.backward(dy)
    yr.backward(dy)
    for a, b in zip(xs, xr):
        if a.is_floating_point():
            assert rel(a.grad, b.grad) < tol, (a.shape, rel(a.grad, b.grad))


def randn(*shape, scale=1.0):
    return torch.randn(*shape) * scale


@pytest.mark.parametrize("shape", [(2, 7, 48), (1, 33, 64)])
def test_rmsnorm_matches_autograd(shape):
    torch.manual_seed(0)
    check(M.rmsnorm, M.rmsnorm_reference, [randn(*shape), 1 + 0.1 * randn(shape[-1])])


def test_swiglu_down_matches_autograd():
    torch.manual_seed(1)
    check(M.swiglu_down, M.swiglu_down_reference, [randn(2, 9, 40), randn(2, 9, 40), 0.1 * randn(24, 40)])


def test_head_cross_entropy_matches_autograd():
    torch.manual_seed(2)
    V, H = 50, 24
    P = {"norm": 1 + 0.1 * randn(H), "lm_head": randn(V, H, scale=0.3)}
    labels = torch.randint(V, (2, 11))

    def run(fn):
        return lambda x, norm, head: fn({"norm": norm, "lm_head": head}, x, labels, 37.0)

    check(run(M.head_loss), run(M.head_loss_reference), [randn(2, 11, H), P["norm"], P["lm_head"]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_matches_autograd(dtype):
    """RoPE's backward (the inverse rotation) gives plain autograd's gradient; a bf16 input (q, k
    under autocast) times fp32 tables gives an fp32 output and a bf16 gradient, as autograd does."""
    torch.manual_seed(5)
    cos, sin = M.rope_tables(16, 3, 9, "cpu", torch.float32)
    x0 = randn(2, 4, 9, 16).to(dtype)
    dy = randn(2, 4, 9, 16)
    out = []
    for fn in (M.rope, M.rope_reference):
        x = x0.clone().requires_grad_()
        y = fn(x, cos, sin)
        y.backward(dy)
        out.append((y, x.grad))
    (y, g), (yr, gr) = out
    assert y.dtype == yr.dtype == torch.float32 and g.dtype == gr.dtype == dtype
    assert rel(y, yr) < TOL
    assert rel(g, gr) < (TOL if dtype == torch.float32 else 1e-2)


def test_embed_adds_rows_into_the_existing_grad():
    """embed's backward adds dy's rows into w.grad in place (a repeated token twice) and gives
    autograd no gradient: the sum is plain autograd's gather gradient plus what was there."""
    torch.manual_seed(6)
    w = torch.nn.Parameter(randn(10, 4))
    tok = torch.tensor([[3, 1, 3, 7]])
    dy = randn(1, 4, 4)
    w.grad = before = randn(10, 4)
    start = before.clone()
    want = before.clone()
    for j, t in enumerate(tok[0].tolist()):
        want[t] += dy[0, j]
    y = M.embed(w, tok)
    assert torch.equal(y, w.detach()[tok])
    y.backward(dy)
    assert w.grad is before  # in place
    assert rel(w.grad, want) < TOL
    w.grad = None
    M.embed(w, tok).backward(dy)
    assert rel(w.grad, want - start) < TOL


def test_embed_grad_dense_path_gives_the_same_sums():
    """The CUDA path of Embed's backward (autograd's dense kernel and an add), run here on CPU,
    adds what the in-place index_add_ path adds."""
    torch.manual_seed(7)
    tok = torch.tensor([[3, 1, 3, 7], [0, 3, 9, 9]])
    dy = randn(2, 4, 4)
    got = []
    for dense in (False, True):
        w = torch.nn.Parameter(randn(10, 4))
        M.embed_grad(w, tok, dy, dense=dense)
        first = w.grad.clone()
        M.embed_grad(w, tok, dy, dense=dense)
        got.append((first, w.grad))
    assert rel(got[1][0], got[0][0]) < TOL and rel(got[1][1], got[0][1]) < TOL
    assert rel(got[0][1], 2 * got[0][0]) < TOL


def test_accumulate_grad_adds_in_the_gemm():
    """accumulate_grad: a first dW becomes w.grad; later ones are added into that tensor (addmm_);
    bf16 activations with an fp32 weight take the matmul and the add."""
    torch.manual_seed(8)
    w = torch.nn.Parameter(randn(5, 3))
    xs, dys = [randn(2, 7, 3) for _ in range(2)], [randn(2, 7, 5) for _ in range(2)]
    want = sum(dy.reshape(-1, 5).t() @ x.reshape(-1, 3) for x, dy in zip(xs, dys))
    M.accumulate_grad(w, dys[0], xs[0])
    first = w.grad
    M.accumulate_grad(w, dys[1], xs[1])
    assert w.grad is first and rel(w.grad, want) < TOL
    M.accumulate_grad(w, dys[0].bfloat16(), xs[0].bfloat16())
    assert w.grad.dtype == torch.float32 and w.grad is first
    assert rel(w.grad, want + dys[0].reshape(-1, 5).t() @ xs[0].reshape(-1, 3)) < 1e-2


def test_grad_now_linear_matches_autograd():
    """A unit with one B (GRAD_NOW): Linear adds dW into .grad itself, autograd gets none for w;
    the input gradient and the weight's .grad are plain autograd's."""
    torch.manual_seed(9)
    h0, w0, dy = randn(2, 6, 8), randn(4, 8), randn(2, 6, 4)
    got = []
    for wg in (M.GRAD_NOW, None):
        h, w = h0.clone().requires_grad_(), torch.nn.Parameter(w0.clone())
        M._proj(h, w, None, wg).backward(dy)
        got.append((h.grad, w.grad))
    assert rel(got[0][0], got[1][0]) < TOL and rel(got[0][1], got[1][1]) < TOL


class LC:
    """A single-slice layer context: no prefix, no exchange, nothing to serve."""

    def __init__(self, scale):
        self.backend, self.scale, self.prefix = SDPA, scale, []

    def serve(self):
        pass

    def fwd_exchanges(self):
        return ()

    def bwd_exchanges(self):
        return ()

    def local_blocks(self, exchanges, q_len):
        return []


def layer_params(cfg):
    return {n: M.init_param(cfg, n, 3) for n in M.layer_names(0)}


def layer(cfg, P, x, reference):
    cos, sin = M.rope_tables(cfg.head_dim, 5, x.shape[1], "cpu", torch.float32)
    if reference:
        return M.layer_forward(P, 0, cfg, x, cos, sin, M.full_causal)
    return M.layer_forward(P, 0, cfg, x, cos, sin,
                           lambda q, k, v: SliceAttention.apply(q.contiguous(), k, v, LC(default_scale(cfg.head_dim))),
                           M.GRAD_NOW)


CFG = ModelConfig(layers=1, hidden=32, heads=4, kv_heads=2, ffn=48, vocab=64)


def test_layer_matches_plain_autograd(monkeypatch):
    """A whole decoder layer (custom norm, SwiGLU, seq-major attention output) against the same
    layer built from the plain-autograd references (reference attention: SDPA over the sequence)."""
    torch.manual_seed(3)
    x0 = randn(2, 16, CFG.hidden)
    P = layer_params(CFG)
    x = x0.clone().requires_grad_()
    y = layer(CFG, P, x, reference=False)
    dy = torch.randn_like(y)
    y.backward(dy)
    got = [x.grad] + [P[n].grad.clone() for n in M.layer_names(0)]
    for p in P.values():
        p.grad = None
    monkeypatch.setattr(M, "rmsnorm", M.rmsnorm_reference)
    monkeypatch.setattr(M, "swiglu_down", M.swiglu_down_reference)
    monkeypatch.setattr(M, "rope", M.rope_reference)
    xr = x0.clone().requires_grad_()
    yr = layer(CFG, P, xr, reference=True)
    yr.backward(dy)
    want = [xr.grad] + [P[n].grad for n in M.layer_names(0)]
    assert rel(y, yr) < TOL
    for a, b in zip(got, want):
        assert rel(a, b) < 1e-5  # attention: flash (online softmax) vs SDPA's math order


def test_attention_output_saved_once():
    """The out-projection's input is a view of the attention's saved output."""
    torch.manual_seed(4)
    q, k, v = randn(1, 4, 16, 8), randn(1, 2, 16, 8), randn(1, 2, 16, 8)
    out = SliceAttention.apply(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), LC(8 ** -0.5))
    assert out.shape == (1, 4, 16, 8)
    flat = out.transpose(1, 2).reshape(1, 16, 32)
    assert flat.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()


def test_layer_saves_six_h_two_f():
    """Per layer and token, autograd keeps (6H + 2F) b + 4 heads + 8 bytes plus K/V
    (passes.memory saves="executor")."""
    from passes.memory import per_token_layer

    def saved(tokens):
        P = layer_params(CFG)
        tr = ActivationTracker(p.untyped_storage().data_ptr() for p in P.values())
        x = randn(1, tokens, CFG.hidden).requires_grad_()

        def pack(t):
            tr.add("u", t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = layer(CFG, P, x, reference=False)
        y.sum().backward()
        return tr.peak

    per_token = (saved(64) - saved(32)) / 32
    cos_sin = 2 * CFG.head_dim * 4  # the RoPE tables, once per unit (not per layer)
    model = CFG
    act, kv = per_token_layer(model, 4, "executor")
    assert per_token - cos_sin == act + kv


def test_fused_head_gives_autograd_gradients_with_the_logits_made_once():
    """The fused head (the executor's last stage, one B per unit) makes dh and dW in its forward:
    the same gradients as plain autograd, dW added to .grad already there; it saves only dh."""
    torch.manual_seed(3)
    V, H = 50, 24
    x0, norm0, head0 = randn(2, 11, H), 1 + 0.1 * randn(H), randn(V, H, scale=0.3)
    labels = torch.randint(V, (2, 11))
    got = [t.clone().requires_grad_(True) for t in (x0, norm0, head0)]
    want = [t.clone().requires_grad_(True) for t in (x0, norm0, head0)]
    got[2].grad = torch.ones(V, H)  # an earlier micro-batch's gradient: added to, not replaced
    want[2].grad = torch.ones(V, H)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        loss = M.head_loss({"norm": got[1], "lm_head": got[2]}, got[0], labels, 37.0, fuse=True)
    assert got[2].grad.sub(1).abs().max() > 1e-3  # dW is there before backward
    ref = M.head_loss_reference({"norm": want[1], "lm_head": want[2]}, want[0], labels, 37.0)
    assert abs(float(loss.detach()) - float(ref.detach())) <= 1e-6 * abs(float(ref.detach()))
    loss.backward()
    ref.backward()
    for a, b in zip(got, want):
        assert rel(a.grad, b.grad) < 1e-5, rel(a.grad, b.grad)
    # the final norm saves x, rstd and w; the head saves dh alone (no [tokens, V] tensor, no h, no lse)
    assert (2, 11, H) in saved and (2, 11) not in saved and all(V not in s for s in saved), saved


def test_fused_head_refuses_a_loss_gradient_other_than_one():
    x = randn(1, 5, 8).requires_grad_(True)
    loss = M.head_loss({"norm": torch.ones(8), "lm_head": randn(16, 8)}, x, torch.randint(16, (1, 5)), 5.0, fuse=True)
    with pytest.raises(RuntimeError, match="takes the loss's gradient to be 1, got 2.0"):
        loss.backward(torch.tensor(2.0))
