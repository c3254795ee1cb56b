"""The fast paths that `check` and `simulate --unit-costs` take on large plans give what the
general code gives: replay's unit-cost loop against the general loop (clocks, busy time, and for a
plan that deadlocks the same stuck ranks and wait cycle), on compiled plans of every family, with
KV exchanges and helpers, and on mutants (instructions swapped, dropped, sent twice)."""
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compiler import build_spec, compile_plan, resolve_model, schedules
import ir
from ir import KV, RECVS, SENDS, UNIT_COST, Instr, Kind, Plan, PlanFormatError
from passes import replay
from passes.exchange import Ex, _with_exchanges

TINY = resolve_model("tiny")
FAMILIES = ["gpipe", "1f1b", "interleaved-1f1b", "looped-bfs", "seq1f1b", "slimpipe", "zb-h1", "zb-v"]


def general(plan):
    """replay's general loop: a cost function that is not the default one takes it."""
    return replay(plan, lambda r, ins: UNIT_COST[ins.kind])


def same(plan):
    a, b = replay(plan), general(plan)
    assert (a.clock, a.busy, a.cycle) == (b.clock, b.busy, b.cycle)
    assert [(s.rank, s.index, s.instr, s.peer) for s in a.stuck] == [(s.rank, s.index, s.instr, s.peer) for s in b.stuck]
    return a


def compiled(fam, p, m, n, v, exchange):
    family = schedules.get(fam)
    v = family.default_virtual if fam == "zb-v" else (v if family.allows_virtual else 1)
    n = n if family.allows_slices else 1
    if fam == "interleaved-1f1b":
        v, m = 2, p
    if fam == "slimpipe" and v > 1:
        n = max(n, p)
    if fam == "seq1f1b" and v > 1:
        v = 1
    model = TINY.model_copy(update={"layers": max(p * v, 8)})
    spec = build_spec(fam, model, pp=p, microbatches=m, slices=n, virtual_stages=v, seq_len=16 * n,
                      exchange=exchange and fam == "slimpipe" and n > 1)
    return compile_plan(spec)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(FAMILIES), st.integers(2, 4), st.integers(1, 4), st.sampled_from([1, 2, 4]), st.integers(1, 2),
       st.booleans(), st.integers(0, 2**32 - 1))
def test_unit_replay_is_the_general_replay(fam, p, m, n, v, exchange, seed):
    plan = compiled(fam, p, m, n, v, exchange)
    assert not same(plan).deadlocked
    rng = random.Random(seed)
    ranks = [list(s) for s in plan.ranks]
    r = rng.randrange(p)
    s = ranks[r]
    kv = [(q, k) for q, st_ in enumerate(ranks) for k, ins in enumerate(st_) if ins.kind in KV]
    what = rng.choice(["swap", "drop", "resend", "move"] + ["kv-move"] * bool(kv))
    i, j = sorted(rng.sample(range(len(s)), 2))
    if what == "swap":
        s[i], s[j] = s[j], s[i]
    elif what == "drop":
        del s[i]
    elif what == "resend":  # a message sent and received twice under one (src, dst, tag): matched in order
        sends = [(k, ins) for k, ins in enumerate(s) if ins.kind in SENDS]
        if sends:
            k, ins = rng.choice(sends)
            peer = ranks[ins.peer]
            ri = next(x for x, o in enumerate(peer) if o.kind in RECVS and (o.peer, o.tag) == (r, ins.tag))
            s.insert(rng.randrange(k, len(s) + 1), ins)
            peer.insert(rng.randrange(ri, len(peer) + 1), peer[ri])
    elif what == "kv-move":  # a rendezvous met later or earlier on one side: the other waits for it
        q, k = rng.choice(kv)
        st_ = ranks[q]
        st_.insert(max(0, min(len(st_), k + rng.choice([-1, 1]) * rng.randrange(2, 6))), st_.pop(k))
    else:
        s.insert(j, s.pop(i))
    same(Plan(plan.spec, tuple(map(tuple, ranks)), plan.meta))


def test_helpers_and_a_rendezvous_deadlock():
    """Hand-placed exchanges with helpers (tests/test_exchange_forms' step 4), and the ring of
    rendezvous of test_inconsistent_rendezvous_order_deadlocks_with_a_cycle, whose wait cycle must
    be named the same way."""
    from passes import lower_comm

    spec = build_spec("slimpipe", TINY, pp=4, microbatches=1, slices=4, seq_len=64)
    base = lower_comm(Plan(spec, tuple(tuple(o) for o in schedules.get("slimpipe").generate(spec)), {}))
    exs = [Ex(4, 0, 1, 10, 3, 3, 0, 16), Ex(4, 1, 1, 10, 0, 8, 16, 40, helper=True), Ex(4, 2, 2, 7, 0, 8, 0, 20, helper=True)]
    assert not same(_with_exchanges(base, exs)).deadlocked
    exs = [Ex(4, 0, 1, 10, 0, 8, 0, 16, helper=True), Ex(4, 1, 1, 10, 3, 3, 16, 32),
           Ex(4, 2, 2, 7, 3, 3, 0, 16), Ex(4, 3, 2, 7, 0, 8, 16, 32, helper=True)]
    good = _with_exchanges(base, exs)
    assert not same(good).deadlocked
    r0 = list(good.ranks[0])
    r0[8], r0[9] = r0[9], r0[8]
    res = same(good.with_ranks((r0,) + good.ranks[1:]))
    assert res.deadlocked and res.cycle == [0, 2, 3, 1]


def test_rendezvous_meets_at_the_later_clock():
    """Rank 0 reaches the exchange after three units, rank 1 at once: both leave it at time 3,
    whichever the replay reaches first."""
    spec = compiled("1f1b", 2, 4, 1, 1, False).spec
    for a in (0, 1):  # a: the rank that computes first (the replay reaches rank 0 first)
        b = 1 - a
        first = (ir.F(0, 0, 0), ir.F(1, 0, 0), ir.F(2, 0, 0), Instr(Kind.KVF_SEND, 3, 0, 0, b, 99, 0, 1), ir.F(3, 0, 0))
        other = (Instr(Kind.KVF_RECV, 3, 0, 0, a, 99, 0, 1), ir.B(0, 0, 0))
        res = same(Plan(spec, (first, other) if a == 0 else (other, first), {}))
        assert res.clock[a] == 4.0 and res.clock[b] == 5.0


def test_unknown_kind_raises_in_both():
    plan = compiled("1f1b", 2, 2, 1, 1, False)
    bad = Plan(plan.spec, ((Instr("JUMP"),) + plan.ranks[0],) + plan.ranks[1:], plan.meta)
    msgs = []
    for fn in (replay, general):
        with pytest.raises(PlanFormatError, match="unknown instruction kind 'JUMP'") as e:
            fn(bad)
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(FAMILIES), st.integers(2, 4), st.integers(1, 4), st.sampled_from([1, 2, 4]), st.integers(1, 2),
       st.booleans(), st.integers(0, 2**32 - 1))
def test_start_times_are_the_replays(fam, p, m, n, v, resend, seed):
    """start_times (the exchange pass's replay under several unit costs at once) gives each
    compute unit the start that replay gives it under each weighting, also where one
    (src, dst, tag) carries two messages."""
    from passes.exchange import ALT_WEIGHTS, UNIT_WEIGHTS
    from passes.replay import start_times

    plan = compiled(fam, p, m, n, v, False)
    ranks = [[ins for ins in s if ins.kind != Kind.OPT] for s in plan.ranks]
    if resend:
        rng = random.Random(seed)
        sends = [(r, k) for r, s in enumerate(ranks) for k, ins in enumerate(s) if ins.kind in SENDS]
        if sends:
            r, k = rng.choice(sends)
            ins = ranks[r][k]
            peer = ranks[ins.peer]
            ri = next(x for x, o in enumerate(peer) if o.kind in RECVS and (o.peer, o.tag) == (r, ins.tag))
            ranks[r].insert(k + 1, ins)
            peer.insert(ri + 1, peer[ri])
    plan = Plan(plan.spec, tuple(map(tuple, ranks)), plan.meta)
    weights = [UNIT_WEIGHTS, ALT_WEIGHTS]
    got = start_times(plan, weights)
    for w, weight in enumerate(weights):
        res = replay(plan, lambda r, ins: weight[ir.KINDS[ins.kind].cost], record=True)
        assert {(r, i): t[w] for r, i, t in got} == {(r, i): t0 for r, i, t0, _t1 in res.timeline}
    # by_start: the same units, grouped by (start under each weighting, kind), each group in replay order
    groups: dict = {}
    for r, i, t in got:
        groups.setdefault((*t, plan.ranks[r][i].kind), []).append((r, i))
    assert start_times(plan, weights, by_start=True) == groups


@pytest.mark.parametrize("fam,p,m,n,v", [("zb-v", 2, 4, 1, 2), ("zb-v", 3, 4, 2, 2), ("seq1f1b", 2, 3, 4, 2),
                                         ("interleaved-zb", 3, 8, 1, 3), ("slimpipe", 4, 4, 8, 2), ("1f1b", 3, 5, 1, 1)])
def test_order_receives_with_the_lowering_tables(fam, p, m, n, v, monkeypatch):
    """lower_comm hands order_receives the send/receive tags it noted while making the messages;
    order_receives gives the plan its own scan gives (plans where receives move and where none do)."""
    from compiler import schedule_plan
    from passes import lower

    seen = []
    real = lower.order_receives

    def both(plan, tables=None):
        out = real(plan, tables)
        assert tables is not None and out == real(plan)
        seen.append(out is not plan)
        return out

    monkeypatch.setattr(lower, "order_receives", both)
    model = TINY.model_copy(update={"layers": max(p * v, 8)})
    lower.lower_comm(schedule_plan(build_spec(fam, model, pp=p, microbatches=m, slices=n, virtual_stages=v, seq_len=16 * n)))
    assert seen == [fam in ("zb-v", "seq1f1b", "interleaved-zb")]
