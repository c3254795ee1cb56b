"""Plan search (`slimpipe tune`): the plan with the highest simulated throughput that fits a memory
budget, found by branch and bound over a declared space; also the shared exact evaluation
(compile + timed simulation) that `slimpipe compare` can reuse.

Declared space, for G GPUs, global batch B sequences, a model with L layers and a sequence of S:
    family     gpipe, 1f1b, interleaved-1f1b, looped-bfs, seq1f1b, slimpipe (or --schedules)
    tp         {1, 2, 4, 8}; must divide heads and kv_heads
    cp         {1, 2, 4, 8} (capped at 8: the cost model prices cp's K/V ring on the NVLink bandwidth,
               which only holds inside a node; --cp lifts the cap)
    p          every divisor of G/(tp*cp); dp = G/(tp*cp*p); m = B/dp must be an integer
    n          1 for gpipe, 1f1b, interleaved-1f1b, looped-bfs; {2, 4, 8, 16, 32} for seq1f1b, slimpipe
    v          1 for gpipe, 1f1b; {2, 3, 4, 5, 6, 8, 10} for interleaved-1f1b, looped-bfs (v=1 would
               repeat 1f1b / gpipe); {1, 2, 3, 4, 5, 6, 8, 10} for seq1f1b, slimpipe; p*v <= L
    partition  uniform (S divisible by n*cp); seq1f1b with n > 1 also flops (Seq1F1B's equal-FLOPs split;
               S divisible by cp, slices in multiples of lcm(2, cp) tokens): cp splits every slice
    exchange   slimpipe: on and off (the KV exchange); off for the other families
    layers     uniform (the first layers mod (p*v) stages take one more); also balanced (the split that
               minimises the slowest stage under the cost model, LM head and loss included) wherever
               it differs from uniform: where balanced_layers keeps the uniform split, the two are one
               plan and only `uniform` is a candidate
plus each family's own rules (Family.validate). Default B: 4M tokens per step, Llama 2/3's batch
(B = 2^22 // S sequences, at least 1, at most G, rounded down to a power of two). The plan size
grows with m*n*v and exact simulation is linear in it, which is why n and v stop at 32 and 10.

Search, in two stages:
1. Per candidate, without compiling, two sound lower bounds.
   Memory: the heaviest rank's static bytes (params, grads, optimizer), and rank 0's static bytes
   plus its closed-form peak units in flight x the smallest unit's activations + K/V (and the
   last rank's static bytes + one unit + its logits). Over the budget: pruned ("OOM by bound").
   Time: for each rank r, the forward chain that must run on ranks 0..r-1 before r starts, r's
   own compute, and the backward chain back to rank 0 after it ends, plus the data-parallel
   all-reduce (each term the cheapest the cost model allows). With the KV exchange, work moves
   between ranks: the attention part is bounded through the total over all ranks / p instead.
2. In order of an estimate (compute bound / (1 - closed-form bubble)): skip any candidate whose
   time bound exceeds the K-th best step time found so far, check the exact peak memory (the
   memory model on the compute order, no compile), then compile and simulate (passes.simulate).
   Stop when every candidate left has a time bound above the K-th best (so none of them can enter
   the top K: the answer is that of simulating everything), or at the time limit (then the result
   says how many stayed unexplored and their best bound).
Ranking: step times within TIE (0.5%) of the fastest are a tie and go to less peak memory (a
balanced layer split within 0.5% of the uniform one loses to it when it needs more memory, which it
usually does: it moves layers toward rank 0, which holds the most units in flight), so the
threshold in stage 2 is max(K-th best, fastest * (1 + TIE)): every plan in the tie is simulated.
Then each family gets its own top-1 branch and bound over its candidates (reusing every evaluation),
so the result names every family's best plan or why it has none (rules, memory bound, memory model).
"""
from __future__ import annotations

import bisect
import math
import re
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Callable

from ir import Plan, PlanSpec, SlimpipeError, SpecError
from ir.limits import MAX_UNITS
from passes.costs import GIB, DeviceProfile, dp_allreduce_time, unit_parts
from passes.memory import memory_report, per_token_layer, rank_params, static_bytes
from passes.partition import flops_partition
from passes.simulate import simulate_step, simulate_timed

from . import compile_plan, schedule_plan, schedules
from .layout import LAYER_SPLITS, build_spec, layer_split, plain_or_looping, split_layers, uniform_slices
from .schedules.closed_forms import closed_form_bubble, closed_form_peak_units

TP_CHOICES = (1, 2, 4, 8)
CP_CHOICES = (1, 2, 4, 8)
N_CHOICES = (2, 4, 8, 16, 32)
V_CHOICES = (1, 2, 3, 4, 5, 6, 8, 10)
DEFAULT_TOKENS_PER_STEP = 1 << 22
SAFETY = 1 - 1e-9  # bounds are exact arithmetic of the cost model; keep float rounding on the safe side


# ---------------------------------------------------------------- problem and space

@dataclass(frozen=True)
class Problem:
    """What is fixed: the model, context, cluster, budget and device."""

    model: object
    seq_len: int
    gpus: int
    memory_budget: float
    global_batch: int
    profile: DeviceProfile
    dtype_bytes: int = 2


@dataclass(frozen=True)
class Space:
    """The declared choices (see the module docstring); pp=None means every divisor."""

    families: tuple[str, ...] = tuple(schedules.FAMILIES)
    tp: tuple[int, ...] = TP_CHOICES
    cp: tuple[int, ...] = CP_CHOICES
    pp: tuple[int, ...] | None = None
    slices: tuple[int, ...] = N_CHOICES
    virtual_stages: tuple[int, ...] = V_CHOICES
    layer_splits: tuple[str, ...] = LAYER_SPLITS


def default_global_batch(seq_len: int, gpus: int) -> int:
    """2^22 tokens per step, at least 1 and at most one sequence per GPU, a power of two."""
    b = max(1, min(DEFAULT_TOKENS_PER_STEP // seq_len, gpus))
    return 1 << (b.bit_length() - 1)


@dataclass(frozen=True, order=True)
class Candidate:
    schedule: str
    tp: int
    cp: int
    pp: int
    dp: int
    microbatches: int
    slices: int
    virtual_stages: int
    partition: str
    exchange: bool
    layer_split: str = "uniform"

    def label(self) -> str:
        return (f"{self.schedule} p={self.pp} tp={self.tp} cp={self.cp} dp={self.dp} m={self.microbatches} "
                f"n={self.slices} v={self.virtual_stages} {self.partition}" + (" exchange" if self.exchange else "")
                + (" balanced" if self.layer_split == "balanced" else ""))

    def fields(self) -> dict:
        return {"schedule": self.schedule, "pp": self.pp, "tp": self.tp, "cp": self.cp, "dp": self.dp,
                "microbatches": self.microbatches, "slices": self.slices, "virtual_stages": self.virtual_stages,
                "partition": self.partition, "exchange": self.exchange, "layer_split": self.layer_split}


def _divisors(x: int) -> list[int]:
    """The divisors of x >= 1, ascending: trial division up to sqrt(x) (a count to x hung on
    --gpus 1000000007)."""
    small, large = [], []
    d = 1
    while d * d <= x:
        if x % d == 0:
            small.append(d)
            if d * d != x:
                large.append(x // d)
        d += 1
    return small + large[::-1]


def family_choices(fam: str, space: Space) -> list[tuple[int, int, str, bool]]:
    """(n, v, partition, exchange) the space gives a family (its record's search choices)."""
    return schedules.get(fam).search_choices(space.slices, space.virtual_stages)


def enumerate_space(problem: Problem, space: Space):
    """Every candidate of the space with None or the rule that makes it infeasible."""
    G = problem.gpus
    for tp in space.tp:
        for cp in space.cp:
            if tp * cp > G:  # cannot be filled at all: not a candidate
                continue
            rest = G // (tp * cp)
            if space.pp is not None:
                pps = list(space.pp)
            else:  # every divisor; when tp*cp leaves GPUs over, one p stands for the rule
                pps = _divisors(rest) if G % (tp * cp) == 0 else [1]
            for p in pps:
                dp = rest // p if rest % p == 0 else 0
                m = problem.global_batch // dp if dp else 0
                why = None
                if G % (tp * cp):  # tp, cp or p that cannot fill the GPUs: said, not dropped in silence
                    why = f"tp*cp={tp * cp} does not divide the {G} GPUs"
                elif rest % p:
                    why = f"p={p} does not divide gpus/(tp*cp)={rest}"
                for fam in space.families:
                    for n, v, part, ex in family_choices(fam, space):
                        c = Candidate(fam, tp, cp, p, dp, m, n, v, part, ex)
                        bad = why or _rule(problem, c)
                        if "uniform" in space.layer_splits:
                            yield c, bad
                        if "balanced" in space.layer_splits and (
                                "uniform" not in space.layer_splits
                                or (bad is None and balanced_split(problem, c) is not None)):
                            yield Candidate(fam, tp, cp, p, dp, m, n, v, part, ex, "balanced"), bad


def _rule(problem: Problem, c: Candidate) -> str | None:
    model, S = problem.model, problem.seq_len
    if model.heads % c.tp or model.kv_heads % c.tp:
        return "tp must divide heads and kv_heads"
    if c.pp * c.virtual_stages > model.layers:
        return "p*v exceeds the model's layers"
    if problem.global_batch % c.dp:
        return "global batch not divisible by dp (m = B/dp must be an integer)"
    if c.partition == "uniform" and S % (c.slices * c.cp):
        return "seq_len not divisible by n*cp (uniform slicing)"
    if c.partition == "flops" and S % c.cp:
        return "seq_len not divisible by cp (flops slicing)"
    if c.partition == "flops" and S < 2 * c.slices * c.cp:
        return "seq_len too short for a flops partition into n slices"
    if c.pp * c.microbatches * c.slices * c.virtual_stages > MAX_UNITS:  # as build_spec refuses it (ir.limits)
        return "more compute units (p x m x n x v) than slimpipe plans"
    if c.pp == 1 and c.virtual_stages > 1:  # the same units in the same order, only cut finer
        return "v > 1 at p = 1 (one rank holds every chunk, nothing to interleave)"
    try:
        schedules.get(c.schedule).validate(_Shape(c))
    except SpecError as e:
        return rule_reason(c.schedule, e)
    return None


@lru_cache(maxsize=None)
def _balanced(model, seq_len: int, n: int, partition: str, tp: int, cp: int, stages: int,
              prof: DeviceProfile) -> tuple[int, ...] | None:
    split = layer_split("balanced", model, stages, slice_lens(model, seq_len, n, partition, cp), prof, tp, cp)
    return None if split == split_layers(model.layers, stages) else split


def balanced_split(problem: Problem, c: Candidate) -> tuple[int, ...] | None:
    """The balanced layer split of a rule-feasible candidate's stages (what build_spec computes for
    it), or None where it is the uniform split."""
    return _balanced(problem.model, problem.seq_len, c.slices, c.partition, c.tp, c.cp, c.pp * c.virtual_stages,
                     problem.profile)


def candidate_layers(problem: Problem, c: Candidate) -> tuple[int, ...]:
    """Decoder layers per stage of a candidate."""
    uni = split_layers(problem.model.layers, c.pp * c.virtual_stages)
    return (balanced_split(problem, c) or uni) if c.layer_split == "balanced" else uni


def rule_reason(family: str, err: Exception) -> str:
    """A rule message as a reason shared by many candidates: standalone numbers become N, digits
    inside names ('interleaved-1f1b') stay."""
    return f"{family}: " + re.sub(r"\b\d+\b", "N", str(err)).split(";")[0]


class _Shape:
    """The few spec attributes that Family.validate and passes.memory.static_bytes read, without
    building a PlanSpec (stage 1 runs on tens of thousands of candidates)."""

    __slots__ = ("schedule", "pp", "microbatches", "slices", "virtual_stages", "tp", "cp", "dp", "model",
                 "stage_layers", "placement", "num_stages")

    def __init__(self, c: Candidate, model=None, stage_layers=None):
        self.schedule, self.pp, self.microbatches = c.schedule, c.pp, c.microbatches
        self.slices, self.virtual_stages, self.tp, self.cp, self.dp = c.slices, c.virtual_stages, c.tp, c.cp, c.dp
        self.model = model
        if model is not None:
            self.num_stages = c.pp * c.virtual_stages
            self.stage_layers = stage_layers or split_layers(model.layers, self.num_stages)
            self.placement = plain_or_looping(c.pp, c.virtual_stages)


# ---------------------------------------------------------------- per-layer costs (memoized)

@dataclass(frozen=True)
class SliceCosts:
    """Seconds per decoder layer (one micro-batch, every slice) on one GPU of a tp*cp group, from
    the cost model's formulas; unit time on a stage of L layers = L * layer + head (last stage)."""

    lens: tuple[int, ...]
    fb: float          # sum over slices of F + B time per layer
    head_fb: float     # sum over slices of the last stage's extra (final norm, LM head, loss)
    fixed_fb: float    # the part no KV exchange moves (matmuls, tp collectives, cp ring with no attention)
    work_fb: float     # matmuls + tp + attention: what the exchange conserves over all ranks
    min_f: float       # cheapest forward per layer over slices
    min_b: float
    min_hop: float     # cheapest activation / gradient message
    min_tokens: float  # smallest slice's tokens per GPU (/ cp)
    min_i: float = 0.0   # cheapest input-gradient half (I) of a split backward per layer
    w: float = 0.0       # sum over slices of the weight-gradient half (W) per layer
    head_w: float = 0.0  # sum over slices of the last stage's extra W (LM head)


@lru_cache(maxsize=None)
def slice_lens(model, seq_len: int, n: int, partition: str, cp: int = 1) -> tuple[int, ...]:
    if partition == "flops":
        return tuple(flops_partition(model, seq_len, n, cp=cp))
    return uniform_slices(seq_len, n)


@lru_cache(maxsize=None)
def slice_costs(model, seq_len: int, n: int, partition: str, tp: int, cp: int, prof: DeviceProfile,
                dtype_bytes: int = 2) -> SliceCosts:
    lens = slice_lens(model, seq_len, n, partition, cp)
    fb = head_fb = fixed = work = w = head_w = 0.0
    min_f = min_b = min_i = math.inf
    prefix = 0
    for s in lens:
        mm, attn, ring, tpc = unit_parts(model, s, prefix, "backward_input", tp, cp, prof, dtype_bytes)
        min_i = min(min_i, mm + max(attn, ring) + tpc)
        w += sum(unit_parts(model, s, prefix, "backward_weight", tp, cp, prof, dtype_bytes))
        head_w += sum(unit_parts(model, s, prefix, "backward_weight", tp, cp, prof, dtype_bytes, layers=0, last=True))
        for bwd in (False, True):
            mm, attn, ring, tpc = unit_parts(model, s, prefix, bwd, tp, cp, prof, dtype_bytes)
            t = mm + max(attn, ring) + tpc
            fb += t
            fixed += mm + ring + tpc
            work += mm + attn + tpc
            if bwd:
                min_b = min(min_b, t)
            else:
                min_f = min(min_f, t)
            hm, _, _, _ = unit_parts(model, s, prefix, bwd, tp, cp, prof, dtype_bytes, layers=0, last=True)
            head_fb += hm
        prefix += s
    s_min = min(lens)
    hop = s_min * model.hidden * dtype_bytes / (tp * cp) / prof.p2p_bandwidth + prof.p2p_latency
    return SliceCosts(lens, fb, head_fb, fixed, work, min_f, min_b, hop, s_min / cp, min_i, w, head_w)


# ---------------------------------------------------------------- stage 1: bounds

@dataclass
class Bounds:
    memory: float       # bytes, <= the exact peak of the fullest rank
    time: float         # seconds, <= the simulated step time
    estimate: float     # seconds, the order of stage 2


def bounds(problem: Problem, c: Candidate) -> Bounds:
    model, prof, b = problem.model, problem.profile, problem.dtype_bytes
    sh = _Shape(c, model, candidate_layers(problem, c))
    p, v, m, tp = c.pp, c.virtual_stages, c.microbatches, c.tp
    last = sh.num_stages - 1
    L = sh.stage_layers
    sc = slice_costs(model, problem.seq_len, c.slices, c.partition, tp, c.cp, prof, b)

    # memory
    statics = [sum(static_bytes(sh, r, b).values()) for r in range(p)]
    act_tl, kv_tl = per_token_layer(model, b)
    unit_tl = sc.min_tokens * (act_tl + kv_tl) / tp
    units0 = closed_form_peak_units(c.schedule, p, m, c.slices, v)
    mem0 = statics[0] + units0 * min(L[s] for s in sh.placement[0]) * unit_tl
    logits = 2 * 4 * sc.min_tokens * model.vocab / tp
    mem_last = statics[p - 1] + L[last] * unit_tl + logits
    mem = max(max(statics), mem0, mem_last)

    # time
    busy, fixed = [], []
    rank_layers = [sum(L[s] for s in sh.placement[r]) for r in range(p)]
    for r in range(p):
        layers = rank_layers[r]
        head = sc.head_fb if last in sh.placement[r] else 0.0
        busy.append(m * (layers * sc.fb + head))
        fixed.append(m * (layers * sc.fixed_fb + head))
    # forward chain before rank r starts + backward chain after it ends. With a split backward the
    # chain is the input gradients (I) alone, and rank r's weight gradients (W) may run during it:
    # it ends at least (chain - all of r's W) after r's work, which itself ends after r's busy time
    split = schedules.get(c.schedule).split_backward
    edge = []
    fill = drain = 0.0
    for r in range(p):
        if split:
            w_r = m * (rank_layers[r] * sc.w + (sc.head_w if last in sh.placement[r] else 0.0))
            edge.append(fill + max(0.0, drain - w_r))
        else:
            edge.append(fill + drain)
        fill += L[r] * sc.min_f + sc.min_hop
        drain += min(L[s] for s in sh.placement[r]) * (sc.min_i if split else sc.min_b) + sc.min_hop
    dp_s = dp_allreduce_time(c.dp, max(rank_params(sh, r) for r in range(p)) * 4.0, prof)
    if c.exchange:
        work = m * (model.layers * sc.work_fb + sc.head_fb)
        t = max(max(e + f for e, f in zip(edge, fixed)), (sum(edge) + work) / p)
        compute = work / p
    else:
        t = max(e + x for e, x in zip(edge, busy))
        compute = max(busy)
    bub = closed_form_bubble(c.schedule, p, m, c.slices, v)
    return Bounds(mem * SAFETY, (t + dp_s) * SAFETY, (compute + dp_s) / (1 - bub))


# ---------------------------------------------------------------- exact evaluation (shared with compare)

def candidate_spec(problem: Problem, c: Candidate) -> PlanSpec:
    extra = dict(tp=c.tp, cp=c.cp, dp=c.dp, exchange=c.exchange, layer_split_kind=c.layer_split,
                 profile=problem.profile)
    if c.partition == "flops":
        extra.update(partition="flops", slice_lens=slice_lens(problem.model, problem.seq_len, c.slices, "flops", c.cp))
    return build_spec(c.schedule, problem.model, pp=c.pp, microbatches=c.microbatches, slices=c.slices,
                      virtual_stages=c.virtual_stages, seq_len=problem.seq_len, **extra)


def exact_peak_memory(spec: PlanSpec, dtype_bytes: int = 2) -> float:
    """Peak bytes of the fullest rank: the memory model needs only each rank's compute order
    (communication and KV exchanges do not change it), so no compile."""
    return max(r["peak_memory_bytes"] for r in memory_report(schedule_plan(spec), dtype_bytes))


def evaluate(spec: PlanSpec, profile: DeviceProfile, dtype_bytes: int = 2) -> tuple[dict, Plan]:
    """Compile (KV exchange costed for `profile`) and simulate one spec: a row of step time,
    bubble, peak memory, tokens/s, MFU and the KV exchanges the plan holds (the pass may keep none)."""
    plan = compile_plan(spec, profile)
    out = simulate_timed(plan, profile, dtype_bytes)
    row = {"step_s": out["step_s"], "bubble_fraction": out["bubble_fraction"],
           "peak_memory_bytes": max(r["peak_memory_bytes"] for r in out["ranks"]),
           "tokens_per_s": out["tokens_per_s"], "mfu": out["mfu"], "exchanges": plan.meta.get("exchanges", 0)}
    return row, plan


# ---------------------------------------------------------------- the search

TIE = 0.005  # step times within 0.5% of the fastest are a tie: far inside the cost model's own error


def rank_rows(rows: list[dict], tie: float = TIE) -> list[dict]:
    """The ranking tune shows: the plans within `tie` of the fastest step first, least peak memory
    first (a tie, or a difference inside the model's noise, goes to less memory), then the others
    by step time. Ties of everything are broken by the candidate, so the order is deterministic."""
    if not rows:
        return []
    fastest = min(r["step_s"] for r in rows)
    near = [r for r in rows if r["step_s"] <= fastest * (1 + tie)]
    rest = [r for r in rows if r["step_s"] > fastest * (1 + tie)]
    near.sort(key=lambda r: (r["peak_memory_bytes"], r["step_s"], r["_cand"]))
    rest.sort(key=lambda r: (r["step_s"], r["_cand"]))
    return near + rest


@dataclass
class FamilyResult:
    """The best plan of one family (`row`, ranked as tune ranks), or why it has none (`why`), with
    the family's counts (rule, pruned by the memory bound, over budget by the memory model, pruned
    by the time bound, simulated), its rule reasons, and its least-memory candidate when nothing fits.
    `proven`: the row is the family's best over the space (False when the time limit stopped it)."""

    family: str
    row: dict | None
    proven: bool
    why: str | None
    counts: dict
    reasons: dict
    least_memory: dict | None = None

    def to_json(self) -> dict:
        return {"family": self.family, "best": _public(self.row) if self.row else None, "proven": self.proven,
                "why_none": self.why, "counts": self.counts, "infeasible_reasons": self.reasons,
                "least_memory_candidate": self.least_memory}


def _public(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_")}


@dataclass
class SearchResult:
    problem: Problem
    space: Space
    top: list[dict]
    pareto: list[dict]
    counts: dict
    infeasible_reasons: dict
    stopped: str                       # "bound" (proved), "exhausted" (all simulated), "time-limit"
    unexplored: int = 0
    unexplored_best_bound_s: float | None = None
    least_memory: dict | None = None   # the candidate needing the least memory (memory model), when nothing fits
    simulated: list[dict] = field(default_factory=list, repr=False)
    best_plan: Plan | None = field(default=None, repr=False)
    elapsed_s: float = 0.0
    families: list[FamilyResult] = field(default_factory=list)
    tie: float = TIE
    # the time limit came while the space was still being listed: candidates beyond `counts`'
    # were never reached (nothing is known of them)
    listing_cut: bool = False

    @property
    def best(self) -> dict | None:
        return self.top[0] if self.top else None

    @property
    def proven(self) -> bool:
        return self.stopped != "time-limit"

    def why_none(self) -> str:
        """Why no plan fits, in one line: the real causes (rules, memory), not just 'no plan fits'."""
        c, budget = self.counts, self.problem.memory_budget
        if c["candidates"] == 0:
            if self.listing_cut:
                return "no plan found: the time limit stopped the search before it listed a candidate"
            return "the space is empty (no family, tp, cp or p choice left)"
        parts = []
        if c["infeasible"]:
            top = sorted(self.infeasible_reasons.items(), key=lambda kv: -kv[1])[:3]
            parts.append(f"{c['infeasible']} of {c['candidates']} candidates break a rule ("
                         + "; ".join(f"{why}: {n}" for why, n in top) + ")")
        over = c["pruned_memory_bound"] + c["oom_exact"]
        if over:
            lm = self.least_memory
            least = ""
            if lm:
                least = f"; the least memory any needs is {_gib(lm['peak_memory_bytes'])} ({_label(lm)}, memory model)"
            parts.append(f"{over} need more than the budget {_gib(budget)}{least}")
        if self.stopped == "time-limit" and not self.top:
            parts.append(f"the time limit stopped the search with {self.unexplored} candidates unexplored"
                         + (" and the rest of the space not listed" if self.listing_cut else ""))
        if self.stopped == "time-limit":  # what was found so far, not a verdict on the space
            return "no plan found before the time limit: " + "; ".join(parts)
        return "no plan fits: " + "; ".join(parts)

    def stop_phrase(self) -> str:
        """What the time limit left: 'N candidates unexplored', and the space's unlisted rest."""
        return (f"{self.unexplored} candidates unexplored"
                + (f" and the space listed only up to candidate {self.counts['candidates']}" if self.listing_cut else ""))


def _gib(b: float) -> str:
    """Bytes in the unit that fits (GiB for a GPU's budget, MiB or KiB for toy ones)."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= size:
            return f"{b / size:.2f} {unit}"
    return f"{b:.0f} B"


def _label(r: dict) -> str:
    return (f"{r['schedule']} p={r['pp']} tp={r['tp']} cp={r['cp']} dp={r['dp']} m={r['microbatches']} "
            f"n={r['slices']} v={r['virtual_stages']} {r['partition']}" + (" exchange" if r["exchange"] else "")
            + (" balanced" if r.get("layer_split") == "balanced" else ""))


def pareto_front(rows: list[dict]) -> list[dict]:
    """Rows no other row beats on both throughput (higher) and peak memory (lower)."""
    out, best_tps = [], -1.0
    for r in sorted(rows, key=lambda r: (r["peak_memory_bytes"], -r["tokens_per_s"])):
        if r["tokens_per_s"] > best_tps:
            out.append(r)
            best_tps = r["tokens_per_s"]
    return out


_CAUSES = ("infeasible", "pruned_memory_bound", "oom_exact", "pruned_time_bound", "unexplored", "simulated")


class _TimeUp(BaseException):
    """The time limit came while a candidate was being listed, bounded or evaluated (raised by
    _Alarm inside its regions only; a BaseException, so that no `except Exception` of the passes
    it interrupts holds it up)."""


class _Alarm:
    """The time limit as a signal (SIGALRM, one shot), so that a candidate whose compilation or
    exact memory takes seconds (an interleaved zero-bubble plan of 25k units: 7 s) is left at the
    limit instead of finished: _TimeUp is raised only inside region(), where the search can drop
    the candidate; outside, the firing is only noted (the search's own checks between candidates
    then stop it). Only in the main thread of a Unix process (signals); elsewhere nothing is
    interrupted and the checks between candidates are the limit, as before."""

    def __init__(self, seconds: float | None):
        self.inside = False
        self.old = None
        if seconds and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGALRM, self._fire)
            signal.setitimer(signal.ITIMER_REAL, seconds)

    def _fire(self, _signum, _frame) -> None:
        if self.inside:
            self.inside = False
            raise _TimeUp

    @contextmanager
    def region(self):
        self.inside = True
        try:
            yield
        finally:
            self.inside = False

    def cancel(self) -> None:
        if self.old is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.old)
            self.old = None


class _Run:
    """One search's state: the live candidates with their bounds, what was evaluated (each
    candidate is compiled and simulated at most once), per-family counts and reasons."""

    def __init__(self, problem: Problem, space: Space, deadline: float | None, progress):
        self.problem, self.space, self.deadline, self.progress = problem, space, deadline, progress
        self.listing_cut = False
        self.alarm = _Alarm(None)  # search() arms one for its time limit
        self.t0 = time.perf_counter()
        self.counts = {k: 0 for k in ("candidates",) + _CAUSES}
        self.fam_counts = {f: {k: 0 for k in _CAUSES} for f in space.families}
        self.reasons: dict[str, int] = {}
        self.fam_reasons: dict[str, dict[str, int]] = {f: {} for f in space.families}
        self.live: list[tuple[Candidate, Bounds]] = []
        self.mem_pruned: dict[str, list[tuple[float, Candidate]]] = {f: [] for f in space.families}
        self.memo: dict[Candidate, tuple[str, object]] = {}  # ("row", row) | ("oom", bytes) | ("rule", why)
        self.simulated: list[dict] = []
        self.rows: dict[Candidate, dict] = {}  # the simulated (fitting) candidates' rows
        self.live_bounds: dict[Candidate, "Bounds"] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def out_of_time(self) -> bool:
        return self.deadline is not None and self.elapsed() > self.deadline

    def rule(self, c: Candidate, why: str) -> None:
        self.reasons[why] = self.reasons.get(why, 0) + 1
        fr = self.fam_reasons[c.schedule]
        fr[why] = fr.get(why, 0) + 1

    def stage1(self) -> None:
        """List the space, with each candidate's rule or its bounds; stops at the time limit
        (self.listing_cut: the candidates not yet listed are not known)."""
        listing = enumerate_space(self.problem, self.space)
        while True:
            try:
                if self.counts["candidates"] % 16 == 0 and self.out_of_time():
                    raise _TimeUp
                with self.alarm.region():
                    c, why = next(listing, (None, None))
                    bd = bounds(self.problem, c) if c is not None and why is None else None
            except _TimeUp:
                self.listing_cut = True
                break
            if c is None:
                break
            self.counts["candidates"] += 1
            if why is None:
                if bd.memory > self.problem.memory_budget:
                    self._count(c, "pruned_memory_bound")
                    self.mem_pruned[c.schedule].append((bd.memory, c))
                    continue
                self.live.append((c, bd))
            else:
                self._count(c, "infeasible")
                self.rule(c, why)
            if self.progress and self.counts["candidates"] % 2000 == 0:
                self.progress({"stage": 1, "done": self.counts["candidates"], "elapsed": self.elapsed()})
        self.live_bounds = dict(self.live)

    def off_twin(self, row: dict) -> Candidate | None:
        """The exchange-off twin of an exchange-on candidate whose plan holds no KV exchange (the
        pass found none worth it): the same plan, so when the twin is in the search the plan is
        ranked once, as the twin; None otherwise."""
        c = row["_cand"]
        if not c.exchange or row.get("exchanges") != 0:
            return None
        off = replace(c, exchange=False)
        return off if off in self.live_bounds else None

    def _count(self, c: Candidate, cause: str) -> None:
        self.counts[cause] += 1
        self.fam_counts[c.schedule][cause] += 1

    def evaluate(self, c: Candidate):
        """("row", row) | ("oom", exact peak bytes) | ("rule", why), computed once per candidate."""
        got = self.memo.get(c)
        if got is not None:
            return got
        pr = self.problem
        try:
            spec = candidate_spec(pr, c)
            mem = exact_peak_memory(spec, pr.dtype_bytes)
            if mem > pr.memory_budget:
                got = ("oom", mem)
            else:  # one timed replay: the exact peak is already known, the bubble breakdown is not needed
                plan = compile_plan(spec, pr.profile)
                fig = simulate_step(plan, pr.profile, pr.dtype_bytes)
                row = {"step_s": fig["step_s"], "bubble_fraction": fig["bubble_fraction"], "peak_memory_bytes": mem,
                       "tokens_per_s": fig["tokens_per_s"], "mfu": fig["mfu"], "exchanges": plan.meta.get("exchanges", 0)}
                got = ("row", {**c.fields(), **row, "_cand": c})
        except SpecError as e:
            got = ("rule", rule_reason(c.schedule, e))
        self.memo[c] = got
        return got

    def branch_and_bound(self, members: list[int], top_k: int, tie: float):
        """Evaluate live[members] in order of the estimate until every candidate left has a time
        bound above max(K-th best step, fastest * (1 + tie)): then the K fastest plans and every
        plan within `tie` of the fastest are known. Candidates evaluated before (by an earlier
        branch and bound of this run) count at once and cost nothing. Returns (rows, stopped,
        unexplored, best time bound among the unexplored)."""
        live = self.live
        steps: list[float] = []  # sorted step times of the fitting plans found
        rows: list[dict] = []
        rest = []
        for i in members:
            c = live[i][0]
            if c in self.memo:
                if c in self.rows:
                    bisect.insort(steps, self.rows[c]["step_s"])
                    rows.append(self.rows[c])
            else:
                rest.append(i)
        by_est = sorted(rest, key=lambda i: (live[i][1].estimate, live[i][0]))
        by_bound = sorted(rest, key=lambda i: live[i][1].time)
        done: set[int] = set()
        ptr = 0

        def threshold() -> float:
            if not steps:
                return math.inf
            kth = steps[top_k - 1] if len(steps) >= top_k else math.inf
            return max(kth, steps[0] * (1 + tie))

        for k, i in enumerate(by_est):
            while ptr < len(by_bound) and by_bound[ptr] in done:
                ptr += 1
            if ptr < len(by_bound) and live[by_bound[ptr]][1].time > threshold():
                return rows, "bound", 0, None
            if self.out_of_time():
                left = [j for j in by_est[k:] if live[j][1].time <= threshold()]
                return rows, "time-limit", len(left), min((live[j][1].time for j in left), default=None)
            done.add(i)
            c, bd = live[i]
            if self.progress:
                self.progress({"stage": 2, "done": len(self.memo), "total": len(live), "simulated": self.counts["simulated"],
                               "best_s": steps[0] if steps else None, "elapsed": self.elapsed()})
            if bd.time > threshold() or c in self.memo:  # in memo: its exchange-on twin's plan stood in
                continue
            try:
                with self.alarm.region():
                    kind, val = self.evaluate(c)
            except _TimeUp:  # dropped at the limit: it and those left whose bound could beat the answer are unexplored
                self.memo.pop(c, None)
                left = [j for j in by_est[k:] if live[j][1].time <= threshold()]
                return rows, "time-limit", len(left), min((live[j][1].time for j in left), default=None)
            cause = {"row": "simulated", "oom": "oom_exact", "rule": "infeasible"}[kind]
            self._count(c, cause)
            if kind == "rule":
                self.rule(c, val)
            elif kind == "row":
                row = {**val, "time_bound_s": bd.time, "memory_bound_bytes": bd.memory}
                off = self.off_twin(row)
                if off is not None:  # the plan of its exchange-off twin: ranked once, as the twin
                    if off in self.memo:
                        continue
                    obd = self.live_bounds[off]
                    row = {**row, **off.fields(), "_cand": off, "time_bound_s": obd.time, "memory_bound_bytes": obd.memory}
                    self.memo[off] = ("row", row)
                    self._count(off, "simulated")
                    c = off
                self.rows[c] = row
                self.simulated.append(row)
                bisect.insort(steps, row["step_s"])
                rows.append(row)
        return rows, "exhausted", 0, None

    def least_memory(self, fam: str | None, probe: int = 5) -> dict | None:
        """The candidate (of `fam`, or of any family) that needs the least memory by the memory
        model, among those over the budget: the `probe` smallest memory bounds are measured exactly
        (a bound can be far below the real peak), with the over-budget ones already measured."""
        pool = []
        fams = [fam] if fam else list(self.space.families)
        for f in fams:
            pool.extend(sorted(self.mem_pruned[f], key=lambda x: (x[0], x[1]))[:probe])
        best = None
        for bound, c in pool:
            if self.out_of_time():  # past the limit only what was measured counts (below)
                break
            try:
                with self.alarm.region():
                    mem = exact_peak_memory(candidate_spec(self.problem, c), self.problem.dtype_bytes)
            except SpecError:
                continue
            except _TimeUp:
                break
            if best is None or mem < best[0]:
                best = (mem, c, bound)
        for c, (kind, val) in self.memo.items():
            if kind == "oom" and (fam is None or c.schedule == fam) and (best is None or val < best[0]):
                best = (val, c, None)
        if best is None:
            return None
        mem, c, bound = best
        return {**c.fields(), "peak_memory_bytes": mem, "memory_bound_bytes": bound}


def _family_why(run: _Run, fam: str, least: dict | None, proven: bool = True) -> str:
    fc, budget = run.fam_counts[fam], run.problem.memory_budget
    total = sum(fc.values())
    if total == 0:
        return "not reached: the time limit stopped the listing of the space" if run.listing_cut else "not in the space"
    parts = []
    if fc["infeasible"]:
        top = sorted(run.fam_reasons[fam].items(), key=lambda kv: -kv[1])[:2]
        parts.append(f"{fc['infeasible']} of {total} break a rule (" + "; ".join(f"{w.split(': ', 1)[-1]}: {n}"
                                                                           for w, n in top) + ")")
    over = fc["pruned_memory_bound"] + fc["oom_exact"]
    if over:
        txt = f"{over} over {_gib(budget)}"
        if least:
            txt += f" (least: {_gib(least['peak_memory_bytes'])}, {_label(least)})"
        parts.append(txt)
    left = fc["unexplored"] + fc["pruned_time_bound"]
    if left and not proven:  # its own branch and bound was stopped by the time limit
        parts.append(f"{left} not simulated (time limit)")
    if run.listing_cut:
        parts.append("the rest not listed (time limit)")
    return "; ".join(parts)


def search(problem: Problem, space: Space = Space(), top_k: int = 5, time_limit: float | None = None,
           progress: Callable[[dict], None] | None = None, keep_plan: bool = True, tie: float = TIE,
           per_family: bool = True) -> SearchResult:
    """Branch and bound over the space (module docstring). `progress(state)` is called now and then.
    The top K are ranked by rank_rows (ties within `tie` go to less memory). With `per_family`, each
    family's own best plan is proved too (a top-1 branch and bound over its candidates, reusing
    every evaluation), or the reason it has none is given."""
    run = _Run(problem, space, time_limit, progress)
    run.alarm = _Alarm(time_limit)
    try:
        return _search(run, problem, space, top_k, keep_plan, tie, per_family)
    finally:
        run.alarm.cancel()


def _search(run: _Run, problem: Problem, space: Space, top_k: int, keep_plan: bool, tie: float,
            per_family: bool) -> SearchResult:
    run.stage1()
    everyone = list(range(len(run.live)))
    rows, stopped, unexplored, unexplored_bound = run.branch_and_bound(everyone, top_k, tie)
    if run.listing_cut:  # the space was not all listed: nothing is proved of it
        stopped = "time-limit"
    families = []
    if per_family:
        for fam in space.families:
            members = [i for i in everyone if run.live[i][0].schedule == fam]
            frows, fstop, _, _ = run.branch_and_bound(members, 1, tie) if members else ([], "exhausted", 0, None)
            ranked = rank_rows(frows, tie)
            best = ranked[0] if ranked else None
            least = run.least_memory(fam) if best is None else None
            families.append(FamilyResult(fam, best, fstop != "time-limit" and not run.listing_cut, None,
                                         {}, dict(run.fam_reasons[fam]), least))
    # a live candidate never evaluated was pruned by the time bound, or left by the time limit when
    # its bound could still beat the answer (then it is 'unexplored', not 'provably slower')
    steps = sorted(r["step_s"] for r in rows)
    thr = max(steps[top_k - 1] if len(steps) >= top_k else math.inf, steps[0] * (1 + tie)) if steps else math.inf
    left_bounds = []
    for c, bd in run.live:
        if c not in run.memo:
            if stopped == "time-limit" and bd.time <= thr:
                run._count(c, "unexplored")
                left_bounds.append(bd.time)
            else:
                run._count(c, "pruned_time_bound")
    if stopped == "time-limit":  # the final answer's own threshold: the figures the counts say
        unexplored, unexplored_bound = len(left_bounds), min(left_bounds, default=None)
    for fr in families:
        fr.counts = dict(run.fam_counts[fr.family])
        if fr.row is None:
            fr.why = _family_why(run, fr.family, fr.least_memory, fr.proven)
    top = rank_rows(rows, tie)[:top_k]
    best_plan = None
    if keep_plan and top:
        best_plan = compile_plan(candidate_spec(problem, top[0]["_cand"]), problem.profile)
    least = run.least_memory(None) if not top else None
    sim = run.simulated
    return SearchResult(problem, space, top, pareto_front(sim), dict(run.counts), dict(run.reasons), stopped,
                        unexplored, unexplored_bound, least, sim, best_plan, run.elapsed(), families, tie,
                        run.listing_cut)


def brute_force(problem: Problem, space: Space = Space(), top_k: int = 5) -> tuple[list[dict], list[dict]]:
    """Simulate every rule-feasible candidate (for tests): (top-K feasible rows, every row)."""
    rows = []
    for c, why in enumerate_space(problem, space):
        if why is not None:
            continue
        try:
            row, _ = evaluate(candidate_spec(problem, c), problem.profile, problem.dtype_bytes)
        except SlimpipeError:
            continue
        rows.append({**c.fields(), **row, "_cand": c})
    feasible = sorted((r for r in rows if r["peak_memory_bytes"] <= problem.memory_budget),
                      key=lambda r: (r["step_s"], r["_cand"]))
    return feasible[:top_k], rows


__all__ = ["Candidate", "Problem", "SearchResult", "Space", "bounds", "brute_force", "candidate_spec",
           "closed_form_bubble", "closed_form_peak_units", "default_global_batch", "enumerate_space",
           "evaluate", "exact_peak_memory", "pareto_front", "search"]
