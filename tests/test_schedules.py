"""Every family, on a hypothesis grid: unit-cost figures equal the closed forms, and every
generated plan satisfies the validation rules (checked here independently of passes.validate)."""
from collections import Counter

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from compiler import build_spec, compile_plan, resolve_model, schedules
from compiler.schedules.closed_forms import closed_form_bubble as bubble
from compiler.schedules.closed_forms import closed_form_peak_units as rank0_peak
from ir import Kind
from passes import check, simulate_units

FAMILIES = list(schedules.FAMILIES)
MODEL = resolve_model("tiny", {"layers": 128})


def allowed(s: str, p: int, m: int, n: int, v: int) -> bool:
    """Where the family accepts the sizes and its record says the closed forms hold."""
    fam = schedules.get(s)
    return fam.accepts(p, m, n, v) and fam.exact(p, m, n, v)


def compile_sizes(s, p, m, n, v):
    return compile_plan(build_spec(s, MODEL, pp=p, microbatches=m, slices=n, virtual_stages=v, seq_len=n * 2))


def assert_rules(plan):
    """The issue's validation rules, restated naively."""
    spec = plan.spec
    owner = spec.stage_rank()
    for r, stream in enumerate(plan.ranks):
        pos, weight = {}, {}
        for i, ins in enumerate(stream):
            if ins.kind in (Kind.F, Kind.B, Kind.I):  # a split backward's I obeys B's rules
                key = (Kind.B if ins.kind == Kind.I else ins.kind, ins.mb, ins.slice, ins.chunk)
                assert key not in pos, f"rank {r}: {key} twice"
                pos[key] = i
            elif ins.kind == Kind.W:
                assert (ins.mb, ins.slice, ins.chunk) not in weight
                weight[(ins.mb, ins.slice, ins.chunk)] = i
        split = any(ins.kind == Kind.I for ins in stream)
        if split:  # exactly one W per unit, after its I
            assert set(weight) == {(mb, j, c) for (k, mb, j, c) in pos if k == Kind.B}
            assert all(weight[(mb, j, c)] > i for (k, mb, j, c), i in pos.items() if k == Kind.B)
        expect = {(k, mb, j, c) for k in (Kind.F, Kind.B) for mb in range(spec.microbatches)
                  for j in range(spec.slices) for c in range(spec.virtual_stages)}
        assert set(pos) == expect, f"rank {r}: units differ from one F and one B per (mb, slice, chunk)"
        for (k, mb, j, c), i in pos.items():
            if k == Kind.F:
                assert pos[(Kind.B, mb, j, c)] > i, "backward after its forward"
                if j:
                    assert pos[(Kind.F, mb, j - 1, c)] < i, "forward slices ascend"
            elif j + 1 < spec.slices:
                assert pos[(Kind.B, mb, j + 1, c)] < i, "backward slices descend"
    sends, recvs = Counter(), Counter()
    for r, stream in enumerate(plan.ranks):
        for ins in stream:
            st_ = spec.placement[r][ins.chunk] if ins.chunk >= 0 else -1
            if ins.kind == Kind.SEND_ACT:
                sends[(r, ins.peer, ins.tag, "act", ins.mb, ins.slice, st_ + 1)] += 1
            elif ins.kind == Kind.RECV_ACT:
                recvs[(ins.peer, r, ins.tag, "act", ins.mb, ins.slice, st_)] += 1
            elif ins.kind == Kind.SEND_GRAD:
                sends[(r, ins.peer, ins.tag, "grad", ins.mb, ins.slice, st_ - 1)] += 1
            elif ins.kind == Kind.RECV_GRAD:
                recvs[(ins.peer, r, ins.tag, "grad", ins.mb, ins.slice, st_)] += 1
    assert sends == recvs, "every send has exactly one receive with the same data (hence shape)"
    assert all(c == 1 for c in sends.values())
    # one send per stage boundary that crosses ranks, none inside a rank
    crossings = sum(owner[s] != owner[s + 1] for s in range(spec.num_stages - 1))
    assert len(sends) == 2 * crossings * spec.microbatches * spec.slices


@st.composite
def sizes(draw, family):
    """Sizes the family accepts: drawn, then moved by the family record's fit."""
    p = draw(st.integers(1, 8))
    m = draw(st.integers(1, 16))
    n = draw(st.integers(1, 32))
    v = draw(st.integers(1, 4))
    return schedules.get(family).fitted(p, m, n, v)


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_unit_costs_match_closed_forms(family, data):
    p, m, n, v = data.draw(sizes(family))
    assume(allowed(family, p, m, n, v))
    plan = compile_sizes(family, p, m, n, v)
    assert check(plan).ok
    assert_rules(plan)
    sim = simulate_units(plan)
    assert abs(sim["bubble_fraction"] - bubble(family, p, m, n, v)) < 1e-9
    assert sim["ranks"][0]["peak_units"] == rank0_peak(family, p, m, n, v)
    # every rank is busy exactly 3 units per (mb, slice, chunk)
    assert all(r["busy"] == 3 * m * n * v for r in sim["ranks"])


@pytest.mark.parametrize("family,p,m,n,v,makespan,peaks", [
    ("1f1b", 4, 8, 1, 1, 33, [4, 3, 2, 1]),
    ("gpipe", 3, 2, 2, 1, 18, [4, 4, 4]),
    ("interleaved-1f1b", 2, 4, 1, 2, 27, [5, 3]),
    ("seq1f1b", 4, 2, 4, 1, 33, [7, 6, 5, 4]),
    ("slimpipe", 4, 2, 4, 1, 33, [8, 8, 6, 4]),  # T_r = 10, 8, 6, 4 capped at m*n*v = 8
    ("slimpipe", 4, 2, 4, 2, 57, [14, 12, 10, 8]),
    ("looped-bfs", 2, 2, 1, 2, 15, [4, 4]),
    # m not a multiple of p (issue 15.6): rounds of G >= p micro-batches, makespan 3 max(vm + p-1, m + vp-1),
    # rank r's peak min((v-1)G_0 + 2(p-r-1) + 1, m v), G_0 the first round
    ("interleaved-1f1b", 4, 10, 1, 2, 69, [12, 10, 8, 6]),   # rounds 5+5: 3(20+3)
    ("interleaved-1f1b", 4, 11, 1, 2, 75, [13, 11, 9, 7]),   # rounds 6+5: 3(22+3)
    ("interleaved-1f1b", 4, 9, 1, 3, 90, [17, 15, 13, 11]),  # rounds 5+4, v=3: 3(27+3)
    ("interleaved-1f1b", 2, 5, 1, 2, 33, [6, 4]),            # rounds 3+2: 3(10+1)
    ("interleaved-1f1b", 2, 3, 1, 2, 21, [6, 4]),            # one round of 3: 3(6+1)
    ("interleaved-1f1b", 4, 3, 1, 2, 30, [6, 6, 6, 4]),      # m < p: a pipeline of vp stages, 3(3+8-1)
    ("seq1f1b", 4, 3, 2, 2, 45, [12, 12, 10, 8]),            # ceil(p/n) = 2 does not divide 3: 3(2*6+3)
    ("seq1f1b", 3, 5, 2, 2, 66, [12, 10, 8]),                # rounds of 3+2 micro-batches: 3(2*10+2)
    ("seq1f1b", 4, 1, 2, 2, 27, [4, 4, 4, 4]),               # m n = 2 < p: 3(2+8-1)
])
def test_exact_figures(family, p, m, n, v, makespan, peaks):
    sim = simulate_units(compile_sizes(family, p, m, n, v))
    assert sim["makespan"] == makespan
    assert [r["peak_units"] for r in sim["ranks"]] == peaks


def test_slimpipe_inflight_rule_per_rank():
    """Rank r keeps n*v + 2(p-r-1) units in flight (when enough units exist)."""
    p, m, n, v = 4, 4, 8, 2
    sim = simulate_units(compile_sizes("slimpipe", p, m, n, v))
    assert [r["peak_units"] for r in sim["ranks"]] == [n * v + 2 * (p - r - 1) for r in range(p)]


def test_slimpipe_interleaved_cycle_order():
    """n=8, p=3: g = 4 (smallest divisor of 8 >= 3); each cycle runs 4 slices on chunk 0, then chunk 1."""
    plan = compile_sizes("slimpipe", 3, 1, 8, 2)
    fwd = [(i.slice, i.chunk) for i in plan.ranks[0] if i.kind == Kind.F]
    assert fwd == [(j, 0) for j in range(4)] + [(j, 1) for j in range(4)] + \
                  [(j, 0) for j in range(4, 8)] + [(j, 1) for j in range(4, 8)]
    bwd = [(i.slice, i.chunk) for i in plan.ranks[0] if i.kind == Kind.B]
    assert bwd == list(reversed(fwd))


def test_rounds_of_microbatches():
    """max(1, m div k) rounds, sizes within one of each other, the larger first."""
    from compiler.schedules.common import rounds
    assert rounds(8, 4) == [4, 4] and rounds(10, 4) == [5, 5] and rounds(11, 4) == [6, 5]
    assert rounds(9, 4) == [5, 4] and rounds(13, 4) == [5, 4, 4] and rounds(3, 4) == [3] and rounds(1, 4) == [1]


@pytest.mark.parametrize("family", ["interleaved-1f1b", "seq1f1b", "interleaved-zb"])
def test_interleaved_families_take_any_microbatch_count(family):
    """Every m >= 1 compiles with v > 1 (no refusal left for m)."""
    fam = schedules.get(family)
    n = 2 if fam.allows_slices else 1
    assert all(fam.accepts(p, m, n, 2) for p in range(1, 9) for m in range(1, 3 * p + 2))


def test_interleaved_megatron_mapping():
    """Forward unit u runs chunk (u mod pv) div p on micro-batch (u div pv)*p + u mod p."""
    p, v, m = 2, 2, 4
    plan = compile_sizes("interleaved-1f1b", p, m, 1, v)
    fwd = [(i.mb, i.chunk) for i in plan.ranks[1] if i.kind == Kind.F]
    assert fwd == [((u // (p * v)) * p + u % p, (u % (p * v)) // p) for u in range(m * v)]
