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
    partition  uniform (S divisible by n*cp); seq1f1b with n > 1 also flops (Seq1F1B's equal-FLOPs split)
    exchange   slimpipe: on and off (the KV exchange); off for the other families
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
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

from ir import Plan, PlanSpec, SlimpipeError, SpecError
from passes.costs import DeviceProfile, dp_allreduce_time, unit_parts
from passes.memory import memory_report, per_token_layer, rank_params, static_bytes
from passes.partition import flops_partition
from passes.simulate import simulate_timed

from . import compile_plan, schedule_plan, schedules
from .layout import build_spec, plain_or_looping, split_layers, uniform_slices
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

    def label(self) -> str:
        return (f"{self.schedule} p={self.pp} tp={self.tp} cp={self.cp} dp={self.dp} m={self.microbatches} "
                f"n={self.slices} v={self.virtual_stages} {self.partition}" + (" exchange" if self.exchange else ""))

    def fields(self) -> dict:
        return {"schedule": self.schedule, "pp": self.pp, "tp": self.tp, "cp": self.cp, "dp": self.dp,
                "microbatches": self.microbatches, "slices": self.slices, "virtual_stages": self.virtual_stages,
                "partition": self.partition, "exchange": self.exchange}


def _divisors(x: int) -> list[int]:
    return [d for d in range(1, x + 1) if x % d == 0]


def family_choices(fam: str, space: Space) -> list[tuple[int, int, str, bool]]:
    """(n, v, partition, exchange) the space gives a family (its record's search choices)."""
    return schedules.get(fam).search_choices(space.slices, space.virtual_stages)


def enumerate_space(problem: Problem, space: Space):
    """Every candidate of the space with None or the rule that makes it infeasible."""
    G = problem.gpus
    for tp in space.tp:
        for cp in space.cp:
            if G % (tp * cp):
                continue
            rest = G // (tp * cp)
            pps = _divisors(rest) if space.pp is None else [p for p in space.pp if rest % p == 0]
            for p in pps:
                dp = rest // p
                m = problem.global_batch // dp
                for fam in space.families:
                    for n, v, part, ex in family_choices(fam, space):
                        c = Candidate(fam, tp, cp, p, dp, m, n, v, part, ex)
                        yield c, _rule(problem, c)


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
    if c.partition == "flops" and S < 2 * c.slices * c.cp:
        return "seq_len too short for a flops partition into n slices"
    try:
        schedules.get(c.schedule).validate(_Shape(c))
    except SpecError as e:
        return rule_reason(c.schedule, e)
    return None


def rule_reason(family: str, err: Exception) -> str:
    """A rule message as a reason shared by many candidates: standalone numbers become N, digits
    inside names ('interleaved-1f1b') stay."""
    return f"{family}: " + re.sub(r"\b\d+\b", "N", str(err)).split(";")[0]


class _Shape:
    """The few spec attributes that Family.validate and passes.memory.static_bytes read, without
    building a PlanSpec (stage 1 runs on tens of thousands of candidates)."""

    __slots__ = ("schedule", "pp", "microbatches", "slices", "virtual_stages", "tp", "cp", "dp", "model",
                 "stage_layers", "placement", "num_stages")

    def __init__(self, c: Candidate, model=None):
        self.schedule, self.pp, self.microbatches = c.schedule, c.pp, c.microbatches
        self.slices, self.virtual_stages, self.tp, self.cp, self.dp = c.slices, c.virtual_stages, c.tp, c.cp, c.dp
        self.model = model
        if model is not None:
            self.num_stages = c.pp * c.virtual_stages
            self.stage_layers = split_layers(model.layers, self.num_stages)
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


@lru_cache(maxsize=None)
def slice_lens(model, seq_len: int, n: int, partition: str) -> tuple[int, ...]:
    if partition == "flops":
        return tuple(flops_partition(model, seq_len, n))
    return uniform_slices(seq_len, n)


@lru_cache(maxsize=None)
def slice_costs(model, seq_len: int, n: int, partition: str, tp: int, cp: int, prof: DeviceProfile,
                dtype_bytes: int = 2) -> SliceCosts:
    lens = slice_lens(model, seq_len, n, partition)
    fb = head_fb = fixed = work = 0.0
    min_f = min_b = math.inf
    prefix = 0
    for s in lens:
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
    return SliceCosts(lens, fb, head_fb, fixed, work, min_f, min_b, hop, s_min / cp)


# ---------------------------------------------------------------- stage 1: bounds

@dataclass
class Bounds:
    memory: float       # bytes, <= the exact peak of the fullest rank
    time: float         # seconds, <= the simulated step time
    estimate: float     # seconds, the order of stage 2


def bounds(problem: Problem, c: Candidate) -> Bounds:
    model, prof, b = problem.model, problem.profile, problem.dtype_bytes
    sh = _Shape(c, model)
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
    for r in range(p):
        layers = sum(L[s] for s in sh.placement[r])
        head = sc.head_fb if last in sh.placement[r] else 0.0
        busy.append(m * (layers * sc.fb + head))
        fixed.append(m * (layers * sc.fixed_fb + head))
    edge = []  # forward chain before rank r starts + backward chain after it ends
    fill = drain = 0.0
    for r in range(p):
        edge.append(fill + drain)
        fill += L[r] * sc.min_f + sc.min_hop
        drain += min(L[c_ * p + r] for c_ in range(v)) * sc.min_b + sc.min_hop
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
    extra = dict(tp=c.tp, cp=c.cp, dp=c.dp, exchange=c.exchange)
    if c.partition == "flops":
        extra.update(partition="flops", slice_lens=slice_lens(problem.model, problem.seq_len, c.slices, "flops"))
    return build_spec(c.schedule, problem.model, pp=c.pp, microbatches=c.microbatches, slices=c.slices,
                      virtual_stages=c.virtual_stages, seq_len=problem.seq_len, **extra)


def exact_peak_memory(spec: PlanSpec, dtype_bytes: int = 2) -> float:
    """Peak bytes of the fullest rank: the memory model needs only each rank's compute order
    (communication and KV exchanges do not change it), so no compile."""
    return max(r["peak_memory_bytes"] for r in memory_report(schedule_plan(spec), dtype_bytes))


def evaluate(spec: PlanSpec, profile: DeviceProfile, dtype_bytes: int = 2) -> tuple[dict, Plan]:
    """Compile (KV exchange costed for `profile`) and simulate one spec: a row of step time,
    bubble, peak memory, tokens/s, MFU."""
    plan = compile_plan(spec, profile)
    out = simulate_timed(plan, profile, dtype_bytes)
    row = {"step_s": out["step_s"], "bubble_fraction": out["bubble_fraction"],
           "peak_memory_bytes": max(r["peak_memory_bytes"] for r in out["ranks"]),
           "tokens_per_s": out["tokens_per_s"], "mfu": out["mfu"]}
    return row, plan


# ---------------------------------------------------------------- the search

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
    least_memory: dict | None = None   # the candidate with the smallest memory bound (when nothing fits)
    simulated: list[dict] = field(default_factory=list, repr=False)
    best_plan: Plan | None = field(default=None, repr=False)
    elapsed_s: float = 0.0

    @property
    def best(self) -> dict | None:
        return self.top[0] if self.top else None


def pareto_front(rows: list[dict]) -> list[dict]:
    """Rows no other row beats on both throughput (higher) and peak memory (lower)."""
    out, best_tps = [], -1.0
    for r in sorted(rows, key=lambda r: (r["peak_memory_bytes"], -r["tokens_per_s"])):
        if r["tokens_per_s"] > best_tps:
            out.append(r)
            best_tps = r["tokens_per_s"]
    return out


def search(problem: Problem, space: Space = Space(), top_k: int = 5, time_limit: float | None = None,
           progress: Callable[[dict], None] | None = None, keep_plan: bool = True) -> SearchResult:
    """Branch and bound over the space (module docstring). `progress(state)` is called now and then."""
    t0 = time.perf_counter()
    counts = {"candidates": 0, "infeasible": 0, "pruned_memory_bound": 0, "pruned_time_bound": 0,
              "oom_exact": 0, "simulated": 0}
    reasons: dict[str, int] = {}
    live: list[tuple[Candidate, Bounds]] = []
    least = None
    for c, why in enumerate_space(problem, space):
        counts["candidates"] += 1
        if why is None:
            bd = bounds(problem, c)
            if bd.memory > problem.memory_budget:
                counts["pruned_memory_bound"] += 1
                if least is None or bd.memory < least[1].memory:
                    least = (c, bd)
                continue
            live.append((c, bd))
        else:
            counts["infeasible"] += 1
            reasons[why] = reasons.get(why, 0) + 1
        if progress and counts["candidates"] % 2000 == 0:
            progress({"stage": 1, "done": counts["candidates"], "elapsed": time.perf_counter() - t0})

    by_est = sorted(range(len(live)), key=lambda i: (live[i][1].estimate, live[i][0]))
    by_bound = sorted(range(len(live)), key=lambda i: live[i][1].time)
    done = [False] * len(live)
    ptr = 0
    top: list[tuple[float, Candidate, dict]] = []  # sorted by (step, candidate)
    simulated: list[dict] = []
    best_plan = None
    stopped = "exhausted"
    unexplored, unexplored_bound = 0, None

    def kth() -> float:
        return top[top_k - 1][0] if len(top) >= top_k else math.inf

    for step, i in enumerate(by_est):
        while ptr < len(by_bound) and done[by_bound[ptr]]:
            ptr += 1
        if ptr < len(by_bound) and live[by_bound[ptr]][1].time > kth():
            stopped = "bound"
            counts["pruned_time_bound"] += len(live) - step
            break
        if time_limit is not None and time.perf_counter() - t0 > time_limit:
            stopped = "time-limit"
            left = [j for j in by_est[step:] if live[j][1].time <= kth()]
            counts["pruned_time_bound"] += len(live) - step - len(left)
            unexplored = len(left)
            unexplored_bound = min((live[j][1].time for j in left), default=None)
            break
        done[i] = True
        c, bd = live[i]
        if progress:
            progress({"stage": 2, "done": step, "total": len(live), "simulated": counts["simulated"],
                      "best_s": top[0][0] if top else None, "elapsed": time.perf_counter() - t0})
        if bd.time > kth():
            counts["pruned_time_bound"] += 1
            continue
        try:
            spec = candidate_spec(problem, c)
            if exact_peak_memory(spec, problem.dtype_bytes) > problem.memory_budget:
                counts["oom_exact"] += 1
                continue
            row, plan = evaluate(spec, problem.profile, problem.dtype_bytes)
        except SpecError as e:
            counts["infeasible"] += 1
            why = rule_reason(c.schedule, e)
            reasons[why] = reasons.get(why, 0) + 1
            continue
        counts["simulated"] += 1
        row = {**c.fields(), **row, "time_bound_s": bd.time, "memory_bound_bytes": bd.memory}
        simulated.append(row)
        if row["step_s"] < kth() or (row["step_s"] == kth() and c < top[-1][1]):
            top.append((row["step_s"], c, row))
            top.sort(key=lambda x: (x[0], x[1]))
            del top[top_k:]
            if keep_plan and top[0][1] == c:
                best_plan = plan
    least_row = None
    if not top and least is not None:
        least_row = {**least[0].fields(), "memory_bound_bytes": least[1].memory}
    return SearchResult(problem, space, [r for _, _, r in top], pareto_front(simulated), counts, reasons, stopped,
                        unexplored, unexplored_bound, least_row, simulated, best_plan, time.perf_counter() - t0)


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
