"""SlimPipe workload redistribution: the attention context exchange (KV exchange).

Slices are uniform, so a unit of a later slice attends over a longer cache than one of an
earlier slice and costs more. The owner of a long unit ships the K/V of a token range [lo, hi) of
its prefix plus its queries to another rank, which computes that non-causal attention block and
returns the partial output (forward) or the gradients (backward). exchange_threshold caps a range
at the tokens of that many slices (0 = no cap).

Two rules (`redistribute(plan, profile=...)`):

- unit cost (`profile=None`, the original pass): "the same time" is the start time in a unit-cost
  replay (F=1, B=2, communication free) of the plan without exchanges, and also in one with
  B/F = 9/4: units that coincide under both ratios run together whatever the real ratio. Forward
  pairs with forward, backward with backward, sorted by cache length and mirror entries paired;
  the owner ships its earliest x whole slices, x = floor((s_owner - s_partner)/2). Paired units
  start together in that replay, so adding the rendezvous changes no start time there.

- levelling (a DeviceProfile or a profile name; the default, "h100"): the steps of the
  as-soon-as-possible lockstep replay (every unit one step, communication free) are levelled one
  by one toward their mean (level_steps): owners ship disjoint ranges of their prefix to several
  partners (KV*_RECV: ranks with a unit in that step, which serve beside it) and helpers (KV*_HELP:
  ranks with no unit in that step, which serve as work of their own). The levelled sets (with
  and without helpers), the unit-cost pairing and no exchange at all are replayed with the cost
  model (unit times, p2p flight, KV rendezvous, helper work) and the shortest makespan wins: never
  slower there than no exchange (also when no step levels: the unit-cost pairing then competes
  with no exchange alone). With a toy model whose units take microseconds nothing levels
  (could_level): a user who asked for the exchange (`keep_pairing`, the CLI's explicit
  `--exchange`) gets the unit-cost pairing, as before; otherwise (the CLI's default) the pairing
  competes with no exchange like everywhere else.

Deadlock freedom: every exchange joins ranks in one step of a lockstep replay, and every rank
lists its exchanges in one global (step, round) order, so that replay is an execution in which
every rendezvous meets; a candidate whose timed replay deadlocks is discarded (a replay that
finishes proves it: whether a rank can move never depends on durations), and the chosen plan's
exchange rules are checked (validate_kv).
"""
from __future__ import annotations

import bisect
from operator import itemgetter
from typing import NamedTuple

from ir import COMPUTE, KINDS, KV, RECVS, UNIT_COST, Instr, Plan, kv_kind

from .lower import kv_tag_base
from .replay import start_times

# unit durations by cost class (ir.KINDS column `cost`) of the replays that define "together":
# the table's unit costs, backward/forward = 9/4 (I + W = B), and one step per unit (lockstep)
UNIT_WEIGHTS = {KINDS[k].cost: UNIT_COST[k] for k in COMPUTE}
_ATTENTION = frozenset(k for k in COMPUTE if KINDS[k].attention)
ALT_WEIGHTS = {"forward": 4.0, "backward": 9.0, "backward_input": 5.0, "backward_weight": 4.0}
STEP_WEIGHTS = {c: 1.0 for c in UNIT_WEIGHTS}


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


def pairings(plan: Plan, times=None) -> list[tuple[int, int, int, int, int]]:
    """(owner, owner_index, partner, partner_index, x) for every exchange, in time order.

    Indices point at compute units in the streams of `plan` (which has no KV instructions).
    `times`: replay.start_times(plan, [UNIT_WEIGHTS, ALT_WEIGHTS]) when the caller has it, as its
    list or (by_start=True) its groups."""
    spec = plan.spec
    # start times under backward/forward = 2 and 9/4 (integers: exact): units that start
    # together in both run together whatever the real ratio, so the rendezvous does not make them wait
    groups = start_times(plan, [UNIT_WEIGHTS, ALT_WEIGHTS], by_start=True) if times is None else times
    if groups is None:
        return []
    ranks = plan.ranks
    if not isinstance(groups, dict):
        by_start: dict[tuple, list] = {}
        for r, i, (t0, t1) in groups:
            by_start.setdefault((t0, t1, ranks[r][i][0]), []).append((r, i))
        groups = by_start
    offsets = [spec.slice_offsets(mb) for mb in range(spec.microbatches)]
    # the units that start together (same kind), each group by cache length, groups in time order
    # (units that run no attention, a split backward's W, have nothing to exchange)
    attention = _ATTENTION
    out = []
    thr = spec.exchange_threshold
    for key in sorted(key for key, grp in groups.items() if len(grp) > 1 and key[2] in attention):
        keyed = sorted([(offsets[u[1]][u[2]], r, i) for r, i in groups[key] for u in (ranks[r][i],)])
        k = len(keyed)
        for a in range(k // 2):
            short, long_ = keyed[a], keyed[k - 1 - a]
            o_ins = ranks[long_[1]][long_[2]]
            x = shipped_slices(spec, o_ins.mb, o_ins.slice, long_[0] - short[0], thr)
            if x >= 1:
                out.append((long_[1], long_[2], short[1], short[2], x))
    return out


class Ex(NamedTuple):
    """One exchange: the owner's unit (rank, index of the compute unit), the server (rank; index
    of its compute unit for a partner, or where its KV*_HELP goes for a helper), the shipped token
    range [lo, hi), and the (step, seq) that orders every rank's exchanges the same way."""

    step: int
    seq: int
    owner: int
    oi: int
    server: int
    si: int
    lo: int
    hi: int
    helper: bool = False


def _as_ex(plan: Plan, pairs) -> list[Ex]:
    """(owner, owner_index, partner, partner_index, x) pairs (whole slices 0..x-1) as Ex records."""
    offsets = [plan.spec.slice_offsets(mb) for mb in range(plan.spec.microbatches)]
    ranks = plan.ranks
    return [Ex(0, seq, o, oi, q, qi, 0, offsets[ranks[o][oi].mb][x]) for seq, (o, oi, q, qi, x) in enumerate(pairs)]


def _with_exchanges(plan: Plan, exs: list[Ex]) -> Plan:
    """The plan (without KV instructions) with the exchanges `exs` inserted (owner and partner
    instructions right before their units, a helper's where Ex.si says); spec.exchange=True.
    Every rank lists its exchanges in (step, seq) order, which is also the order of the tags."""
    spec = plan.spec
    before: list[dict[int, list]] = [dict() for _ in plan.ranks]
    base = kv_tag_base(spec)
    for n, e in enumerate(sorted(exs, key=lambda e: (e.step, e.seq))):
        u = plan.ranks[e.owner][e.oi]
        phase = KINDS[u.kind].phase
        send, serve = kv_kind(phase, "owner"), kv_kind(phase, "helper" if e.helper else "partner")
        tag = base + n
        before[e.owner].setdefault(e.oi, []).append(Instr(send, u.mb, u.slice, u.chunk, e.server, tag, e.lo, e.hi))
        before[e.server].setdefault(e.si, []).append(Instr(serve, u.mb, u.slice, u.chunk, e.owner, tag, e.lo, e.hi))
    ranks = []
    for r, stream in enumerate(plan.ranks):
        ins_before = before[r]
        if not ins_before:
            ranks.append(stream)
            continue
        out = []
        prev = 0
        for i in sorted(ins_before):
            out.extend(stream[prev:i])
            out.extend(ins_before[i])
            prev = i
        out.extend(stream[prev:])
        ranks.append(out)
    new_spec = spec.model_copy(update={"exchange": True})
    meta = {**plan.meta, "exchanges": len(exs)}
    helpers = sum(e.helper for e in exs)
    if helpers:
        meta["exchange_helpers"] = helpers
    return Plan(new_spec, tuple(tuple(r) for r in ranks), meta, plan.schema_version)


# ---------------------------------------------------------------- cost-aware leveling

def lockstep_steps(plan: Plan):
    """(rank, index, step) of every compute unit in the as-soon-as-possible lockstep replay
    (every unit one step, communication free), or None if the plan deadlocks."""
    times = start_times(plan, [STEP_WEIGHTS])
    return None if times is None else [(r, i, int(t[0])) for r, i, t in times]


def _group_starts(stream) -> list[int]:
    """For each index: where the receives that feed the instruction there begin (the index after
    the previous unit's trailing sends): the place a helper's KV*_HELP goes, so that it does not
    wait for the data of the rank's next unit."""
    out = list(range(len(stream) + 1))
    recv = RECVS
    for i, ins in enumerate(stream):
        if ins.kind in recv:
            out[i + 1] = out[i]
    return out


def _quantum(spec) -> int:
    """Token granularity of shipped ranges: about 1/64 of the shortest slice, a power of two."""
    s = min(min(lens) for lens in spec.slice_lens)
    q = 1
    while q * 128 <= s:
        q *= 2
    return q


def level_steps(plan: Plan, cm, helpers: bool = True, tokens: bool = True, steps=None,
                min_gain: float = 2.0) -> list[Ex]:
    """Exchanges that level every lockstep step toward its mean.

    In each step of the lockstep replay, a water level T is found at which the attention the
    units above T can ship (their whole prefix at most) fills the room below T of the other units
    and, with `helpers`, of the ranks that have no unit in that step (their load is 0). Owners
    (longest first) ship disjoint ranges of their prefix, from its start, to receivers (emptiest
    first): a receiver with a unit serves alongside it (KV*_RECV), an idle rank as a helper
    (KV*_HELP). Ranges are in tokens (a multiple of _quantum) or, without `tokens`, whole slices.
    A piece is kept only where the attention it moves, less its messages' processor time
    (CostModel.kv_cpu), exceeds `min_gain` times its rendezvous time, and a
    step's exchanges only where its longest rank gets shorter, rendezvous included. The step's
    exchanges are put in rounds (_in_rounds) so that rendezvous do not queue behind each other."""
    spec = plan.spec
    ranks = plan.ranks
    p = len(ranks)
    steps = lockstep_steps(plan) if steps is None else steps
    if not steps:
        return []
    thr = spec.exchange_threshold
    offsets = cm.offsets
    q_tok = _quantum(spec) if tokens else 0
    latency = cm.prof.p2p_latency
    by_step: dict[int, list[tuple[int, int]]] = {}
    unit_steps: list[list[tuple[int, int]]] = [[] for _ in range(p)]
    for r, i, k in steps:
        by_step.setdefault(k, []).append((r, i))
        unit_steps[r].append((k, i))
    starts = [_group_starts(st) for st in ranks]
    # per rank: steps of its units (sorted) -> the helper slot of an idle step
    slot_steps = [[k for k, _i in us] for us in unit_steps]
    def helper_slot(h: int, k: int) -> int:
        j = bisect.bisect_right(slot_steps[h], k)
        if j >= len(unit_steps[h]):
            return len(ranks[h])
        return starts[h][unit_steps[h][j][1]]

    out: list[Ex] = []
    seq = 0
    for k in sorted(by_step):
        units = by_step[k]
        if len(units) < 2 and not helpers:
            continue
        at = dict(units)
        load = {}
        per_tok = {}
        cap = {}
        for r, i in units:
            u = ranks[r][i]
            load[r] = cm.unit_time(r, u)
            P = offsets[u.mb][u.slice]
            row = KINDS[u.kind]
            if P > 0 and row.attention:  # only a unit that runs attention can ship some
                # seconds per shipped token, as the partner side pays them over the whole prefix
                serve = kv_kind(row.phase, "partner")
                per_tok[r] = cm.kv_shift(r, Instr(serve, u.mb, u.slice, u.chunk, r, 0, 0, P)) / P
                cap[r] = per_tok[r] * P
        idle = [h for h in range(p) if h not in load] if helpers else []
        top = max(load.values())
        loads = list(load.values()) + [0.0] * len(idle)
        if top - min(loads) < 4 * latency * max(spec.stage_layers):
            continue

        def excess(T):
            e = sum(min(d - T, cap.get(r, 0.0)) for r, d in load.items() if d > T)
            room = sum(T - d for d in loads if d < T)
            return e - room

        lo_T, hi_T = 0.0, top
        for _ in range(40):
            mid = (lo_T + hi_T) / 2
            if excess(mid) > 0:
                lo_T = mid
            else:
                hi_T = mid
        T = hi_T
        owners = sorted((r for r, d in load.items() if d > T and r in cap), key=lambda r: -load[r])
        recv = sorted([(d, r) for r, d in load.items() if d < T] + [(0.0, h) for h in idle])
        if not owners or not recv:
            continue
        room = [T - d for d, _r in recv]
        new = dict(load)
        for h in idle:
            new[h] = 0.0
        shifted = {r: 0.0 for r in load}
        step_ex: list[Ex] = []
        ri = 0
        for o in owners:
            oi = at[o]
            u = ranks[o][oi]
            P = offsets[u.mb][u.slice]
            cap_tok = offsets[u.mb][thr] if thr and thr < len(offsets[u.mb]) else P
            need = min(load[o] - T, cap[o])
            cursor = 0
            phase = KINDS[u.kind].phase
            kind = kv_kind(phase, "owner")
            while need > 0 and ri < len(recv) and cursor < P:
                g = min(need, room[ri])
                tok = g / per_tok[o]
                if tokens:
                    tok = int(round(tok / q_tok)) * q_tok
                    end = min(P, cursor + max(tok, 0))
                else:
                    want = cursor + tok
                    end = min((x for x in offsets[u.mb][1:u.slice + 1]), key=lambda x: abs(x - want))
                end = min(end, cursor + cap_tok)
                small_need = need <= room[ri]  # the piece is small because the owner needs little
                d, qr = recv[ri]
                ins = Instr(kind, u.mb, u.slice, u.chunk, qr, 0, cursor, max(end, cursor + 1))
                moved = per_tok[o] * (end - cursor)
                kvt = cm.kv_time(o, qr, ins)
                msg = cm.kv_cpu(o, ins)  # the messages' processor time, on each side
                if end <= cursor or moved - msg <= min_gain * kvt:
                    if small_need:
                        break  # this owner is done; the receiver stays for the next one
                    ri += 1  # too little room left here: the next receiver
                    continue
                helper = qr not in load
                if helper:
                    si = helper_slot(qr, k)
                else:
                    si = at[qr]
                step_ex.append(Ex(k, seq, o, oi, qr, si, cursor, end, helper))
                seq += 1
                shifted[o] += cm.kv_shift(o, ins) - msg
                new[o] += kvt
                served = ins._replace(kind=kv_kind(phase, "helper" if helper else "partner"), peer=o)
                if helper:
                    new[qr] += kvt + cm.help_time(qr, served)
                else:
                    shifted[qr] = shifted.get(qr, 0.0) - cm.kv_shift(qr, served) - msg
                    new[qr] += kvt
                cursor = end
                need -= moved
                room[ri] -= moved
                if room[ri] <= 1e-12 * top:
                    ri += 1
        if not step_ex:
            continue
        worst = 0.0
        for r, d in new.items():
            if r in load:
                u = ranks[r][at[r]]
                d = d - load[r] + cm.unit_time(r, u, -shifted[r])
            worst = max(worst, d)
        if worst < top:
            out.extend(_in_rounds(step_ex))
    return out


def _in_rounds(step_ex: list[Ex]) -> list[Ex]:
    """The exchanges of one step reordered into rounds where each rank meets at most one peer
    (a greedy edge colouring): rendezvous of one round happen side by side, so the chain of
    rendezvous a rank waits through is as long as the rounds, not as the step's exchanges."""
    used: dict[int, set[int]] = {}
    keyed = []
    for e in step_ex:
        a, b = used.setdefault(e.owner, set()), used.setdefault(e.server, set())
        rnd = 0
        while rnd in a or rnd in b:
            rnd += 1
        a.add(rnd)
        b.add(rnd)
        keyed.append((rnd, e.seq, e))
    keyed.sort(key=lambda t: (t[0], t[1]))
    seqs = sorted(e.seq for e in step_ex)
    return [e._replace(seq=q) for q, (_r, _s, e) in zip(seqs, keyed)]


def could_level(plan: Plan, cm) -> bool:
    """False when no step can gain: the longest unit shape is below the rendezvous floor that
    level_steps asks a step's spread to exceed (a toy model whose units take microseconds)."""
    spec = plan.spec
    floor = 4 * cm.prof.p2p_latency * max(spec.stage_layers)
    last = spec.num_stages - 1
    # stages that differ in cost: one per layer count, and the last (LM head and loss)
    kinds = {spec.stage_layers[st]: st for st in range(last)}
    stages = list(kinds.values()) + [last]
    for lens in set(spec.slice_lens):
        for j, s in enumerate(lens):
            for stage in stages:
                if cm.unit_time_of(stage, s, lens[:j], True) >= floor:
                    return True
    return False


def _candidates(plan: Plan, cm) -> tuple[list[Ex], list[list[Ex]]]:
    """(the unit-cost pairing, the levelled exchange sets worth trying (none if nothing levels))."""
    level = could_level(plan, cm)
    weights = [UNIT_WEIGHTS, ALT_WEIGHTS] + ([STEP_WEIGHTS] if level else [])
    times = start_times(plan, weights, by_start=not level)
    if times is None:
        return [], []
    unit = _as_ex(plan, pairings(plan, [(r, i, t[:2]) for r, i, t in times] if level else times))
    levelled = []
    if level:
        steps = [(r, i, int(t[2])) for r, i, t in times]
        for helpers in (True, False):
            exs = level_steps(plan, cm, helpers=helpers, steps=steps)
            if exs and exs not in levelled:
                levelled.append(exs)
    return unit, levelled


def cost_pairings(plan: Plan, profile="h100", dtype_bytes: int | None = None) -> list[list[Ex]]:
    """Candidate exchange sets under the cost model, best (shortest timed makespan) first: the
    levelled sets (with helpers, without), the unit-cost pairing and the empty set. Candidates
    whose timed replay deadlocks are left out. `dtype_bytes` None: the profile's (CostModel's
    default), as redistribute prices them."""
    from .costs import CostModel, load_profile

    cm = CostModel(plan.spec, load_profile(profile), dtype_bytes, plan=plan)
    unit, levelled = _candidates(plan, cm)
    return [exs for _m, exs, _plan in _ranked(plan, cm, levelled + [unit, []])]


def _ranked(plan: Plan, cm, cands: list[list[Ex]]):
    """(timed makespan, exchanges, plan) of each candidate that does not deadlock, best first
    (ties: fewer exchanges)."""
    from .costs import timed_replay

    out, seen = [], set()
    for exs in cands:
        key = tuple(exs)
        if key in seen:
            continue
        seen.add(key)
        cand = _with_exchanges(plan, exs)
        res, _ = timed_replay(cand, cm)
        if not res.deadlocked:
            out.append((res.makespan, exs, cand))
    out.sort(key=lambda e: (e[0], len(e[1])))
    return out


_DEFAULT = "h100"


def redistribute(plan: Plan, profile=_DEFAULT, keep_pairing: bool = True) -> Plan:
    """Plan -> Plan with KV exchanges inserted before the units they serve; spec.exchange=True.

    `profile`: a DeviceProfile or a built-in profile name levels with the cost model (default
    "h100"); None pairs by the unit-cost replays (the original rule). The input must carry no KV
    instructions (run it once, after communication lowering). The result passes passes.check
    whenever the input does.

    Where levelling can gain (could_level), the levelled sets (if level_steps finds any), the
    unit-cost pairing and no exchange at all compete on the timed replay and the shortest wins:
    never slower than no exchange in the cost model. Where it cannot (a toy model), `keep_pairing`
    (the user asked for the exchange: the CLI's explicit --exchange) keeps the unit-cost pairing
    whatever its timed replay says; keep_pairing=False (the CLI's default-on exchange) lets it
    compete with no exchange there too. Deadlock freedom: a
    timed replay that finishes proves it (whether a rank can move never depends on durations),
    and the unit-cost pairing has it by construction (paired units start together in the
    unit-cost replay); the exchange rules are checked on the chosen plan (validate_kv: the
    rest of the plan is the input's, untouched)."""
    if not all(KV.isdisjoint(map(itemgetter(0), s)) for s in plan.ranks):  # any KV instruction (C-level scan)
        raise ValueError("plan already has KV exchanges; redistribute runs once on a plan without them")
    from .validate import validate_kv as validate

    if profile is None:
        return _with_exchanges(plan, _as_ex(plan, pairings(plan)))
    from .costs import CostModel, load_profile

    cm = CostModel(plan.spec, load_profile(profile), plan=plan)  # messages in the profile's dtype
    unit, levelled = _candidates(plan, cm)
    if keep_pairing and not levelled and not could_level(plan, cm):  # a toy model: the user asked for the exchange
        out = _with_exchanges(plan, unit)
        return out if not unit or not validate(out, 1) else _with_exchanges(plan, [])
    for _m, exs, out in _ranked(plan, cm, levelled + [unit, []]):
        if not exs or not validate(out, 1):
            return out
    return _with_exchanges(plan, [])
