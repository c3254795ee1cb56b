"""Cost model: FLOPs of every unit of a Llama-style decoder, turned into seconds by a device profile.

Per decoder layer, forward, for a slice of s tokens whose cache (earlier slices) holds P tokens,
H hidden, h heads, g kv heads, d = H/h head dim, F ffn size (all matmul FLOPs = 2 * m * n * k):
    QKV        2 s H (H + 2 g d)
    out proj   2 s H H
    MLP        2 s H F * k        (k = 3 matrices for SwiGLU: gate, up, down; 2 for a plain MLP)
    attention  (4d + 3) h * pairs, pairs = s P + s^2 / 2   (causal, bottom-right aligned: QK^T
               and PV are 2d each per query-key pair, softmax about 3)
    elementwise  2 RMSNorms 4 s H each, RoPE 3 s d (h + g), SwiGLU activation 4 s F, residuals 2 s H
The first stage adds the embedding (a gather: no FLOPs); the last the final RMSNorm, the LM head
2 s H V and the loss (about 5 s V). Backward: matmuls 2x forward (input and weight gradients),
attention 2.5x (flash-attn recomputes the scores), elementwise 2x.

Time: matmul FLOPs / (peak * mm_efficiency) + attention FLOPs / (peak * attn_efficiency); the
elementwise part runs at the matmul rate (it is a small term). Tensor parallel degree t divides
both and adds per layer two all-reduces (sequence parallel: reduce-scatter + all-gather, same
volume) of the slice's activation, 2 (t-1)/t * s H bytes each way, on the intra-node link.
Context parallel degree c splits every slice's tokens over c GPUs (load-balanced causal split into
2c chunks, each padded to whole 128-query flash tiles) and ring-exchanges K/V in c-1 steps per layer
(2(c-1) in backward), each paying the link's latency; the ring overlaps attention: the slower counts. Data parallel
degree dp adds one gradient all-reduce of the rank's parameters after the pipeline drains.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from functools import lru_cache

from ir import KINDS, Instr, Plan, PlanSpec, SpecError, read_user_json, split_units
from ir.limits import gather_blocks

GIB = 1 << 30


MEASURED_FORMAT = "slimpipe-device-profile/1"


@dataclass(frozen=True, eq=False)
class Measured:
    """Curves measured on one machine with the executor's own kernels (`slimpipe profile`).

    matmul [[FLOPs, s]] per call; attention [["fwd"|"bwd", causal 0/1, queries, keys, s]] per call
    (full calls include the log-sum-exp merge); elementwise, head, embedding [[tokens, fwd s, bwd s]]
    (elementwise: a whole layer beyond its matmuls and attention; head: final norm, LM head and loss
    as a unit with one B runs them, the gradients made in the forward; head_split, optional: as a
    unit whose backward is split runs them, the logits made again in I); p2p [[bytes, one-way s]];
    p2p_cpu, optional: [[bytes, processor s]] that a send or a receive costs its rank (every thread of
    its process: packing, gloo's threads, the watcher, the wait); weight, optional: [[tokens, s]] a
    split unit's W per decoder layer (its seven dW matmuls and .grad sums, the per-core cache
    evicted before); processors: ranks that can compute at once (CPU cores; 0 = a device per rank);
    meta["timeslice_s"], optional: how long the OS lets a thread run while others wait for a
    processor (measured with processors + 1 spinning processes)."""

    processors: int
    matmul: tuple
    attention: tuple
    elementwise: tuple
    head: tuple
    embedding: tuple
    p2p: tuple
    unit: tuple = ()           # [[tokens, fwd s, bwd s]] a unit's fixed cost beyond its layers (optional)
    head_split: tuple = ()     # [[tokens, fwd s, bwd s]] the head of a split unit (optional; else head)
    p2p_cpu: tuple = ()        # [[bytes, s]] processor time of a send or receive on its rank (optional)
    weight: tuple = ()         # [[tokens, s]] a split unit's W per layer (optional; else the matmul curve)
    meta: dict = field(default_factory=dict)

    @property
    def timeslice(self) -> float:
        """Seconds the OS runs a thread while others wait (0: not measured; ranks share fairly)."""
        return float(self.meta.get("timeslice_s") or 0.0)  # checked when the profile is read (_measured)

    def to_json(self) -> dict:
        out = {k: [list(r) for r in getattr(self, k)] for k in CURVES if k in REQUIRED or getattr(self, k)}
        return {"format": MEASURED_FORMAT, **self.meta, "processors": self.processors, **out}


DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def profile_dtype(profile: "DeviceProfile | None") -> str | None:
    """The dtype a measured profile was measured in (`slimpipe profile --dtype`, recorded as
    measured.meta["dtype"]: what the executor ran then; its default is fp32), None for a built-in
    profile or one that names none. The default dtype of every command that prices a plan
    (CostModel, and the CLI's compiler.cli.common.chosen_dtype), so one plan is priced the same
    way by simulate, compile's exchange levelling, compare, tune, trace and plot."""
    m = getattr(profile, "measured", None)
    name = m.meta.get("dtype") if m is not None else None
    return name if name in DTYPE_BYTES else None


def profile_dtype_bytes(profile: "DeviceProfile | None", default: int = 2) -> int:
    """Bytes per element of profile_dtype(profile), else `default` (2: bf16, what the built-in GPU
    profiles assume)."""
    name = profile_dtype(profile)
    return DTYPE_BYTES[name] if name else default


CURVES = {"matmul": 2, "attention": 5, "elementwise": 3, "head": 3, "embedding": 3, "p2p": 2, "unit": 3,
          "head_split": 3, "p2p_cpu": 2, "weight": 2}
REQUIRED = ("matmul", "attention", "elementwise", "head", "embedding", "p2p")


@dataclass(frozen=True)
class DeviceProfile:
    """What one GPU and its links can do. Bandwidths in bytes/s, latencies in seconds. `measured`
    (optional): curves measured on this machine; the cost model then times every kernel call from
    them instead of FLOPs / (peak * efficiency)."""

    name: str
    peak_flops: float          # dense bf16 matmul peak, FLOP/s
    mm_efficiency: float       # fraction of peak reached by the model's matmuls
    attn_efficiency: float     # fraction of peak reached by (flash) attention
    p2p_bandwidth: float       # pipeline send/recv and KV exchange between ranks
    p2p_latency: float
    intra_bandwidth: float     # tensor/context parallel collectives (NVLink)
    dp_bandwidth: float        # data-parallel gradient all-reduce
    memory_bytes: float        # HBM per GPU
    measured: Measured | None = None

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "measured"}
        if self.measured is not None:
            out["measured"] = self.measured.to_json()
        return out


PROFILES = {
    # H100 SXM: 989 TFLOP/s dense bf16, NDR 400 Gb/s per GPU between nodes, NVLink 4 in a node
    "h100": DeviceProfile("h100", 989e12, 0.70, 0.55, 50e9, 10e-6, 400e9, 50e9, 80 * GIB),
    # A100 SXM: 312 TFLOP/s dense bf16, HDR 200 Gb/s per GPU, NVLink 3
    "a100": DeviceProfile("a100", 312e12, 0.70, 0.50, 25e9, 10e-6, 240e9, 25e9, 80 * GIB),
}


def load_profile(arg: "str | DeviceProfile | None") -> DeviceProfile:
    """A DeviceProfile as given, None (h100), a built-in profile name, or a JSON file with every
    DeviceProfile field (name optional)."""
    if isinstance(arg, DeviceProfile):
        return arg
    if arg is None:
        return PROFILES["h100"]
    if not isinstance(arg, str):
        raise TypeError(f"profile must be None, a profile name, a .json path or a DeviceProfile, not {arg!r}")
    if arg in PROFILES:
        return PROFILES[arg]
    if not arg.endswith(".json"):
        raise SpecError(f"--device-profile {arg!r} is unknown; allowed: {', '.join(PROFILES)} or a path to a .json file")
    return profile_from_dict(read_user_json(arg, "--device-profile", f"{', '.join(PROFILES)} or a JSON file"), arg)


def _shown(v) -> str:
    """A value from a JSON file as the file spells it (true, null, "abc"), for error lines."""
    try:
        return json.dumps(v)
    except (TypeError, ValueError):
        return repr(v)


def profile_from_dict(d, arg: str = "<dict>", where: str | None = None) -> DeviceProfile:
    """A DeviceProfile from its JSON form (what to_json writes), checked; `arg` is its default name,
    `where` names it in errors (default: "--device-profile 'arg'")."""
    names = [f.name for f in fields(DeviceProfile)]
    where = where or f"--device-profile {arg!r}"
    if not isinstance(d, dict):
        raise SpecError(f"{where}: must be a JSON object with {', '.join(names)}")
    d = dict(d)
    d.setdefault("name", arg)
    names = [n for n in names if n != "measured"]
    measured = d.pop("measured", None)
    extra = set(d) - set(names)
    missing = [k for k in names if k not in d]
    if extra or missing:
        raise SpecError(f"{where}: " + (f"unknown field(s) {sorted(extra)}" if extra else
                        f"missing {', '.join(missing)}") + f"; fields: {', '.join(names)} (and optionally measured)")
    for k in names[1:]:
        v = d[k]
        number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # NaN, Infinity: no
        if k.endswith("efficiency") and not (number and 0 < v <= 1):
            raise SpecError(f"{where}: {k}={_shown(v)} must be a number in (0, 1]")
        if not number or v < 0 or (v == 0 and k != "p2p_latency"):
            raise SpecError(f"{where}: {k}={_shown(v)} must be a "
                            + ("finite number >= 0" if k == "p2p_latency" else "finite positive number"))
    if measured is not None:
        d["measured"] = _measured(where, measured)
    return DeviceProfile(**d)


def _measured(where: str, m) -> Measured:
    """The `measured` block of a profile file, checked: one line naming what is wrong (`where`
    names the profile)."""
    where = f"{where}: measured"
    if not isinstance(m, dict) or m.get("format") != MEASURED_FORMAT:
        raise SpecError(f"{where} must be an object with format {MEASURED_FORMAT!r} (written by `slimpipe profile`)")
    proc = m.get("processors")
    if not isinstance(proc, int) or isinstance(proc, bool) or proc < 0:
        raise SpecError(f"{where}.processors={_shown(proc)} must be an integer >= 0")
    curves = {}
    for k, width in CURVES.items():
        rows = m.get(k)
        if rows is None and k not in REQUIRED:
            continue
        if not isinstance(rows, list) or not rows:
            raise SpecError(f"{where}.{k} must be a non-empty list of rows")
        for row in rows:
            nums = row[1:] if k == "attention" else row
            ok = isinstance(row, list) and len(row) == width and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in nums)
            if ok and k == "attention":
                ok = row[0] in ("fwd", "bwd") and row[1] in (0, 1) and row[2] > 0 and row[3] > 0
            if not ok:
                raise SpecError(f"{where}.{k}: row {_shown(row)} must be {width} finite numbers >= 0"
                                + (" (\"fwd\"|\"bwd\", causal 0|1, queries, keys, seconds)" if k == "attention" else ""))
        curves[k] = tuple(tuple(r) for r in sorted(rows, key=lambda r: tuple(r[:2]) if k != "attention" else (0,)))
    meta = {k: v for k, v in m.items() if k not in CURVES and k not in ("format", "processors")}
    ts = meta.get("timeslice_s", 0)
    if not isinstance(ts, (int, float)) or isinstance(ts, bool) or not 0 <= ts < 1:
        raise SpecError(f"{where}.timeslice_s={_shown(ts)} must be a number of seconds >= 0 and < 1 "
                        f"(how long the OS runs a thread while others wait; 0 or absent: ranks share fairly)")
    if "dtype" in meta and (not isinstance(meta["dtype"], str) or meta["dtype"] not in DTYPE_BYTES):
        raise SpecError(f"{where}.dtype={_shown(meta['dtype'])} is unknown; allowed: {', '.join(DTYPE_BYTES)} "
                        f"(the dtype `slimpipe profile` measured in)")
    return Measured(processors=proc, meta=meta, **curves)


def curve_at(rows, x: float, col: int = 1) -> float:
    """Seconds at x on rows sorted by x (column `col`): linear between the two nearest points (a
    call's time is overhead + work, close to linear in its size), extended from the end segments,
    never below zero or, under the smallest point, below its time scaled down with x."""
    if len(rows) == 1:
        return rows[0][col] * x / rows[0][0] if rows[0][0] else rows[0][col]
    i = 1
    while i < len(rows) - 1 and rows[i][0] < x:
        i += 1
    x0, y0, x1, y1 = rows[i - 1][0], rows[i - 1][col], rows[i][0], rows[i][col]
    y = y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 != x0 else y1
    if x < x0:
        y = max(y, y0 * x / x0) if x0 else y0
    return max(y, 0.0)


@lru_cache(maxsize=64)
def _attention_curve(m: Measured, pass_: str, causal: int) -> tuple:
    pts = {}
    for p, c, q, k, t in m.attention:
        if p == pass_ and c == causal:
            pts.setdefault(q * k, []).append(t)
    if not pts:
        raise SpecError(f"measured profile has no {pass_} {'causal' if causal else 'full'} attention rows")
    return tuple((x, sum(v) / len(v)) for x, v in sorted(pts.items()))


def _pieces(lens) -> list[tuple[int, int]]:
    """[(lo, hi)] of consecutive slices of `lens` tokens from token 0."""
    out, a = [], 0
    for n in lens:
        out.append((a, a + n))
        a += n
    return out


def attention_call(m: Measured, backward: bool, causal: bool, q: float, k: float) -> float:
    """Seconds of one attention call of q queries over k keys (measured curve by q*k)."""
    return curve_at(_attention_curve(m, "bwd" if backward else "fwd", int(causal)), q * k)


# ---------------------------------------------------------------- FLOPs (pure arithmetic)

def attention_pairs(s: float, prefix: float) -> float:
    """Query-key pairs of a causal slice of s tokens over a cache of `prefix` tokens."""
    return s * prefix + s * s / 2


def bias_width(model) -> int:
    """Bias entries of one decoder layer (each costs one add per token)."""
    h, g, d = model.heads, model.kv_heads, model.head_dim
    return ((h + 2 * g) * d if model.qkv_bias else 0) + (model.hidden if model.o_bias else 0) + \
        (2 * model.ffn + model.hidden if model.mlp_bias else 0)


def layer_flops(model, s: float, prefix: float, mlp_matrices: int = 3, elementwise: bool = True) -> tuple[float, float]:
    """(matmul + elementwise, attention) forward FLOPs of one decoder layer for one slice."""
    H, h, g, F, d = model.hidden, model.heads, model.kv_heads, model.ffn, model.head_dim
    mm = 2 * s * H * (h * d + 2 * g * d) + 2 * s * h * d * H + 2 * s * H * F * mlp_matrices
    if elementwise:
        mm += 8 * s * H + 3 * s * d * (h + g) + (4 * s * F if mlp_matrices == 3 else 0) + 2 * s * H
        mm += s * bias_width(model)
        if model.qk_norm:
            mm += 4 * s * d * (h + g)
    attn = (4 * d + 3) * h * attention_pairs(s, prefix)
    return mm, attn


def head_flops(model, s: float) -> float:
    """Forward FLOPs of final norm + LM head + loss on the last stage."""
    return 4 * s * model.hidden + 2 * s * model.hidden * model.vocab + 5 * s * model.vocab


def model_forward_flops(model, s: float, prefix: float, mlp_matrices: int = 3, elementwise: bool = True,
                        vocab_factor: float = 4.0) -> float:
    """Forward FLOPs of one slice through the whole model (the partition's objective).

    The vocabulary term is vocab_factor * s * H * V; 4 is Seq1F1B's accounting (embedding as a
    one-hot matmul plus the LM head), so that partitions agree with theirs."""
    mm, attn = layer_flops(model, s, prefix, mlp_matrices, elementwise)
    return vocab_factor * s * model.hidden * model.vocab + model.layers * (mm + attn)


# ---------------------------------------------------------------- per-unit times of a plan

BWD_MM, BWD_ATTN = 2.0, 2.5
FLASH_TILE = 128  # queries per flash-attention tile (flash-attn 2's block size on Hopper/Ampere)


def cost_class(backward) -> str:
    """False / True (the older boolean) or a cost class of ir.KINDS -> the cost class."""
    if backward is True:
        return "backward"
    if backward is False:
        return "forward"
    return backward


def unit_parts(model, s: int, prefix: int, backward, tp: int, cp: int, prof: DeviceProfile,
               dtype_bytes: int = 2, layers: int = 1, last: bool = False, mbs: int = 1
               ) -> tuple[float, float, float, float]:
    """Seconds of one unit (slice of s tokens after `prefix`, `layers` decoder layers, LM head and
    loss if `last`), per GPU of its tp*cp group, split as (matmul, attention, cp ring exchange of
    the K/V it attends over, tp collectives). Its time is mm + max(attention, ring) + tp: the
    ring is overlapped with attention.

    `backward`: False/"forward", True/"backward" (fused: input and weight gradients), or a split
    backward's half: "backward_input" (I: the matmuls' input gradients, 1x their forward FLOPs,
    the elementwise backward 2x, all of the attention backward, the cp ring and the tp
    collectives) or "backward_weight" (W: the matmuls' weight gradients, 1x their forward FLOPs,
    LM head included; no attention, no communication). I + W = B."""
    cls = cost_class(backward)
    mm, attn = layer_flops(model, s, prefix)
    mm, attn = mm * layers, attn * layers
    if last:
        mm += head_flops(model, s)
    if cls in ("backward_input", "backward_weight"):
        pure = layer_flops(model, s, prefix, elementwise=False)[0] * layers
        if last:
            pure += 2 * s * model.hidden * model.vocab
        if cls == "backward_weight":
            scale = mbs / (tp * cp)
            return pure * scale / (prof.peak_flops * prof.mm_efficiency), 0.0, 0.0, 0.0
        mm, attn = pure + (mm - pure) * BWD_MM, attn * BWD_ATTN
    backward = cls != "forward"
    if cls == "backward":
        mm, attn = mm * BWD_MM, attn * BWD_ATTN
    scale = mbs / (tp * cp)
    t_mm = mm * scale / (prof.peak_flops * prof.mm_efficiency)
    t_attn = attn * scale / (prof.peak_flops * prof.attn_efficiency)
    ring = 0.0
    if cp > 1:
        # the load-balanced causal split cuts the slice's queries into 2cp chunks; flash attention
        # works in whole tiles of FLASH_TILE queries, so a chunk shorter than a tile costs a tile
        chunk = s / (2 * cp)
        t_attn *= math.ceil(chunk / FLASH_TILE) * FLASH_TILE / chunk if chunk > 0 else 1.0
        # the ring: cp-1 steps per layer pass the K/V blocks on (backward also returns dK/dV: twice
        # the steps); each step is a message with its latency, like the tp collectives and p2p sends
        kv = 2 * model.kv_heads * model.head_dim * (prefix + s) * mbs * dtype_bytes / tp
        steps = (cp - 1) * (2 if backward else 1)
        ring = layers * ((cp - 1) / cp * kv / prof.intra_bandwidth * (2 if backward else 1) + steps * prof.p2p_latency)
    t_tp = 0.0
    if tp > 1:
        vol = 2 * (tp - 1) / tp * (s * mbs / cp) * model.hidden * dtype_bytes
        t_tp = layers * 2 * (vol / prof.intra_bandwidth + prof.p2p_latency)
    return t_mm, t_attn, ring, t_tp



class CostModel:
    """Seconds of every compute unit and message of a plan under a device profile.

    dtype_bytes sizes activations on the wire (2 = bf16); None: the profile's own
    (profile_dtype_bytes: a measured profile's dtype, else bf16)."""

    def __init__(self, spec: PlanSpec, profile: DeviceProfile, dtype_bytes: int | None = None, plan: Plan | None = None):
        self.spec, self.prof = spec, profile
        self.bytes = profile_dtype_bytes(profile) if dtype_bytes is None else dtype_bytes
        # (rank, mb, slice, chunk) of the units whose backward is split (I, W): with a measured profile
        # their forward and I time the loss head as the executor runs a split unit (head_split)
        self.split = frozenset((r, *u) for r, st in enumerate(plan.ranks) for u in split_units(st)) \
            if plan is not None else frozenset()
        self.stage_of = [list(ch) for ch in spec.placement]
        self.last = spec.num_stages - 1
        self.offsets = [spec.slice_offsets(mb) for mb in range(spec.microbatches)]
        self._unit = lru_cache(maxsize=None)(self._unit_time)
        self._measured_unit = lru_cache(maxsize=None)(self._measured_time)

    def _unit_time(self, stage: int, s: int, prefix: int, backward, extra_s: float) -> float:
        """Seconds of a unit; extra_s attention seconds moved in (+) or out (-) by a KV exchange."""
        spec, prof = self.spec, self.prof
        t_mm, t_attn, ring, t_tp = unit_parts(spec.model, s, prefix, backward, spec.tp, spec.cp, prof, self.bytes,
                                              layers=spec.stage_layers[stage], last=stage == self.last,
                                              mbs=spec.micro_batch_size)
        t_attn += extra_s
        return t_mm + max(t_attn, ring) + t_tp

    def _measured_time(self, stage: int, s: int, prefix_lens: tuple, backward, split: bool = False) -> float:
        """Seconds of a unit from a measured profile: per layer the seven projections (backward: input
        and weight gradient of each) on the matmul curve, the causal attention over the slice itself
        and one call per block of earlier slices (ir.limits.gather_blocks, as the executor attends
        them) on the attention curve, the elementwise rest; plus LM head
        and loss on the last stage, the embedding on the first, the unit's fixed cost. tp/cp divide the tokens.
        Split backward: W is the weight-gradient half of the projections (and of the LM head on the
        last stage, see _measured_weight), I the fused backward less its dW matmuls;
        `split` (a split unit's forward; always for I and W) takes the head from head_split."""
        cls = cost_class(backward)
        if cls in ("backward_input", "backward_weight"):
            if cls == "backward_weight":
                return self._measured_weight(stage, s)
            full = self._measured_time(stage, s, prefix_lens, "backward", True)
            return max(full - self._measured_weight(stage, s, hot=True), 0.0)
        backward = cls == "backward"
        spec, m = self.spec, self.prof.measured
        div = spec.tp * spec.cp
        tok = s * spec.micro_batch_size / div
        mm = self._measured_projections(s) * (2 if backward else 1)
        attn = attention_call(m, backward, True, tok, tok)
        for lo, hi in gather_blocks(_pieces(prefix_lens), s):  # the executor's calls over the prefix
            attn += attention_call(m, backward, False, tok, (hi - lo) * spec.micro_batch_size / div)
        col = 2 if backward else 1
        per_layer = mm + attn + curve_at(m.elementwise, tok, col)
        t = per_layer * spec.stage_layers[stage]
        if stage == self.last:
            t += curve_at(m.head_split if split and m.head_split else m.head, tok, col)
        if stage == 0:
            t += curve_at(m.embedding, tok, col)
        if m.unit:
            t += curve_at(m.unit, tok, col)
        return t

    def _measured_weight(self, stage: int, s: int, hot: bool = False) -> float:
        """Seconds of a split unit's W on `stage` from a measured profile: the weight gradients of each
        layer's seven projections (the `weight` curve when the profile has one, else their dW
        matmuls on the matmul curve) and, on the last stage, of the LM head (dW = g^T h, 2 * tokens *
        hidden * vocab FLOPs on the matmul curve): what executor.model's WeightGradStore.run
        computes (the split head leaves its dW to the store, as the projections do). hot=True: the dW
        matmuls on the matmul curve whatever the profile has, the share of them in a fused backward
        (I is that backward less this: a split unit's I + W exceed its B by W's colder caches and
        store, as they do in the executor)."""
        spec, m = self.spec, self.prof.measured
        tok = s * spec.micro_batch_size / (spec.tp * spec.cp)
        per_layer = curve_at(m.weight, tok) if m.weight and not hot else self._measured_projections(s)
        w = per_layer * spec.stage_layers[stage]
        if stage == self.last:
            w += curve_at(m.matmul, 2.0 * tok * spec.model.hidden * spec.model.vocab)
        return w

    def _measured_projections(self, s: int) -> float:
        """Seconds of one layer's seven projections for s tokens on the measured matmul curve."""
        spec, m = self.spec, self.prof.measured
        cfg = spec.model
        tok = s * spec.micro_batch_size / (spec.tp * spec.cp)
        d, H, F = cfg.head_dim, cfg.hidden, cfg.ffn
        projs = ((cfg.heads * d, H), (cfg.kv_heads * d, H), (cfg.kv_heads * d, H), (H, cfg.heads * d),
                 (F, H), (F, H), (H, F))
        return sum(curve_at(m.matmul, 2.0 * tok * o * i) for o, i in projs)

    def unit_time_of(self, stage: int, s: int, prefix_lens: tuple, backward: bool) -> float:
        """Seconds of a unit of s tokens after earlier slices of `prefix_lens` tokens on `stage`
        (no exchange)."""
        if self.prof.measured is not None:
            return self._measured_unit(stage, s, tuple(prefix_lens), backward)
        return self._unit(stage, s, sum(prefix_lens), backward, 0.0)

    def unit_time(self, rank: int, ins: Instr, extra_s: float = 0.0) -> float:
        """Seconds of the compute unit `ins` on `rank`, with `extra_s` seconds of attention moved in
        (+) or out (-) by KV exchanges (see kv_shift)."""
        stage = self.stage_of[rank][ins.chunk]
        s = self.spec.slice_lens[ins.mb][ins.slice]
        if self.prof.measured is not None:
            lens = self.spec.slice_lens[ins.mb][:ins.slice]
            split = (rank, ins.mb, ins.slice, ins.chunk) in self.split
            return max(self._measured_unit(stage, s, lens, KINDS[ins.kind].cost, split) + extra_s, 0.0)
        return self._unit(stage, s, self.offsets[ins.mb][ins.slice], KINDS[ins.kind].cost, extra_s)

    def message_bytes(self, ins: Instr) -> float:
        """Bytes of the activation or gradient of one slice that a send or receive `ins` carries."""
        spec = self.spec
        s = spec.slice_lens[ins.mb][ins.slice]
        return s * spec.micro_batch_size * spec.model.hidden * self.bytes / (spec.tp * spec.cp)

    def p2p_time(self, src: int, dst: int, ins: Instr) -> float:
        """An activation or gradient of one slice between pipeline ranks."""
        return self.message_bytes(ins) / self.prof.p2p_bandwidth + self.prof.p2p_latency

    def message_cpu(self, nbytes: float) -> float:
        """Processor seconds one send or receive of `nbytes` takes its rank: the measured profile's
        p2p_cpu at those bytes, 0 without one (the built-in profiles)."""
        m = self.prof.measured
        if m is None or not m.p2p_cpu:
            return 0.0
        return curve_at(m.p2p_cpu, nbytes)

    def msg_time(self, rank: int, ins: Instr) -> float:
        """Processor seconds a send or receive of one slice's activation or gradient takes its rank
        (message_cpu at the message's bytes)."""
        return self.message_cpu(self.message_bytes(ins))

    def msg_cost(self):
        """msg_time for the replays, or None when the profile has no p2p_cpu (the replay's fast path)."""
        m = self.prof.measured
        return self.msg_time if m is not None and m.p2p_cpu else None

    def kv_shift(self, rank: int, ins: Instr) -> float:
        """Attention seconds (per GPU) the exchange `ins` moves from the owner's unit to the
        partner (or helper): a non-causal block of the slice's queries over the shipped tokens
        [lo, hi), in every layer of the owner's stage. `rank` runs `ins`: the owner for KV*_SEND
        (what it saves), the partner or helper otherwise (what it spends). With a measured
        profile: the owner saves the difference between its calls over the prefix with and
        without the shipped tokens (the executor's blocks, ir.limits.gather_blocks: a cut slice
        still costs a call over what is left of it), the partner makes one call over the range."""
        spec = self.spec
        m = spec.model
        row = KINDS[ins.kind]
        is_owner = row.side == "owner"
        L = self.kv_layers(rank, ins)
        bwd = row.phase == "backward"
        if self.prof.measured is not None:
            mp, b, div = self.prof.measured, spec.micro_batch_size, spec.tp * spec.cp
            q = spec.slice_lens[ins.mb][ins.slice] * b / div
            if not is_owner:
                return L * attention_call(mp, bwd, False, q, (ins.hi - ins.lo) * b / div)
            s = spec.slice_lens[ins.mb][ins.slice]
            whole = _pieces(spec.slice_lens[ins.mb][:ins.slice])
            left = [(x, y) for a, e in whole for x, y in ((a, min(e, ins.lo)), (max(a, ins.hi), e)) if x < y]

            def calls(pieces):
                return sum(attention_call(mp, bwd, False, q, (hi - lo) * b / div) for lo, hi in gather_blocks(pieces, s))
            return L * (calls(whole) - calls(left))
        pairs = spec.slice_lens[ins.mb][ins.slice] * (ins.hi - ins.lo)
        f = (4 * m.head_dim + 3) * m.heads * pairs * L * spec.micro_batch_size / (spec.tp * spec.cp)
        return f * (BWD_ATTN if bwd else 1.0) / (self.prof.peak_flops * self.prof.attn_efficiency)

    def help_time(self, rank: int, ins: Instr) -> float:
        """Seconds a helper (KV*_HELP on `rank`) spends on the block it serves: its own work, the
        attention call and the messages (kv_cpu)."""
        return self.kv_shift(rank, ins) + self.kv_cpu(rank, ins)

    def kv_messages(self, ins: Instr) -> tuple[float, float]:
        """(request, reply) bytes per layer of the exchange `ins`: forward ships q + K/V of the
        shipped tokens and returns out + lse (fp32); backward ships q, out, lse, dout + K/V and
        returns dq + dK/dV. Per GPU: tp and cp divide them."""
        spec = self.spec
        m = spec.model
        s = spec.slice_lens[ins.mb][ins.slice] * spec.micro_batch_size
        X = (ins.hi - ins.lo) * spec.micro_batch_size
        kvd = 2 * m.kv_heads * m.head_dim
        b, div = self.bytes, spec.tp * spec.cp
        if KINDS[ins.kind].phase == "forward":
            req, rep = (s * m.q_dim + X * kvd) * b, s * m.q_dim * b + s * m.heads * 4
        else:
            req, rep = (3 * s * m.q_dim + X * kvd) * b + s * m.heads * 4, (s * m.q_dim + X * kvd) * b
        return req / div, rep / div

    def kv_bytes(self, ins: Instr) -> float:
        """Bytes per layer both ways (kv_messages' request + reply)."""
        return sum(self.kv_messages(ins))

    def kv_cpu(self, rank: int, ins: Instr) -> float:
        """Processor seconds the messages of the exchange `ins` take `rank` (either side: the
        owner sends each layer's request and receives its reply, the partner or helper the
        reverse): per layer of the owner's stage, the measured profile's p2p_cpu (seconds per send
        or receive, by bytes) at the request's and at the reply's bytes. 0 without p2p_cpu (the
        built-in profiles: on a GPU the copies run on the device's engines, beside the compute)."""
        m = self.prof.measured
        if m is None or not m.p2p_cpu:
            return 0.0
        return self.kv_layers(rank, ins) * sum(map(self.message_cpu, self.kv_messages(ins)))

    def kv_layers(self, rank: int, ins: Instr) -> int:
        """Layers of the owner's stage of the exchange `ins` run on `rank` (the owner for KV*_SEND,
        its peer otherwise): the exchange repeats per layer."""
        owner = rank if KINDS[ins.kind].side == "owner" else ins.peer
        return self.spec.stage_layers[self.stage_of[owner][ins.chunk]]

    def kv_time(self, owner: int, partner: int, ins: Instr) -> float:
        """Rendezvous cost: the transfers are pipelined with the layers' compute, so one layer's
        transfer shows (fill) plus a handshake latency per layer."""
        L = self.spec.stage_layers[self.stage_of[owner][ins.chunk]]
        return self.kv_bytes(ins) / self.prof.p2p_bandwidth + L * self.prof.p2p_latency

    def dp_time(self, param_bytes: float) -> float:
        """Ring all-reduce of a rank's gradients over dp replicas."""
        return dp_allreduce_time(self.spec.dp, param_bytes, self.prof)

    def model_flops(self) -> float:
        """Useful FLOPs of one step per pipeline replica (forward + backward as 3x forward, the MFU convention)."""
        spec = self.spec
        tot = 0.0
        for mb in range(spec.microbatches):
            for j, s in enumerate(spec.slice_lens[mb]):
                tot += model_forward_flops(spec.model, s, self.offsets[mb][j], vocab_factor=2.0)
        return 3 * tot * spec.micro_batch_size


def dp_allreduce_time(dp: int, param_bytes: float, prof: DeviceProfile) -> float:
    """Seconds of a ring all-reduce of `param_bytes` of gradients over dp replicas (0 for dp=1)."""
    if dp == 1:
        return 0.0
    return 2 * (dp - 1) / dp * param_bytes / prof.dp_bandwidth + prof.p2p_latency


def shared_processors(prof: DeviceProfile, pp: int) -> int:
    """How many processors the pp ranks share (0: each rank has its own device). A measured CPU
    profile with fewer cores than ranks makes them take turns."""
    m = prof.measured
    return m.processors if m is not None and 0 < m.processors < pp else 0


def replay_engine(plan: Plan, prof: DeviceProfile, msg_cost=None):
    """replay, or replay_shared bound to the profile's processor count and timeslice: same
    signature. msg_cost: processor time per send / receive (CostModel.msg_cost())."""
    from .replay import replay, replay_shared

    n = shared_processors(prof, len(plan.ranks))
    if not n:
        if msg_cost is None:
            return replay
        return lambda plan, cost, p2p=None, kv=None, record=False, help_cost=None: replay(
            plan, cost, *(() if p2p is None else (p2p, kv)), record=record, msg_cost=msg_cost,
            **({} if help_cost is None else {"help_cost": help_cost}))
    return lambda plan, cost, p2p=None, kv=None, record=False, help_cost=None: replay_shared(
        plan, cost, n, *(() if p2p is None else (p2p, kv)), record=record, timeslice=prof.measured.timeslice,
        msg_cost=msg_cost, **({} if help_cost is None else {"help_cost": help_cost}))


def timed_replay(plan: Plan, cm: CostModel, record: bool = False):
    """Replay with the cost model: unit times (KV shifts applied), p2p flight, KV rendezvous.
    Returns (replay result, unit time table)."""
    from .replay import replay

    table = unit_cost_table(plan, cm)
    cost = lambda r, ins: table[(r, ins.kind, ins.mb, ins.slice, ins.chunk)]  # noqa: E731
    shared = shared_processors(cm.prof, len(plan.ranks))
    res = replay(plan, cost, cm.p2p_time, cm.kv_time, record=record and not shared,
                 help_cost=cm.help_time, msg_cost=cm.msg_cost())  # and the deadlock proof
    if shared and not res.deadlocked:
        res = replay_engine(plan, cm.prof, cm.msg_cost())(plan, cost, cm.p2p_time, cm.kv_time, record=record,
                                                         help_cost=cm.help_time)
    return res, table


def unit_cost_table(plan: Plan, cm: CostModel) -> dict[tuple, float]:
    """(rank, kind, mb, slice, chunk) -> seconds, with KV exchanges moving attention work from
    each owner's unit to its partner's unit and adding their messages' processor time to both
    (kv_cpu; a helper's work is its own: costs.help_time)."""
    out = {}
    for r, stream in enumerate(plan.ranks):
        shift = 0.0
        for ins in stream:
            k = ins.kind
            row = KINDS[k]
            if row.role == "kv":
                if row.side == "owner":
                    shift += cm.kv_cpu(r, ins) - cm.kv_shift(r, ins)
                elif row.side == "partner":  # a helper's work is its own (help_time), not a unit's
                    shift += cm.kv_shift(r, ins) + cm.kv_cpu(r, ins)
            elif row.role == "compute":
                out[(r, k, ins.mb, ins.slice, ins.chunk)] = cm.unit_time(r, ins, shift)
                shift = 0.0
    return out
