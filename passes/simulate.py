"""Unit-cost simulation (forward 1, backward 2, communication free) and in-flight peaks."""
from __future__ import annotations

from itertools import accumulate
from operator import itemgetter

from ir import COMPUTE, KINDS, KV, KV_OWNER, Plan, PlanInvalidError

from .replay import replay

_KIND = itemgetter(0)


# a kind's change to the units in flight (ir.KINDS memory): +1 save, -1 free / free_rest, else 0
_IN_FLIGHT = {k: (1 if row.memory == "save" else -1 if row.memory in ("free", "free_rest") else 0) for k, row in KINDS.items()}


def peak_units(stream) -> int:
    """Most forward units on the rank whose backward has not finished (program order): units
    whose kind saves state (ir.KINDS memory "save") minus those that released it ("free"; with a
    split backward "free_rest": a unit is in flight until its W). A running sum at C level."""
    return max(accumulate(map(_IN_FLIGHT.__getitem__, map(_KIND, stream)), initial=0))


def bubble_fraction(busy: list[float], makespan: float) -> float:
    """1 - sum(busy) / (p * makespan)."""
    if makespan <= 0:
        return 0.0
    return 1.0 - sum(busy) / (len(busy) * makespan)


def simulate_units(plan: Plan, res=None) -> dict:
    """Unit-cost replay (F 1, B 2, I 1, W 1; communication free): {"makespan", "bubble_fraction",
    "ranks": [{"rank", "busy", "peak_units"}], "kv_exchanges"}; PlanInvalidError naming the wait cycle on a deadlock.
    "kv_exchanges" (how many the plan holds, 0 without): unit costs price no attention,
    so an exchange's rendezvous can only add waits here, while the attention it moves (what it is
    for) shows only under the cost model (simulate_timed); simulate_units(strip_exchanges(plan))
    gives the figures without them (a second replay: not done here, the 1.6M-instruction plan of
    bench/scale_1m.py would pay 0.4 s for it). `res`: replay(plan) when the caller has it
    (passes.check's proof)."""
    if res is None:
        res = replay(plan)
    if res.deadlocked:
        raise PlanInvalidError(res.deadlock_message())
    makespan = res.makespan
    out = {
        "makespan": makespan,
        "bubble_fraction": bubble_fraction(res.busy, makespan),
        "ranks": [{"rank": r, "busy": res.busy[r], "peak_units": peak_units(s)} for r, s in enumerate(plan.ranks)],
    }
    n_ex = sum(sum(map(KV_OWNER.__contains__, map(_KIND, s))) for s in plan.ranks)  # C-level scans
    out["kv_exchanges"] = n_ex
    return out


def strip_exchanges(plan: Plan) -> Plan:
    """The plan without its KV-exchange instructions (same compute and p2p order)."""
    if not plan.has_kv_exchanges():
        return plan
    return plan.with_ranks([tuple(ins for ins in s if ins.kind not in KV) for s in plan.ranks])


def step_figures(spec, cm, res) -> dict:
    """step_s, bubble_fraction, mfu, tokens_per_s and dp_allreduce_s of one timed replay `res` of a
    plan of `spec` under the CostModel `cm`: what simulate_timed reports and what tune ranks by."""
    from .memory import rank_params

    dp_s = max(cm.dp_time(rank_params(spec, r) * 4.0) for r in range(spec.pp))
    makespan = res.makespan + dp_s
    devices = spec.pp * spec.tp * spec.cp
    mfu = cm.model_flops() / (makespan * cm.prof.peak_flops * devices) if makespan > 0 else 0.0
    tokens = spec.microbatches * spec.micro_batch_size * spec.seq_len * spec.dp
    return {"step_s": makespan, "bubble_fraction": bubble_fraction(res.busy, res.makespan), "mfu": mfu,
            "tokens_per_s": tokens / makespan if makespan else 0.0, "dp_allreduce_s": dp_s}


def simulate_step(plan: Plan, profile=None, dtype_bytes: int = 2) -> dict:
    """simulate_timed's headline figures (step_figures) from one timed replay: no bubble breakdown
    and no memory report, for searches that already know the plan's peak memory."""
    from .costs import CostModel, load_profile, timed_replay

    cm = CostModel(plan.spec, profile if profile is not None else load_profile(None), dtype_bytes, plan=plan)
    res, _table = timed_replay(plan, cm)
    if res.deadlocked:
        raise PlanInvalidError(res.deadlock_message())
    return step_figures(plan.spec, cm, res)


def simulate_timed(plan: Plan, profile=None, dtype_bytes: int = 2, record: bool = False) -> dict:
    """Timed simulation with the cost model (passes.costs) and the memory model (passes.memory).

    Bubble fraction 1 - sum(busy) / (p * makespan) is split three ways by replaying the plan
    twice more: `ideal` with every compute unit at the mean cost of its kind, free
    communication and the KV-exchange instructions removed (what the schedule itself leaves
    idle: with equal units the exchange has nothing to balance, and its rendezvous would only
    hold paired units back to start together); `imbalance` the extra idleness the real unit
    costs add (exchanges in place, communication free); `comm` the rest (p2p flight, KV
    rendezvous time). Each part is clamped so that all three are >= 0 and sum to the bubble:
    ideal = min(b_ideal, b), imbalance = max(0, min(b_free, b) - ideal), comm = b - the two.
    step_s (the makespan) adds the data-parallel gradient all-reduce after the pipeline drains.
    Named as compare, tune and the executor name them (step_s, tokens_per_s).
    MFU = model FLOPs (3x forward) / (makespan * peak * pp * tp * cp)."""
    from .costs import CostModel, load_profile, replay_engine, timed_replay
    from .memory import memory_report

    prof = profile if profile is not None else load_profile(None)
    spec = plan.spec
    cm = CostModel(spec, prof, dtype_bytes, plan=plan)
    res, table = timed_replay(plan, cm, record=record)

    def cost(r, ins):
        return table[(r, ins.kind, ins.mb, ins.slice, ins.chunk)]

    if res.deadlocked:
        raise PlanInvalidError(res.deadlock_message())
    engine = replay_engine(plan, prof)
    free = engine(plan, cost, help_cost=cm.help_time)
    sums = {k: [0.0, 0] for k in COMPUTE}
    for (_r, k, *_), t in table.items():
        sums[k][0] += t
        sums[k][1] += 1
    mean = {k: (s / c if c else 0.0) for k, (s, c) in sums.items()}
    ideal_res = engine(strip_exchanges(plan), lambda r, ins: mean[ins.kind])
    b_total = bubble_fraction(res.busy, res.makespan)
    b_ideal = min(bubble_fraction(ideal_res.busy, ideal_res.makespan), b_total)
    b_free = max(min(bubble_fraction(free.busy, free.makespan), b_total), b_ideal)
    head = step_figures(spec, cm, res)
    mem = memory_report(plan, dtype_bytes)
    out = {
        "step_s": head["step_s"],
        "bubble_fraction": b_total,
        "bubble_breakdown": {"ideal": b_ideal, "imbalance": b_free - b_ideal, "comm": b_total - b_free},
        "mfu": head["mfu"],
        "tokens_per_s": head["tokens_per_s"],
        "device_profile": prof.name,
        "dp_allreduce_s": head["dp_allreduce_s"],
        "ranks": [{"rank": r, "busy_s": res.busy[r], **mem[r]} for r in range(spec.pp)],
    }
    if record:
        out["_replay"] = res
        out["_table"] = table
    return out
