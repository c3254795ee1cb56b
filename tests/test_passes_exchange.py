"""KV-exchange pass: pairing rules, instruction placement, and that the result still checks."""
import pytest

from compiler import build_spec, compile_plan, resolve_model
from ir import KV_OWNER, KV_PARTNER, Kind
from passes import check, replay, simulate_units
from passes.exchange import pairings, redistribute

TINY = resolve_model("tiny")


def plan_of(schedule="slimpipe", p=4, m=4, n=4, v=1, seq=128, **kw):
    return compile_plan(build_spec(schedule, TINY, pp=p, microbatches=m, slices=n, virtual_stages=v, seq_len=seq, **kw))


def kv_instrs(plan):
    return [(r, i, ins) for r, s in enumerate(plan.ranks) for i, ins in enumerate(s) if ins.kind in KV_OWNER | KV_PARTNER]


@pytest.mark.parametrize("p,m,n,v", [(4, 4, 4, 1), (4, 4, 4, 2), (4, 8, 8, 1), (2, 3, 6, 2), (8, 8, 16, 1)])
def test_slimpipe_exchange_checks_and_keeps_unit_makespan(p, m, n, v):
    base = plan_of(p=p, m=m, n=n, v=v, seq=16 * n)
    ex = plan_of(p=p, m=m, n=n, v=v, seq=16 * n, exchange=True)
    assert ex.spec.exchange and not base.spec.exchange
    assert check(ex).ok, check(ex).problems[:3]
    assert kv_instrs(ex)
    assert simulate_units(ex)["makespan"] == simulate_units(base)["makespan"]


def test_pairs_start_together_and_x_is_half_the_difference():
    plan = plan_of(p=8, m=8, n=16, seq=256)
    pairs = pairings(plan)
    assert pairs
    for costs in ({"F": 1.0, "B": 2.0}, {"F": 4.0, "B": 9.0}, {"F": 1.0, "B": 2.2}):
        res = replay(plan, cost=lambda r, ins, c=costs: c[ins.kind], record=True)
        start = {(r, i): t0 for r, i, t0, _ in res.timeline}
        for o, oi, q, qi, x in pairs:
            assert start[(o, oi)] == pytest.approx(start[(q, qi)])
    for o, oi, q, qi, x in pairs:
        a, b = plan.ranks[o][oi], plan.ranks[q][qi]
        assert a.kind == b.kind
        assert x == (a.slice - b.slice) // 2 >= 1


def test_mirror_pairing_example():
    # every step: sort the units by slice, pair mirror entries, x = floor(diff / 2)
    plan = plan_of(p=8, m=8, n=16, seq=256)
    res = replay(plan, record=True)
    alt = replay(plan, cost=lambda r, ins: 4.0 if ins.kind == "F" else 9.0, record=True)
    t_alt = {(r, i): t0 for r, i, t0, _ in alt.timeline}
    by_t = {}
    for r, i, t0, _ in res.timeline:
        by_t.setdefault((t0, t_alt[(r, i)], plan.ranks[r][i].kind), []).append(plan.ranks[r][i].slice)
    pairs = {(plan.ranks[o][oi].slice, plan.ranks[q][qi].slice, x) for o, oi, q, qi, x in pairings(plan)}
    for sl in by_t.values():
        s = sorted(sl)
        for a in range(len(s) // 2):
            lo, hi = s[a], s[-1 - a]
            if (hi - lo) // 2 >= 1:
                assert (hi, lo, (hi - lo) // 2) in pairs


def test_threshold_caps_x():
    plan = plan_of(p=8, m=8, n=16, seq=256, exchange=True, exchange_threshold=1)
    xs = {ins.x for _, _, ins in kv_instrs(plan)}
    assert xs == {1}
    assert check(plan).ok


def test_instruction_placement():
    plan = plan_of(p=4, m=4, n=8, seq=128, exchange=True)
    tags = set()
    for r, i, ins in kv_instrs(plan):
        nxt = plan.ranks[r][i + 1]
        assert nxt.kind in (Kind.F, Kind.B)
        if ins.kind in KV_OWNER:
            assert (nxt.mb, nxt.slice, nxt.chunk) == (ins.mb, ins.slice, ins.chunk)
            assert (nxt.kind == Kind.F) == (ins.kind == Kind.KVF_SEND)
            assert ins.tag not in tags
            tags.add(ins.tag)
    p2p = {ins.tag for s in plan.ranks for ins in s if ins.kind in ("SEND_ACT", "SEND_GRAD")}
    assert not tags & p2p


def test_no_exchange_without_slices_or_at_edges():
    plan = plan_of("1f1b", p=4, m=4, n=1, exchange=True)
    assert not kv_instrs(plan)
    one = plan_of(p=1, m=2, n=4, seq=64, exchange=True)  # a single rank: always idle partners
    assert not kv_instrs(one)


@pytest.mark.parametrize("sched,v", [("seq1f1b", 1), ("seq1f1b", 2), ("gpipe", 1), ("interleaved-1f1b", 2)])
def test_other_families_stay_valid(sched, v):
    n = 1 if sched in ("gpipe", "interleaved-1f1b") else 4
    plan = plan_of(sched, p=4, m=4, n=n, v=v, seq=128, exchange=True)
    assert check(plan).ok


def test_redistribute_runs_once():
    plan = plan_of(exchange=True)
    with pytest.raises(ValueError):
        redistribute(plan)
