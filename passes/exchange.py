"""SlimPipe workload redistribution: the attention context exchange (KV exchange).

Slices are uniform, so a unit of a later slice attends over a longer cache than one of an
earlier slice and costs more. Units that run at the same time are paired, longest cache with
shortest (sort by cache length, pair mirror entries); the owner (longer cache) ships the K/V of
its micro-batch's earliest x slices plus its queries to the partner, which computes that
non-causal attention block. x is the largest count of earliest slices whose tokens do not exceed
half the cache difference (uniform slices: floor((s_owner - s_partner)/2)), capped by
spec.exchange_threshold (0 = no cap); no exchange when x < 1 or where a rank is idle.

"The same time" is the start time in a unit-cost replay (F=1, B=2, communication free) of the
plan without exchanges, and also in one with B/F = 9/4: units that coincide under both ratios
run together whatever the real ratio (coincidence under one ratio only, e.g. 3F+1B vs 1F+2B,
would turn into a rendezvous wait on real hardware). Forward pairs with forward, backward with
backward. Since
paired units start together in that replay, adding the rendezvous changes no start time, and
because matching is deterministic (program order per tag) deadlock freedom does not depend on
timing: the result passes the checker whenever the input does.
"""
from __future__ import annotations

from ir import KV, Instr, Kind, Plan

from .lower import kv_tag_base
from .replay import replay


def cache_tokens(spec, mb: int, j: int) -> int:
    """Tokens of the earlier slices of micro-batch mb that slice j attends over (its K/V cache)."""
    return sum(spec.slice_lens[mb][:j])


def shipped_slices(spec, mb: int, j: int, diff_tokens: int, threshold: int) -> int:
    """Largest x with the tokens of slices 0..x-1 of mb at most diff_tokens/2 (x <= j, <= cap)."""
    half = diff_tokens / 2
    lens = spec.slice_lens[mb]
    x = acc = 0
    while x < j and acc + lens[x] <= half:
        acc += lens[x]
        x += 1
    if threshold:
        x = min(x, threshold)
    return x


def pairings(plan: Plan) -> list[tuple[int, int, int, int, int]]:
    """(owner, owner_index, partner, partner_index, x) for every exchange, in time order.

    Indices point at compute units in the streams of `plan` (which has no KV instructions)."""
    spec = plan.spec
    res = replay(plan, record=True)
    if res.deadlocked:
        return []
    # a second replay with backward/forward = 9/4 (integers: exact): units that start together in
    # both run together whatever the real ratio, so the rendezvous does not make them wait
    alt = replay(plan, cost=lambda r, ins: 4.0 if ins.kind == Kind.F else 9.0, record=True)
    alt_start = {(r, i): t0 for r, i, t0, _t1 in alt.timeline}
    groups: dict[tuple[float, float, str], list[tuple[int, int]]] = {}
    for r, i, t0, _t1 in res.timeline:
        groups.setdefault((t0, alt_start[(r, i)], plan.ranks[r][i].kind), []).append((r, i))
    out = []
    thr = spec.exchange_threshold
    for key in sorted(groups):
        units = groups[key]
        if len(units) < 2:
            continue
        keyed = []
        for r, i in units:
            u = plan.ranks[r][i]
            keyed.append((cache_tokens(spec, u.mb, u.slice), r, i))
        keyed.sort()
        k = len(keyed)
        for a in range(k // 2):
            short, long_ = keyed[a], keyed[k - 1 - a]
            o_ins = plan.ranks[long_[1]][long_[2]]
            x = shipped_slices(spec, o_ins.mb, o_ins.slice, long_[0] - short[0], thr)
            if x >= 1:
                out.append((long_[1], long_[2], short[1], short[2], x))
    return out


def redistribute(plan: Plan) -> Plan:
    """Plan -> Plan with KVF_*/KVB_* exchanges inserted before the paired units; spec.exchange=True.

    The input must carry no KV instructions (run it once, after communication lowering)."""
    if any(ins.kind in KV for s in plan.ranks for ins in s):
        raise ValueError("plan already has KV exchanges; redistribute runs once on a plan without them")
    spec = plan.spec
    before: list[dict[int, Instr]] = [dict() for _ in plan.ranks]
    tag = kv_tag_base(spec)
    for o, oi, q, qi, x in pairings(plan):
        u = plan.ranks[o][oi]
        fwd = u.kind == Kind.F
        send = Kind.KVF_SEND if fwd else Kind.KVB_SEND
        recv = Kind.KVF_RECV if fwd else Kind.KVB_RECV
        before[o][oi] = Instr(send, u.mb, u.slice, u.chunk, q, tag, x)
        before[q][qi] = Instr(recv, u.mb, u.slice, u.chunk, o, tag, x)
        tag += 1
    ranks = []
    for r, stream in enumerate(plan.ranks):
        ins_before = before[r]
        if not ins_before:
            ranks.append(stream)
            continue
        out = []
        for i, ins in enumerate(stream):
            kv = ins_before.get(i)
            if kv is not None:
                out.append(kv)
            out.append(ins)
        ranks.append(out)
    new_spec = spec.model_copy(update={"exchange": True})
    return Plan(new_spec, tuple(tuple(r) for r in ranks), {**plan.meta, "exchanges": tag - kv_tag_base(spec)},
                plan.schema_version)
