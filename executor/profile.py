"""Measure this machine with the executor's own kernels and write a device profile.

    python -m executor.profile --model '{"layers": 8, "hidden": 64, ...}' [--device cpu|cuda] -o profile.json

(`slimpipe profile` runs this as a subprocess.) What it measures, each as a curve rather than one
number, at the model's shapes and the token counts a slice can have:
- matmul: seconds per call of the layer's projections (x @ w.t()) and of their two backward
  matmuls, keyed by FLOPs per call (small calls are slower per FLOP);
- attention: the executor's backend forward/backward of one slice's queries over its own K/V
  (causal) and over one earlier slice's K/V (full, with the log-sum-exp merge), by query and
  key length;
- whole units through the executor's own Stage (1 and 3 layers): a layer's time, and what it
  takes beyond its matmuls and attention (elementwise: norms, RoPE, SwiGLU, residuals, autograd
  and the framework's per-op overhead), and a unit's fixed cost beyond its layers, by tokens;
  on CPU with the caches evicted before each forward and backward (see evict_caches);
- head (final norm, LM head, loss) and embedding, forward and backward, by token count (the head
  with evicted caches too);
- p2p: one-way seconds of a message between two local processes through the executor's own
  transport (gloo on CPU, NCCL on GPU), by size; bandwidth and latency fitted from it;
- memory (RAM or GPU memory) and how many ranks can compute at once (CPU cores; 0 = a device each).

Timings take the median of repeated runs after a warm-up, spread over rounds (4 by default:
every figure takes a share of its runs in each round), and the profile records how fast each round
ran against the median (`round_speed`), so a machine that moved while it was measured shows. On
CPU one torch thread per rank, as torchrun gives each rank.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch  # noqa: E402

from ir import ModelConfig, atomic_write  # noqa: E402

from . import model as M  # noqa: E402
from .attention import default_scale, merge, pick_backend  # noqa: E402
from .metrics import ActivationTracker  # noqa: E402

TOKENS = (32, 64, 128, 256, 512, 1024, 2048, 4096)
P2P_BYTES = (1 << 10, 1 << 14, 1 << 17, 1 << 20, 1 << 22)
FORMAT = "slimpipe-device-profile/1"


class Progress:
    """One progress line on stderr, rewritten in place."""

    def __init__(self, total: int, quiet: bool):
        self.total, self.done, self.quiet, self.t0 = total, 0, quiet, time.monotonic()

    def step(self, what: str) -> None:
        self.done += 1
        if not self.quiet:
            el = time.monotonic() - self.t0
            sys.stderr.write(f"\rprofile: {self.done}/{self.total} {what:<36} {el:5.1f} s")
            sys.stderr.flush()

    def end(self) -> None:
        if not self.quiet:
            sys.stderr.write("\n")


CLOCK = [time.thread_time]


def typical(ts) -> float:
    """The figure a profile keeps of repeated timings: their median. Not the fastest: on the
    2-vCPU Intel VM the same kernel runs in phases of about a second at speeds up to 15% apart (a
    1024x256 @ 256x704 matmul: 2.67-3.46 ms, median 3.08), and a middle-stage unit's fastest of 12
    cold runs sat 19-41% below their median (3 layers, 256-2048 tokens); the executor's units run
    at the typical speed, and the fastest runs priced them 11-27% low (bench/results/fidelity.json)."""
    return statistics.median(ts)


def samples(fn, reps: int, sync, before=None) -> list[float]:
    """Seconds of `reps` runs of fn() after one untimed warm-up. On CPU the clock is this thread's
    CPU time: other processes on a shared machine stretch wall time, not CPU time, so
    the profile stays the same under load (the simulator models how ranks share processors).
    `before` (untimed) runs before each timed run."""
    clock = CLOCK[0]
    fn()
    sync()
    ts = []
    for _ in range(reps):
        if before is not None:
            before()
        t0 = clock()
        fn()
        sync()
        ts.append(clock() - t0)
    return ts


def reps_for(tokens: int, scale: float) -> int:
    """Timed runs of a kernel over `tokens` tokens (all rounds together): 30 up to 256 tokens, fewer
    above, at least 3; `scale` multiplies them."""
    return max(3, int(scale * 30 * 256 / max(tokens, 256)))


def cold_runs(tokens: int, scale: float) -> int:
    """Timed runs (all rounds together) of what runs with the caches evicted before it: whole
    units and the head. At most 12 (x scale): each costs an eviction (a read of twice the last-level
    cache: 45 ms on the Intel VM), and runs within one round fall in the same second-long speed
    phase, so more of them buy less than another round does."""
    return max(3, min(reps_for(tokens, scale) // 2, int(12 * scale)))


def per_round(runs: int, rounds: int) -> int:
    """Runs in each of `rounds` rounds for `runs` in all (at least one a round)."""
    return max(1, -(-runs // rounds))


def matmul_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(out, in) of the layer's projections and the LM head."""
    d = cfg.head_dim
    return sorted({(cfg.heads * d, cfg.hidden), (cfg.kv_heads * d, cfg.hidden), (cfg.hidden, cfg.heads * d),
                   (cfg.ffn, cfg.hidden), (cfg.hidden, cfg.ffn), (cfg.vocab, cfg.hidden)})


def cache_bytes(base: str = "/sys/devices/system/cpu/cpu0/cache", level: int | None = None) -> int:
    """Bytes of this machine's last-level CPU cache (sysfs `base`: the highest cache level of
    cpu0), or 32 MiB where sysfs does not say; with `level`, of that level (its largest entry; the
    default where sysfs has none: 32 MiB for the last level, 1 MiB for another)."""
    if level is not None:
        return max((n for lv, n in _caches(base) if lv == level), default=1 << 20)
    best = (0, 32 << 20)
    for lv, n in _caches(base):
        if lv > best[0]:
            best = (lv, n)
    return best[1]


def _caches(base: str):
    """(level, bytes) of each cache sysfs lists under `base` (nothing where it lists none)."""
    out = []
    try:
        for d in os.listdir(base):
            try:
                with open(f"{base}/{d}/level") as f:
                    level = int(f.read())
                with open(f"{base}/{d}/size") as f:
                    text = f.read().strip()
            except (OSError, ValueError):
                continue
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
            digits = text[:-1] if mult != 1 else text
            if digits.isdigit():
                out.append((level, int(digits) * mult))
    except OSError:
        pass
    return out


def evict_caches(device, level: int | None = None):
    """A callable that, on CPU, reads a buffer twice the last-level cache, so that the next unit
    starts with cold caches; None on CUDA. Why: back to back, a small unit's weights and activations
    stay in the caches, and the fastest of such runs priced the executor's 32-token units 20-35%
    low (tiny model, 4 layers, forward: 2.00-2.19 ms hot, 2.72-2.82 ms after a 64 MiB read, 2.57
    ms per unit in a torchrun run at p=2, where other micro-batches, slices and the other rank run
    in between); at 1024 tokens 1-2% (24.1-24.8 ms hot, 24.7-25.1 ms cold).
    A read, not a write: written lines are dirty, and the unit then paid for writing them back
    (0.6-1.0 ms of a 1024-token unit's fixed cost, which no real run pays).
    `level` (2: the per-core cache here) evicts only up to that level: a split unit's W reads
    activations the executor wrote a few units before, gone from the core's cache but, for small
    models, still in a large shared last level (260 MiB on the Intel VM: evicted from it too, the
    tiny model's W per layer took 15-18% longer than evicted from the 4 MiB L2 alone, and the model
    priced W 20-41% above the executor's in five of six zero-bubble rows)."""
    if device.type != "cpu":
        return None
    buf = torch.ones(2 * cache_bytes(level=level) // 4, dtype=torch.float32)

    def evict():
        buf.sum()
    return evict


ROUNDS = 4


def measure_compute(cfg: ModelConfig, device, dtype, tokens, scale: float, prog: Progress,
                    rounds: int = ROUNDS) -> dict:
    """The compute curves of the module docstring. Measured in `rounds` rounds: each round takes its
    share of every point's runs, and a point's figure is the median over all rounds. Why: on the
    2-vCPU Intel VM the machine's speed moves in phases of about a second (one matmul timed in
    0.25 s windows for 30 s: 5th-95th percentile 0.75-1.22x the median), so runs taken back to back
    all fall in one phase; with every run of a point in one go, two profiles differed by a median
    19% per matmul and attention point (bench/results/profile_repeat.json at 3fca38e)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    evict = evict_caches(device)
    # a split unit's dW matmuls read activations written a few units before, gone from the core's
    # cache (evict_w), which the matmul curve (caches hot) priced 1.6-1.7x low in place
    evict_w = evict_caches(device, level=2)
    be = pick_backend("auto", device, dtype)
    sc = default_scale(cfg.head_dim)
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return (torch.randn(shape, generator=g) * 0.02).to(device=device, dtype=dtype)

    att: dict[tuple, list] = {}      # (pass, causal, queries, keys) -> seconds
    turns = {s: [] for s in tokens}  # tokens -> [(1-layer, 3-layer, split 2-layer) (f, b, w)] per turn
    heads = {(s, fuse): ([], []) for s in tokens for fuse in (True, False)}  # -> (forward, backward)
    emb = {s: ([], []) for s in tokens}
    mm_by_round = [{} for _ in range(rounds)]     # per round: FLOPs per call -> seconds of every call of that size
    units_by_round = [{} for _ in range(rounds)]  # tokens -> each round's 1-layer unit seconds
    runners: dict = {}               # tokens -> the three units' runners (one set of weights per layer count)
    weights: dict = {}
    Ph = {n: M.init_param(cfg, n, 0, device, dtype) for n in ("norm", "lm_head", "embed")}
    for k in range(rounds):
        tag = f"round {k + 1}/{rounds}: " if rounds > 1 else ""
        for s in tokens:
            r = per_round(reps_for(s, scale), rounds)
            for out_f, in_f in matmul_shapes(cfg):
                x, w, dy = rnd(s, in_f), rnd(out_f, in_f), rnd(s, out_f)
                for fn in (lambda: x @ w.t(), lambda: dy @ w, lambda: dy.t() @ x):  # each used once
                    mm_by_round[k].setdefault(2.0 * s * in_f * out_f, []).extend(samples(fn, r, sync))
            prog.step(f"{tag}matmul, {s} tokens")
        for s in tokens:
            _attention_round(cfg, be, sc, rnd, sync, s, tokens, per_round(reps_for(s, scale), rounds), att)
            prog.step(f"{tag}attention, {s} queries")
        # whole units of a middle stage through the executor's own Stage (autograd graph,
        # saved-tensor hooks, K/V bookkeeping included) with 1 and 3 layers, and a split unit of 2
        # layers for W, run in turns: T1 and T3 measured one after the other fell in different
        # speed phases, so a layer is the median of each turn's difference (below)
        for s in tokens:
            if s not in runners:  # built and warmed up in the first round, kept for the others
                runners[s] = [_stage_runner(cfg, device, dtype, be, s, L, sync, rnd, evict, L == 2, evict_w, weights)
                              for L in (1, 3, 2)]
                for once in runners[s]:
                    once(cold=False)
            these = [[once() for once in runners[s]] for _ in range(per_round(cold_runs(s, scale), rounds))]
            turns[s] += these
            units_by_round[k][s] = [t[0][0] + t[0][1] for t in these]  # the 1-layer unit, forward + backward
            prog.step(f"{tag}stage units, {s} tokens")
        for s in tokens:
            _head_round(cfg, Ph, rnd, g, sync, evict, device, s, per_round(cold_runs(s, scale), rounds),
                        per_round(reps_for(s, scale), rounds), heads, emb)
            prog.step(f"{tag}head, {s} tokens")

    matmul = [[fl, typical(ts)] for fl, ts in sorted(pooled(mm_by_round).items())]
    attention = [[p, c, q, t, typical(ts)] for (p, c, q, t), ts in att.items()]

    def mm_time(fl):
        return _interp(matmul, fl)

    # per layer (T3 - T1) / 2, of which the elementwise work is what its matmuls and causal
    # attention leave; per unit T1 - one layer
    elementwise, layer, unit, weight = [], [], [], []
    for s in tokens:
        ts = turns[s]
        t1 = [typical([t[0][i] for t in ts]) for i in (0, 1)]
        tf, tb = (max(typical([(t[1][i] - t[0][i]) / 2 for t in ts]), 0.0) for i in (0, 1))
        weight.append([s, typical([t[2][2] / 2 for t in ts])])
        mm_f = sum(mm_time(2.0 * s * i * o) for o, i in matmul_shapes(cfg) if o != cfg.vocab)
        mm_f += mm_time(2.0 * s * cfg.hidden * cfg.ffn)  # the layer has two (ffn, hidden) projections
        att_f = _attn(attention, "fwd", 1, s, s)
        att_b = _attn(attention, "bwd", 1, s, s)
        elementwise.append([s, max(tf - mm_f - att_f, 0.0), max(tb - 2 * mm_f - att_b, 0.0)])
        layer.append([s, tf, tb])
        unit.append([s, max(t1[0] - tf, 0.0), max(t1[1] - tb, 0.0)])
    speed = {"matmul": round_speed(mm_by_round), "unit": round_speed(units_by_round)}
    head = [[s, typical(heads[(s, True)][0]), typical(heads[(s, True)][1])] for s in tokens]
    head_split = [[s, typical(heads[(s, False)][0]), typical(heads[(s, False)][1])] for s in tokens]
    embed = [[s, typical(emb[s][0]), typical(emb[s][1])] for s in tokens]
    return {"matmul": matmul, "attention": attention, "elementwise": elementwise, "layer": layer, "unit": unit,
            "weight": weight,
            "head": head, "head_split": head_split,
            "embedding": embed, "attention_backend": be.name, "round_speed": speed}


def pooled(by_round: list[dict]) -> dict:
    """point -> every round's seconds of it, from per-round dicts of point -> seconds."""
    out: dict = {}
    for d in by_round:
        for key, ts in d.items():
            out.setdefault(key, []).extend(ts)
    return out


def round_speed(by_round: list[dict]) -> list[float]:
    """How fast each round ran: per round, the median over points of that round's median seconds
    over all rounds' median of the point (1.10: that round ran 10% slower). `by_round`: per round,
    point -> seconds. What the medians of a profile hide: a machine whose speed moved between
    rounds gives figures that a second profile may not repeat."""
    whole = {key: typical(ts) for key, ts in pooled(by_round).items()}
    return [round(typical([typical(ts) / whole[key] for key, ts in d.items() if ts and whole[key] > 0]), 4)
            if d else 1.0 for d in by_round]


def _attention_round(cfg: ModelConfig, be, sc, rnd, sync, s: int, tokens, r: int, att: dict) -> None:
    """One round of attention timings for `s` queries, appended to `att` ((pass, causal, queries,
    keys) -> seconds): the backend's forward and backward over the slice's own K/V (causal), and
    over an earlier slice's K/V of each of `tokens` keys (full, with the log-sum-exp merge and the
    dK/dV sums the executor adds), up to 4M query-key pairs; `r` runs each after a warm-up."""
    b, h, hk, d = 1, cfg.heads, cfg.kv_heads, cfg.head_dim
    q, k, v = rnd(b, h, s, d), rnd(b, hk, s, d), rnd(b, hk, s, d)
    out, lse = be.fwd(q, k, v, True, sc)
    dout = rnd(b, h, s, d)
    att.setdefault(("fwd", 1, s, s), []).extend(samples(lambda: be.fwd(q, k, v, True, sc), r, sync))
    att.setdefault(("bwd", 1, s, s), []).extend(
        samples(lambda: be.bwd(dout, q, k, v, out, lse, True, sc), r, sync))
    for t in tokens:
        if t * s > (1 << 22):
            continue
        kp, vp = rnd(b, hk, t, d), rnd(b, hk, t, d)
        o0, l0 = out.float(), lse
        acc = [torch.zeros_like(kp), torch.zeros_like(vp)]

        def fwd_full():
            o2, l2 = be.fwd(q, kp, vp, False, sc)
            return merge(o0, l0, o2.float(), l2)

        def bwd_full():
            dq, dk, dv = be.bwd(dout, q, kp, vp, out, lse, False, sc)
            acc[0].add_(dk)
            acc[1].add_(dv)
            return dq.float() + dq.float()

        att.setdefault(("fwd", 0, s, t), []).extend(samples(fwd_full, r, sync))
        att.setdefault(("bwd", 0, s, t), []).extend(samples(bwd_full, r, sync))


def _head_round(cfg: ModelConfig, Ph: dict, rnd, g, sync, evict, device, s: int, cold: int, hot: int,
                heads: dict, emb: dict) -> None:
    """One round of the head (final norm + LM head + loss; `cold` runs each of forward and backward
    with the caches evicted, fused and split: heads[(s, fuse)] = (forward, backward) seconds) and
    the embedding gather (`hot` runs: emb[s])."""
    x0 = rnd(1, s, cfg.hidden)
    labels = torch.randint(cfg.vocab, (1, s), generator=g).to(device)

    def hfwd(fuse=True):  # with the autograd graph, as the executor runs it
        return M.head_loss(Ph, x0.detach().requires_grad_(True), labels, float(s), fuse=fuse)

    def hboth(fuse=True, cold=True):
        x = x0.detach().requires_grad_(True)
        y = M.head_loss(Ph, x, labels, float(s), fuse=fuse)
        if cold and evict is not None:
            evict()
        t0 = CLOCK[0]()
        y.backward()
        sync()
        return CLOCK[0]() - t0

    def efwd():
        return M.embed(Ph["embed"], labels)

    def eboth():
        y = M.embed(Ph["embed"], labels)
        t0 = CLOCK[0]()
        y.sum().backward()
        sync()
        return CLOCK[0]() - t0

    # a unit with one B fuses the head (its gradients made in the forward); a split unit does not
    for fuse in (True, False):
        fwd, bwd = heads[(s, fuse)]
        fwd += samples(lambda fuse=fuse: hfwd(fuse=fuse), cold, sync, evict)
        hboth(fuse=fuse, cold=False)  # warm-up
        bwd += [hboth(fuse=fuse) for _ in range(cold)]
    emb[s][0].extend(samples(efwd, hot, sync))
    eboth()
    emb[s][1].extend(eboth() for _ in range(hot))
    for p_ in Ph.values():
        p_.grad = None


class _NoExchange:
    """The KV-exchange service of a stage measured alone: no partners, nothing to serve."""

    def serve(self) -> bool:
        return False


def _stage_runner(cfg: ModelConfig, device, dtype, be, s: int, L: int, sync, rnd, evict=None,
                  split: bool = False, evict_weight=None, shared: dict | None = None):
    """A callable that runs one unit of s tokens through executor.stage.Stage, the middle stage (L
    layers) of a one-rank, three-stage plan (so no embedding and no head), and returns its
    (forward, backward, weight) seconds. `split`: the unit's backward is split, backward is then
    its I and weight its W (the WeightGradStore's dW matmuls and .grad sums, as the W instruction
    runs them); else weight is 0. `evict` (evict_caches; untimed) runs before each forward and
    backward, `evict_weight` before W; once(cold=False) (a warm-up) evicts nothing. `shared`: a
    dict of Parameters by layer count, so runners of other token counts reuse the same weights.
    The unit's buffers are dropped after each run (untimed), so a kept runner holds no activations."""
    from ir import PlanSpec

    from .data import SyntheticBatches
    from .params import Parameters
    from .stage import AttentionEnv, Stage

    # a model with a sliding window (Mistral's config.json) is measured with full attention at every
    # length: plans refuse a sequence longer than the window, so no plan prices windowed attention
    spec = PlanSpec(schedule="gpipe", model=cfg.model_copy(update={"layers": L + 2, "sliding_window": None}), seq_len=s, pp=1,
                    microbatches=1, slices=1, virtual_stages=3, slice_lens=((s,),), placement=((0, 1, 2),),
                    stage_layers=(1, L, 1))
    params = None if shared is None else shared.get(L)
    if params is None:
        params = Parameters(spec, (1,), device, dtype, 1e-3)
        if shared is not None:
            shared[L] = params
    env = AttentionEnv(be, default_scale(cfg.head_dim), _NoExchange(), None)
    st = Stage(spec, 1, 0, params.chunks[0], device=device, dtype=dtype,
               tracker=ActivationTracker(params.storage_ptrs()), env=env, batches=SyntheticBatches(spec, device))
    x, dy = rnd(1, s, cfg.hidden), rnd(1, s, cfg.hidden)
    clock = CLOCK[0]
    if split:
        st.split_units = {(0, 0)}

    def once(cold: bool = True) -> tuple[float, float, float]:
        st.reset()
        st.acts_in[(0, 0)] = x
        if cold and evict is not None:
            evict()
        c0 = clock()
        st.forward(0, 0, [])
        sync()
        c1 = clock()
        st.grads_in[(0, 0)] = dy
        if cold and evict is not None:
            evict()
        c2 = clock()
        st.backward(0, 0, [], split=split)
        sync()
        c3 = clock()
        c4 = c5 = 0.0
        if split:
            if cold and evict_weight is not None:
                evict_weight()
            c4 = clock()
            st.backward_weight(0, 0)
            sync()
            c5 = clock()
        st.reset()
        return c1 - c0, c3 - c2, c5 - c4
    return once


def _interp(curve, x: float) -> float:
    """Seconds at x on a [[x, seconds], ...] curve sorted by x: linear between points (a call's
    time is overhead + work, close to linear in its size), extrapolated from the end segments."""
    if len(curve) == 1:
        return curve[0][1] * x / curve[0][0]
    i = 1
    while i < len(curve) - 1 and curve[i][0] < x:
        i += 1
    (x0, y0), (x1, y1) = curve[i - 1][:2], curve[i][:2]
    y = y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 != x0 else y1
    return max(y, min(y0, y1) * min(1.0, x / x0) if x < x0 else 0.0, 0.0)


def _attn(rows, pass_, causal, q, k) -> float:
    pts = sorted([qq * kk, t] for p, c, qq, kk, t in rows if p == pass_ and c == causal)
    return _interp(pts, q * k)


# ---------------------------------------------------------------- point to point


def _wait(tp, p) -> None:
    """Wait a Pending as the executor's Waiter does: block in it where it can, else poll."""
    if p.block is not None:
        p.block(60.0)
    while not p.ready():
        tp.wait_change(tp.version(), 0.05)


def _p2p_worker(rank: int, port: int, device_type: str, sizes, reps: int, out_path: str) -> None:
    import torch.distributed as dist

    from .transport import init_dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    device = torch.device("cuda", rank % torch.cuda.device_count()) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tp = init_dist(rank, 2, device, 60.0, wait="direct")  # as the executor waits in a plan without KV exchanges
    res = []
    for n in sizes:
        t = torch.zeros(n // 4, dtype=torch.float32, device=device)
        spec = [(t.shape, t.dtype)]
        times, cpu = [], []
        for i in range(reps + 1):
            dist.barrier()
            c0 = time.process_time()  # every thread of the process: gloo's, the watchers', this one
            t0 = time.perf_counter()
            if rank == 0:
                tp.send(1, 2 * i, [t])
                p = tp.post_recv(1, 2 * i + 1, spec)
            else:
                p = tp.post_recv(0, 2 * i, spec)
            _wait(tp, p)
            (got,) = p.value()
            if rank == 1:
                tp.send(0, 2 * i + 1, [got])
            for s in tp.pending_sends():
                _wait(tp, s)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:
                times.append((time.perf_counter() - t0) / 2)
                cpu.append((time.process_time() - c0) / 2)  # a send and a receive on this rank
        res.append([n, min(times), statistics.median_high(cpu)])  # and the median processor s per send or receive
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(res, f)
    tp.close()


def measure_p2p(device_type: str, sizes, reps: int) -> list:
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "p2p.json")
        mp.spawn(_p2p_worker, args=(port, device_type, list(sizes), reps, out), nprocs=2, join=True)
        with open(out) as f:
            return json.load(f)


def measure_timeslice(procs: int, seconds: float = 1.0) -> float:
    """Median seconds the OS lets a thread run before it is switched out while procs + 1 CPU-bound
    processes share procs processors (each spins on the clock; a jump over 0.2 ms is a switch).
    4 ms on the 2-core machine this project is built on; 0 when procs is 0 (a device per rank)."""
    if procs <= 0:
        return 0.0
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ps = [ctx.Process(target=_spin, args=(q, seconds)) for _ in range(procs + 1)]
    for p in ps:
        p.start()
    runs = [r for _ in ps for r in q.get()]
    for p in ps:
        p.join()
    return statistics.median_high(runs) if runs else 0.0


def _spin(q, seconds: float) -> None:
    last = start = time.perf_counter()
    end = start + seconds
    runs = []
    while last < end:
        now = time.perf_counter()
        if now - last > 2e-4:  # switched out: one run is over
            runs.append(last - start)
            start = now
        last = now
    q.put(runs)


def fit_p2p(curve) -> tuple[float, float]:
    """(bandwidth bytes/s, latency s) of one-way times t = latency + bytes / bandwidth, least squares
    relative to each point (small and large messages count alike)."""
    # minimise sum ((a + b n - t) / t)^2 over a (latency) and b (1 / bandwidth)
    w = [1.0 / (t * t) for _, t in curve]
    sw = sum(w)
    sn = sum(wi * n for wi, (n, _) in zip(w, curve))
    snn = sum(wi * n * n for wi, (n, _) in zip(w, curve))
    st = sum(wi * t for wi, (_, t) in zip(w, curve))
    snt = sum(wi * n * t for wi, (n, t) in zip(w, curve))
    det = sw * snn - sn * sn
    b = (sw * snt - sn * st) / det if det else 0.0
    a = (st - b * sn) / sw
    if b <= 0:
        b = curve[-1][1] / curve[-1][0]
    return 1.0 / b, max(a, 0.0)


# ---------------------------------------------------------------- the profile


def processors(device_type: str) -> int:
    if device_type == "cuda":
        return 0
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def memory_bytes(device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def build(cfg: ModelConfig, device_type: str = "cpu", dtype: str = "fp32", scale: float = 1.0,
          tokens=TOKENS, quiet: bool = False, name: str | None = None, rounds: int = ROUNDS) -> dict:
    """Measure and return the profile as a JSON-ready dict (passes.costs.load_profile reads it);
    `rounds`: see measure_compute."""
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    device = torch.device("cuda" if device_type == "cuda" else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    else:
        CLOCK[0] = time.perf_counter
    prog = Progress(4 * len(tokens) * rounds + 2, quiet)
    t0 = time.monotonic()
    comp = measure_compute(cfg, device, dt, tokens, scale, prog, rounds)
    rows = measure_p2p(device.type, P2P_BYTES, max(5, int(30 * scale)))
    p2p, p2p_cpu = [[n, t] for n, t, _ in rows], [[n, c] for n, _, c in rows]
    slice_s = measure_timeslice(processors(device.type))
    prog.step("point to point")
    bw, lat = fit_p2p(p2p)
    peak = max(fl / t for fl, t in comp["matmul"])
    attn_rate = max((4 * cfg.head_dim + 3) * cfg.heads * (q * k / 2 if c else q * k) / t
                    for p, c, q, k, t in comp["attention"] if p == "fwd")
    prog.step("done")
    prog.end()
    return {
        "name": name or f"measured-{device.type}",
        "peak_flops": peak, "mm_efficiency": 1.0, "attn_efficiency": min(1.0, attn_rate / peak),
        "p2p_bandwidth": bw, "p2p_latency": lat, "intra_bandwidth": bw, "dp_bandwidth": bw,
        "memory_bytes": memory_bytes(device),
        "measured": {
            "format": FORMAT, "device": device.type, "dtype": dtype, "processors": processors(device.type),
            "threads_per_rank": torch.get_num_threads() if device.type == "cpu" else 0,
            "model": cfg.model_dump(), "attention_backend": comp["attention_backend"],
            "torch": torch.__version__, "seconds": round(time.monotonic() - t0, 1), "rounds": rounds,
            "matmul": comp["matmul"], "attention": comp["attention"], "elementwise": comp["elementwise"],
            "layer": comp["layer"], "unit": comp["unit"], "weight": comp["weight"],
            "head": comp["head"], "head_split": comp["head_split"], "embedding": comp["embedding"], "p2p": p2p,
            "p2p_cpu": p2p_cpu, "timeslice_s": slice_s, "round_speed": comp["round_speed"],
            "units_cache": "evicted before each run" if device.type == "cpu" else "as left",
        },
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m executor.profile", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="model dimensions as JSON (ir.ModelConfig fields)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--scale", type=float, default=1.0, help="repetitions relative to the default (about a minute)")
    ap.add_argument("--rounds", type=int, default=ROUNDS, help="rounds the runs of every figure are spread over")
    ap.add_argument("--name", help="profile name (default measured-<device>)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--prog", default="executor.profile", help=argparse.SUPPRESS)  # names the caller in its lines
    a = ap.parse_args(argv)
    cfg = ModelConfig(**json.loads(a.model))
    if a.rounds < 1:
        print(f"{a.prog}: error: --rounds {a.rounds} must be an integer >= 1", file=sys.stderr)
        return 2
    if a.device == "cuda" and not torch.cuda.is_available():
        print(f"{a.prog}: error: --device cuda but no CUDA device is available (torch {torch.__version__}); "
              f"allowed here: --device cpu", file=sys.stderr)
        return 2
    if a.device == "cuda" and torch.cuda.device_count() < 2:
        print(f"{a.prog}: note: one GPU: p2p measured between two processes on the same GPU", file=sys.stderr)
    prof = build(cfg, a.device, a.dtype, a.scale, quiet=a.quiet, name=a.name, rounds=a.rounds)
    atomic_write(a.output, json.dumps(prof, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
