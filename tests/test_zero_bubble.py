"""Zero-bubble families (split backward): closed forms on a hypothesis grid, validity, and
torch's own ScheduleZBVZeroBubble / ScheduleInterleavedZeroBubble orders replayed with our
simulator next to ours (unit costs F = I = W = 1)."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compiler import build_spec, compile_plan, resolve_model, schedules
from ir import Instr, Plan, SpecError
from passes import check, lower_comm, simulate_units

MODEL = resolve_model("tiny", {"layers": 128})


def compile_sizes(fam, p, m, n, v):
    return compile_plan(build_spec(fam, MODEL, pp=p, microbatches=m, slices=n, virtual_stages=v, seq_len=2 * n))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=st.integers(1, 8), k=st.integers(0, 8))
def test_zb_h1_bubble_closed_form(p, k):
    """ZB-H1, F = I = W = 1, m >= p: bubble exactly (p-1)/(3m+p-1); rank-0 peak p (1F1B's)."""
    m = p + k
    plan = compile_sizes("zb-h1", p, m, 1, 1)
    assert check(plan).ok
    sim = simulate_units(plan)
    assert sim["makespan"] == 3 * m + p - 1
    assert abs(sim["bubble_fraction"] - (p - 1) / (3 * m + p - 1)) < 1e-12
    assert sim["ranks"][0]["peak_units"] == p == schedules.get("zb-h1").peak_units(p, m, 1, 1)
    assert all(r["busy"] == 3 * m for r in sim["ranks"])


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=st.integers(1, 7), k=st.integers(0, 8))
def test_zb_v_bubble_closed_form(p, k):
    """ZB-V (V placement, v = 2) where its record says the closed form is exact (m = p, or p <= 4
    and m >= p + 2): bubble (p-1)/(6m+p-1), rank-0 peak 2p chunk units (1F1B's peak activation)."""
    m = p + k
    if not schedules.get("zb-v").exact(p, m, 1, 2):
        m = p
    plan = compile_sizes("zb-v", p, m, 1, 2)
    assert check(plan).ok
    assert plan.spec.placement == tuple((r, 2 * p - 1 - r) for r in range(p))
    sim = simulate_units(plan)
    assert sim["makespan"] == 6 * m + p - 1
    assert sim["ranks"][0]["peak_units"] == min(2 * p, m + 1, 2 * m) == schedules.get("zb-v").peak_units(p, m, 1, 2)


@pytest.mark.parametrize("fam,v", [("zb-h1", 1), ("zb-v", 2), ("interleaved-zb", 2), ("interleaved-zb", 3)])
@pytest.mark.parametrize("p,m,n", [(2, 2, 2), (3, 4, 2), (4, 4, 4), (2, 3, 3)])
def test_sliced_zero_bubble_is_valid(fam, v, p, m, n):
    """Every family with slices: forward slices ascending, I descending, W after its I, no deadlock;
    and within p-1 + 2 units of the closed form's makespan."""
    plan = compile_sizes(fam, p, m, n, v)
    assert check(plan).ok
    sim = simulate_units(plan)
    assert sim["makespan"] <= 3 * v * m * n + p - 1 + 2 * (p - 1) + 2
    kinds = {i.kind for s in plan.ranks for i in s}
    assert {"I", "W"} <= kinds and "B" not in kinds


def test_zb_v_refuses_other_v_and_placements():
    with pytest.raises(SpecError, match="zb-v places 2 chunks per rank"):
        compile_sizes("zb-v", 2, 2, 1, 4)
    with pytest.raises(SpecError, match="--placement looping: zb-v takes v"):
        build_spec("zb-v", MODEL, pp=2, microbatches=2, virtual_stages=2, seq_len=8, placement="looping")
    with pytest.raises(SpecError, match="--placement plain: 1f1b takes looping"):
        build_spec("1f1b", MODEL, pp=2, microbatches=2, virtual_stages=2, seq_len=8, placement="plain")


def _torch_plan(schedule: str, p: int, m: int, v: int, placement):
    """torch's own order (get_schedule_ops), as our compute-only plan, lowered by our compiler."""
    from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops

    rows = get_schedule_ops(schedule, p, m, num_stages_per_rank=v)
    from compiler.layout import placement_of

    spec = build_spec("interleaved-zb", MODEL, pp=p, microbatches=m, virtual_stages=v, seq_len=8,
                      placement=placement_of(placement, p, v))
    where = {s: (r, c) for r, chunks in enumerate(spec.placement) for c, s in enumerate(chunks)}
    ranks = [[] for _ in range(p)]
    for r, row in enumerate(rows):
        for a in row:
            if a is None:
                continue
            rr, c = where[a.stage_index]
            assert rr == r
            kind = {"FORWARD": "F", "BACKWARD_INPUT": "I", "BACKWARD_WEIGHT": "W", "FULL_BACKWARD": "B"}[
                a.computation_type.name]
            ranks[r].append(Instr(kind, a.microbatch_index, 0, c))
    return lower_comm(Plan(spec, tuple(tuple(x) for x in ranks)))


@pytest.mark.parametrize("p,m", [(2, 2), (2, 4), (4, 4), (4, 8), (3, 6)])
def test_zb_v_not_slower_than_torch(p, m):
    theirs = _torch_plan("ZBVZeroBubble", p, m, 2, "v")
    ours = compile_sizes("zb-v", p, m, 1, 2)
    assert check(theirs).ok and check(ours).ok
    t, o = simulate_units(theirs), simulate_units(ours)
    assert o["makespan"] <= t["makespan"], (o["makespan"], t["makespan"])
    assert o["ranks"][0]["peak_units"] <= t["ranks"][0]["peak_units"]


@pytest.mark.parametrize("p,m,v", [(2, 4, 2), (4, 4, 2), (4, 8, 2), (2, 4, 3),
                                   (4, 10, 2), (2, 3, 2), (4, 5, 3), (3, 8, 2)])  # m % p != 0 (issue 15.6)
def test_interleaved_zb_not_slower_than_torch(p, m, v):
    theirs = _torch_plan("InterleavedZeroBubble", p, m, v, "looping")
    ours = compile_sizes("interleaved-zb", p, m, 1, v)
    assert check(theirs).ok and check(ours).ok
    t, o = simulate_units(theirs), simulate_units(ours)
    assert o["makespan"] <= t["makespan"], (o["makespan"], t["makespan"])
    assert o["ranks"][0]["peak_units"] <= t["ranks"][0]["peak_units"]


# ---------------------------------------------------------------- slimpipe --split-backward

def slimpipe_split(p, m, n, v, exchange=False):
    return compile_plan(build_spec("slimpipe", MODEL, pp=p, microbatches=m, slices=n, virtual_stages=v,
                                   seq_len=4 * n, exchange=exchange, split_backward=True))


# (p, m, n, v): unit-cost makespan with the split (F = I = W = 1), and fused (F = 1, B = 2). Derived by
# hand for (2, 2, 2, 1) (rank 1 ends its I at 9 and runs its four W from 9 to 13); fused slimpipe is
# 3vmn + 3(p-1); the split 3vmn + p-1 where (m-1)nv >= p-1, else more: m = 1 leaves no later
# micro-batch's W to fill the drain.
SPLIT_FIGURES = [
    ((2, 2, 2, 1), 13, 15),
    ((4, 4, 4, 1), 51, 57),
    ((4, 2, 4, 2), 51, 57),
    ((8, 4, 8, 1), 103, 117),
    ((4, 1, 4, 1), 18, 21),
    ((3, 2, 1, 1), 9, 12),
]


@pytest.mark.parametrize("sizes,split_ms,fused_ms", SPLIT_FIGURES)
def test_slimpipe_split_backward_figures(sizes, split_ms, fused_ms):
    p, m, n, v = sizes
    fused = compile_sizes("slimpipe", p, m, n, v)
    plan = slimpipe_split(p, m, n, v)
    assert check(plan).ok
    sim, sim_f = simulate_units(plan), simulate_units(fused)
    assert (sim["makespan"], sim_f["makespan"]) == (split_ms, fused_ms)
    assert sim["bubble_fraction"] == pytest.approx(1 - 3 * v * m * n / split_ms, abs=1e-12)
    assert all(r["busy"] == 3 * v * m * n for r in sim["ranks"])
    fam = schedules.get("slimpipe")
    exact = fam.split_exact(p, m, n, v)
    assert exact == (split_ms == 3 * v * m * n + p - 1)
    if exact:
        assert sim["bubble_fraction"] == pytest.approx(fam.split_bubble(p, m, n, v), abs=1e-12)
    # F and I keep SlimPipe's order: the fused order with B read as I, W dropped
    for s, sf in zip(plan.ranks, fused.ranks):
        mine = [(i.kind.replace("I", "B"), i.mb, i.slice, i.chunk) for i in s if i.kind in ("F", "I")]
        assert mine == [(i.kind, i.mb, i.slice, i.chunk) for i in sf if i.kind in ("F", "B")]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=st.integers(1, 8), m=st.integers(1, 12), n=st.sampled_from([1, 2, 3, 4, 6, 8, 12, 16]),
       v=st.integers(1, 3), exchange=st.booleans())
def test_slimpipe_split_backward_closed_form(p, m, n, v, exchange):
    """slimpipe --split-backward (with or without the KV exchange): valid and deadlock-free; makespan
    3vmn + p-1 exactly where (m-1)nv >= p-1, longer elsewhere; every rank's peak units in flight (F
    to W) is the fused order's rank-0 peak min(nv + 2(p-1), mnv); each W after its I."""
    if v > 1 and n < p:
        n = p if n % 2 else 2 * p  # interleaved slimpipe needs n >= p
    exchange = exchange and n > 1
    plan = slimpipe_split(p, m, n, v, exchange)
    assert check(plan).ok
    sim = simulate_units(plan)
    want = 3 * v * m * n + p - 1
    fam = schedules.get("slimpipe")
    if fam.split_exact(p, m, n, v):
        assert sim["makespan"] == want
    else:
        assert sim["makespan"] > want
    peak = fam.peak_units(p, m, n, v)
    assert [r["peak_units"] for r in sim["ranks"]] == [peak] * p
    kinds = {i.kind for s in plan.ranks for i in s}
    assert "B" not in kinds and {"I", "W"} <= kinds


def test_split_backward_refused_where_the_family_has_a_fused_backward():
    for fam in ("gpipe", "1f1b", "seq1f1b"):
        with pytest.raises(SpecError, match=f"--split-backward: {fam} runs a fused backward; the families that "
                                            "split it are slimpipe, zb-h1, zb-v, interleaved-zb"):
            compile_plan(build_spec(fam, MODEL, pp=2, microbatches=2, seq_len=8, split_backward=True))


@pytest.mark.parametrize("p,m,v,makespan", [(4, 10, 2, 63), (4, 9, 2, 57), (2, 3, 2, 19), (2, 5, 3, 46), (4, 5, 3, 48),
                                            (3, 4, 2, 26)])
def test_interleaved_zb_m_not_a_multiple_of_p(p, m, v, makespan):
    """Any m >= p at p <= 4: the zero-bubble closed form 3vm + p - 1 (torch has no order for m = 9,
    5 at these p), rank-0 peak v p chunk units."""
    plan = compile_sizes("interleaved-zb", p, m, 1, v)
    assert check(plan).ok
    sim = simulate_units(plan)
    assert sim["makespan"] == makespan == 3 * v * m + p - 1
    assert sim["ranks"][0]["peak_units"] == v * p


@pytest.mark.parametrize("p,m,v,makespan", [(4, 2, 2, 19), (4, 3, 2, 23), (4, 3, 3, 33), (3, 2, 2, 16), (8, 4, 2, 39),
                                            (8, 6, 2, 47)])
def test_interleaved_zb_fewer_microbatches_than_ranks_is_torchs_makespan(p, m, v, makespan):
    """m < p (n = 1): the ready input gradient goes first; the makespan and every rank's peak equal
    torch's ScheduleInterleavedZeroBubble order's (F first took 1 to 3 units more)."""
    theirs = _torch_plan("InterleavedZeroBubble", p, m, v, "looping")
    ours = compile_sizes("interleaved-zb", p, m, 1, v)
    assert check(ours).ok
    t, o = simulate_units(theirs), simulate_units(ours)
    assert o["makespan"] == t["makespan"] == makespan
    assert [r["peak_units"] for r in o["ranks"]] == [r["peak_units"] for r in t["ranks"]] == [m * v] * p


@pytest.mark.parametrize("limit, stuck_at", [(0, 0), (1, 4)])
def test_greedy_order_stops_where_every_rank_waits(limit, stuck_at):
    """Limits no order can meet end the list scheduler at the unit time where no rank runs or can
    start anything (it used to run on to a guard of 4 x units x p steps, which made tune spend
    minutes on one large interleaved-zb candidate while its --time-limit had passed): limit 0 lets
    no forward start at all; limit 1 lets slice 0 of micro-batch 0 through the 4 stages (ending at
    time 4), where the last stage's I of slice 0 waits for slice 1's, which no rank may start."""
    from compiler.schedules.zero_bubble import greedy_order

    spec = build_spec("zb-h1", resolve_model("tiny"), pp=4, microbatches=8, slices=2, seq_len=64)
    with pytest.raises(SpecError, match=rf"every rank waits on another from unit time {stuck_at}\)"):
        greedy_order(spec, [limit] * 4, [limit] * 4)
