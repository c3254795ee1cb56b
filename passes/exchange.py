"""SlimPipe workload redistribution: the attention context exchange (KV exchange).

Slices are uniform, so a unit of a later slice attends over a longer cache than one of an
earlier slice and costs more. Units that run at the same time are paired; the owner (the longer
unit) ships the K/V of its micro-batch's earliest x slices plus its queries to the partner, which
computes that non-causal attention block alongside its own next unit. No exchange where x < 1 or
where a rank is idle; x is capped by spec.exchange_threshold (0 = no cap).

Two pairing modes (`redistribute(plan, profile=...)`):

- unit cost (`profile=None`, the original pass): "the same time" is the start time in a unit-cost
  replay (F=1, B=2, communication free) of the plan without exchanges, and also in one with
  B/F = 9/4: units that coincide under both ratios run together whatever the real ratio. Forward
  pairs with forward, backward with backward, sorted by cache length and mirror entries paired,
  x = floor((s_owner - s_partner)/2). Paired units start together in that replay, so adding the
  rendezvous changes no start time there.

- cost aware (a DeviceProfile or a profile name; the default, "h100"): "the same time" is the
  same step of the as-soon-as-possible lockstep replay (every unit one step, communication free).
  In the 1F1B steady state that replay is a checkerboard (half the ranks run a forward while the
  others run a backward), so forward and backward units pair too (the partner's own unit kind
  does not matter to the exchange). Each step's units are sorted by their real duration under the
  cost model (passes.costs) and mirror entries paired; x makes the owner's and the partner's
  durations as equal as possible (the owner loses kv_shift, the partner gains it), and a pair is
  kept only where that beats the longer unit by more than the rendezvous time (kv_time). The
  candidates (this pairing and the unit-cost one) are replayed with the cost model (unit times,
  p2p flight, KV rendezvous) and the shortest makespan wins, so the result is never slower in
  that model than the unit-cost pairing. No exchange at all competes only where the unit-cost
  rule finds no pair either (`--no-exchange` is the way to turn it off): with a toy model whose
  units take microseconds the rendezvous latency can outweigh the gain, and the user then gets
  the unit-cost pairing, as before.

Deadlock freedom: paired units share a step of a lockstep replay, so that replay is an execution
in which every rendezvous meets (the plan cannot deadlock); on top of that a candidate whose timed
replay deadlocks is discarded, and the chosen plan is run through passes.check; should it fail, the pass falls back to the unit-cost pairing (which
passes the checker whenever the input does), then to no exchange.
"""
from __future__ import annotations

from ir import KINDS, KV, Instr, Plan, kv_kind

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


def _attention_units(plan: Plan, timeline):
    """The timeline entries of units that run attention (ir.KINDS column `attention`: F, B, I --
    a split backward's W has none to exchange)."""
    return [e for e in timeline if KINDS[plan.ranks[e[0]][e[1]].kind].attention]


def pairings(plan: Plan) -> list[tuple[int, int, int, int, int]]:
    """(owner, owner_index, partner, partner_index, x) for every exchange, in time order.

    Indices point at compute units in the streams of `plan` (which has no KV instructions)."""
    spec = plan.spec
    res = replay(plan, record=True)
    if res.deadlocked:
        return []
    # a second replay with backward/forward = 9/4 (integers: exact): units that start together in
    # both run together whatever the real ratio, so the rendezvous does not make them wait
    alt_cost = {"forward": 4.0, "backward": 9.0, "backward_input": 5.0, "backward_weight": 4.0}  # I + W = B
    alt = replay(plan, cost=lambda r, ins: alt_cost[KINDS[ins.kind].cost], record=True)
    alt_start = {(r, i): t0 for r, i, t0, _t1 in alt.timeline}
    groups: dict[tuple[float, float, str], list[tuple[int, int]]] = {}
    for r, i, t0, _t1 in _attention_units(plan, res.timeline):
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


def _with_exchanges(plan: Plan, pairs) -> Plan:
    """The plan (without KV instructions) with the exchanges `pairs` ((owner, owner_index,
    partner, partner_index, x), indices into `plan`) inserted before their units; spec.exchange=True."""
    spec = plan.spec
    before: list[dict[int, Instr]] = [dict() for _ in plan.ranks]
    tag = kv_tag_base(spec)
    for o, oi, q, qi, x in pairs:
        u = plan.ranks[o][oi]
        phase = KINDS[u.kind].phase
        send, recv = kv_kind(phase, "owner"), kv_kind(phase, "partner")
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


# ---------------------------------------------------------------- cost-aware pairing

def _best_x(cm, o: int, u: Instr, q: int, w: Instr, thr: int) -> tuple[int, float, float]:
    """(x, owner seconds, partner seconds) with x in 1..u.slice (capped by thr) making the two
    durations most equal: the owner's time falls and the partner's rises as x grows."""
    hi = u.slice if not thr else min(u.slice, thr)
    if hi < 1:
        return 0, 0.0, 0.0
    kind = kv_kind(KINDS[u.kind].phase, "owner")

    def times(x):
        f = cm.kv_shift(o, Instr(kind, u.mb, u.slice, u.chunk, q, 0, x))
        return cm.unit_time(o, u, -f), cm.unit_time(q, w, f)

    lo_x, hi_x = 1, hi  # smallest x with owner <= partner, or hi
    while lo_x < hi_x:
        mid = (lo_x + hi_x) // 2
        a, b = times(mid)
        if a <= b:
            hi_x = mid
        else:
            lo_x = mid + 1
    best = None
    for x in (lo_x - 1, lo_x):
        if x < 1:
            continue
        a, b = times(x)
        if best is None or max(a, b) < max(best[1], best[2]):
            best = (x, a, b)
    return best


def _pair_steps(plan: Plan, cm, timeline, window: float = 1e-9) -> list[tuple[int, int, int, int, int]]:
    """Pairs of units on different ranks that start together (within `window`) in `timeline`
    ((rank, index, start) of `plan`'s compute units, e.g. a lockstep replay): mirror pairing by
    real duration in each group, kept where the pair, started together and paying the rendezvous,
    ends before the longer unit alone would."""
    spec = plan.spec
    thr = spec.exchange_threshold
    ranks = plan.ranks
    dur = {}
    for r, i, _t0 in timeline:
        dur[(r, i)] = cm.unit_time(r, ranks[r][i])
    groups: list[list[tuple[float, int, int]]] = []
    cur: list[tuple[float, int, int]] = []
    seen: set[int] = set()
    for t0, r, i in sorted((t0, r, i) for r, i, t0 in timeline):
        if cur and (t0 - cur[0][0] > window or r in seen):
            groups.append(cur)
            cur, seen = [], set()
        cur.append((t0, r, i))
        seen.add(r)
    if cur:
        groups.append(cur)
    out = []
    for g in groups:
        if len(g) < 2:
            continue
        g = sorted(g, key=lambda e: dur[(e[1], e[2])])
        k = len(g)
        for a in range(k // 2):
            (ts, q, qi), (to, o, oi) = g[a], g[k - 1 - a]
            u, w = ranks[o][oi], ranks[q][qi]
            x, d_o, d_q = _best_x(cm, o, u, q, w, thr)
            if x < 1:
                continue
            kind = kv_kind(KINDS[u.kind].phase, "owner")
            kv = cm.kv_time(o, q, Instr(kind, u.mb, u.slice, u.chunk, q, 0, x))
            old_end = max(to + dur[(o, oi)], ts + dur[(q, qi)])
            new_end = max(to, ts) + kv + max(d_o, d_q)
            if new_end < old_end:
                out.append((min(to, ts), o, oi, q, qi, x))
    out.sort()
    return [e[1:] for e in out]


def cost_pairings(plan: Plan, profile="h100", dtype_bytes: int = 2) -> list[list[tuple[int, int, int, int, int]]]:
    """Candidate pairings under the cost model, best (shortest timed makespan) first: the units
    that start together in a lockstep replay (every unit one step, communication free) are
    mirror-paired by their real durations; the unit-cost pairing and the empty one are candidates too. Candidates whose timed replay deadlocks are left out."""
    from .costs import CostModel, load_profile, timed_replay

    cm = CostModel(plan.spec, load_profile(profile), dtype_bytes)
    scored: dict[tuple, float] = {}

    def evaluate(pairs):
        key = tuple(pairs)
        if key in scored:
            return
        res, _ = timed_replay(_with_exchanges(plan, pairs) if pairs else plan, cm)
        scored[key] = float("inf") if res.deadlocked else res.makespan

    evaluate([])
    if scored[()] == float("inf"):
        return [[]]
    evaluate(pairings(plan))
    res = replay(plan, cost=lambda r, ins: 1.0, record=True)
    evaluate(_pair_steps(plan, cm, [(r, i, t0) for r, i, t0, _t1 in _attention_units(plan, res.timeline)]))
    order = sorted((m, len(k), k) for k, m in scored.items() if m != float("inf"))
    return [list(k) for _m, _n, k in order]


_DEFAULT = "h100"


def redistribute(plan: Plan, profile=_DEFAULT) -> Plan:
    """Plan -> Plan with KVF_*/KVB_* exchanges inserted before the paired units; spec.exchange=True.

    `profile`: a DeviceProfile or a built-in profile name pairs with the cost model (default
    "h100"); None pairs by the unit-cost replays (the original rule). The input must carry no KV
    instructions (run it once, after communication lowering). The result passes passes.check
    whenever the input does."""
    if any(ins.kind in KV for s in plan.ranks for ins in s):
        raise ValueError("plan already has KV exchanges; redistribute runs once on a plan without them")
    if profile is None:
        return _with_exchanges(plan, pairings(plan))
    from .check import check

    unit = pairings(plan)
    cands = cost_pairings(plan, profile)
    # the user asked for the exchange (--no-exchange turns it off): no exchange at all competes
    # only where the unit-cost rule finds no pair either, and is the last resort otherwise
    for pairs in [c for c in cands if c or not unit] + [unit, []]:
        out = _with_exchanges(plan, pairs)
        if not pairs or check(out).ok:
            return out
    raise AssertionError("unreachable")
