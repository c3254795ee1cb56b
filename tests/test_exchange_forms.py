"""The exchange forms of issue 13 on a hand-built plan: several partners per unit, token ranges,
idle-rank helpers; their text form, the checker's rules, and how the replay prices them."""
import pytest

import ir
from compiler import build_spec, resolve_model, schedules
from ir import Instr, Kind, Plan, PlanFormatError
from passes import check, lower_comm, replay
from passes.validate import validate
from passes.exchange import Ex, _with_exchanges, lockstep_steps

TINY = resolve_model("tiny")


def base():
    """slimpipe p=4 m=1 n=4, 64 tokens (slices of 16), lowered, no exchange. Lockstep step 4:
    rank 1 runs F s3 (#10), rank 2 F s2 (#7), rank 3 F s1 (#3); rank 0 is idle (its next unit,
    B s3 at #9, is fed by the RECV_GRAD at #8)."""
    spec = build_spec("slimpipe", TINY, pp=4, microbatches=1, slices=4, seq_len=64)
    return lower_comm(Plan(spec, tuple(tuple(o) for o in schedules.get("slimpipe").generate(spec)), {}))


EXS = [
    Ex(4, 0, 1, 10, 3, 3, 0, 16),                 # rank 1's F s3: tokens 0..15 to rank 3 (its own F s1)
    Ex(4, 1, 1, 10, 0, 8, 16, 40, helper=True),   # ... and 16..39 (not a slice boundary) to idle rank 0
    Ex(4, 2, 2, 7, 0, 8, 0, 20, helper=True),     # rank 2's F s2: tokens 0..19 to rank 0 as well
]


def test_step_four_is_as_described():
    plan = base()
    step = {(r, i): k for r, i, k in lockstep_steps(plan)}
    assert {(r, str(plan.ranks[r][i])) for (r, i), k in step.items() if k == 4} == {
        (1, "F mb0 s3 c0"), (2, "F mb0 s2 c0"), (3, "F mb0 s1 c0")}
    assert str(plan.ranks[0][8]) == "RECV_GRAD mb0 s3 c0 from1 t25"


def test_several_partners_token_ranges_and_helpers_check():
    plan = _with_exchanges(base(), EXS)
    assert check(plan).ok, check(plan).problems
    r1 = [str(i) for i in plan.ranks[1][10:13]]
    assert r1[0].startswith("KVF_SEND mb0 s3 c0 to3 lo0 hi16") and r1[1].startswith("KVF_SEND mb0 s3 c0 to0 lo16 hi40")
    assert r1[2] == "F mb0 s3 c0"
    r0 = [i.kind for i in plan.ranks[0][8:11]]
    assert r0 == [Kind.KVF_HELP, Kind.KVF_HELP, Kind.RECV_GRAD]  # before the receive that feeds its next unit
    assert plan.meta["exchanges"] == 3 and plan.meta["exchange_helpers"] == 2
    # the text form round-trips through JSON
    assert ir.loads(ir.dumps(plan)).ranks == plan.ranks


def test_text_form():
    t = "KVB_HELP mb3 s5 c1 from0 lo128 hi4096 t9"
    ins = ir.parse(t)
    assert (ins.kind, ins.peer, ins.lo, ins.hi, ins.tag) == (Kind.KVB_HELP, 0, 128, 4096, 9)
    assert ir.to_text(ins) == t
    assert ir.parse("KVF_SEND hi8 lo2 t4 mb0 s1 c0 to3") == Instr(Kind.KVF_SEND, 0, 1, 0, 3, 4, 2, 8)
    with pytest.raises(PlanFormatError, match="takes no 'x'|bad token"):
        ir.parse("KVF_SEND mb0 s1 c0 to3 x1 t4")
    with pytest.raises(PlanFormatError, match="missing"):
        ir.parse("KVF_HELP mb0 s1 c0 from3 lo0 t4")


def rules(plan):
    return {p.rule for p in check(plan).problems}


def mutated(fn):
    plan = _with_exchanges(base(), EXS)
    ranks = [list(s) for s in plan.ranks]
    fn(ranks)
    return plan.with_ranks(ranks)


def _set(ranks, r, i, **kw):
    ranks[r][i] = ranks[r][i]._replace(**kw)


def test_overlapping_ranges_are_refused():
    # rank 1's second range starts inside its first: both sides agree, the owner's ranges overlap
    def f(ranks):
        _set(ranks, 1, 11, lo=8)
        _set(ranks, 0, 8, lo=8)
    probs = check(mutated(f)).problems
    assert {p.rule for p in probs} == {"kv"} and "disjoint" in probs[0].message


@pytest.mark.parametrize("lo,hi", [(0, 49), (20, 20), (30, 10)])
def test_range_outside_the_prefix_is_refused(lo, hi):
    # F s3's prefix is 48 tokens; an empty or reversed range ships nothing
    def f(ranks):
        _set(ranks, 1, 11, lo=lo, hi=hi)
        _set(ranks, 0, 8, lo=lo, hi=hi)
    assert rules(mutated(f)) == {"range"}


def test_sides_must_agree_on_the_range_and_direction():
    assert rules(mutated(lambda ranks: _set(ranks, 0, 8, hi=39))) == {"kv"}
    got = rules(mutated(lambda ranks: _set(ranks, 0, 8, kind=Kind.KVB_HELP)))
    assert "kv" in got and got <= {"kv", "p2p-order"}  # the per-pair order rule sees the kinds part too


def test_partner_needs_a_unit_a_helper_does_not():
    # structurally, a helper may stand last in its stream; a partner there has nothing to serve beside
    plan = _with_exchanges(base(), [Ex(4, 0, 2, 7, 0, len(base().ranks[0]), 0, 20, helper=True)])
    assert plan.ranks[0][-1].kind == Kind.KVF_HELP
    assert validate(plan) == []
    ranks = [list(s) for s in plan.ranks]
    _set(ranks, 0, len(ranks[0]) - 1, kind=Kind.KVF_RECV)
    probs = validate(plan.with_ranks(ranks))
    assert [p.rule for p in probs] == ["kv"] and "no compute unit follows" in probs[0].message


def test_inconsistent_rendezvous_order_deadlocks_with_a_cycle():
    # ranks 1 and 2 each ship to ranks 0 and 3; listed in opposite orders the rendezvous wait in a ring
    exs = [Ex(4, 0, 1, 10, 0, 8, 0, 16, helper=True), Ex(4, 1, 1, 10, 3, 3, 16, 32),
           Ex(4, 2, 2, 7, 3, 3, 0, 16), Ex(4, 3, 2, 7, 0, 8, 16, 32, helper=True)]
    good = _with_exchanges(base(), exs)
    assert check(good).ok  # one global order: no cycle

    def swap(ranks, r, i):
        ranks[r][i], ranks[r][i + 1] = ranks[r][i + 1], ranks[r][i]
    ranks = [list(s) for s in good.ranks]
    swap(ranks, 0, 8)  # rank 0 now waits for rank 2, which waits for 3, which waits for 1, which waits for 0
    rep = check(good.with_ranks(ranks))
    assert [p.rule for p in rep.problems] == ["deadlock"] and "wait cycle" in rep.problems[0].message


def test_replay_prices_helpers_as_their_own_queued_work():
    plan = _with_exchanges(base(), EXS)
    res = replay(plan, cost=lambda r, ins: 1.0, record=True,
                 help_cost=lambda r, ins: (ins.hi - ins.lo) / 8)  # 24 tokens: 3.0, 20 tokens: 2.5
    assert not res.deadlocked
    helps = sorted(res.helps)
    assert [(r, round(t1 - t0, 6)) for r, _i, t0, t1 in helps] == [(0, 3.0), (0, 2.5)]
    (_, _, a0, a1), (_, _, b0, b1) = helps
    assert b0 == pytest.approx(a1)  # one block after the other on the helper
    base_busy = replay(base(), cost=lambda r, ins: 1.0).busy
    assert res.busy[0] == pytest.approx(base_busy[0] + 5.5)  # helper work is busy time of its own
    assert res.busy[1:] == pytest.approx(base_busy[1:])      # nothing added to the others' units
