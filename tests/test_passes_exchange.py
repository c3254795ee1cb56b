"""KV-exchange pass: pairing rules, instruction placement, and that the result still checks."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compiler import build_spec, compile_plan, resolve_model, schedules
from ir import KV, KV_HELPER, KV_OWNER, Kind, Plan
from passes import check, lower_comm, replay, simulate_timed, simulate_units
from passes.costs import load_profile
from passes.exchange import Ex, cost_pairings, lockstep_steps, pairings, redistribute

TINY = resolve_model("tiny")
L70 = resolve_model("llama-70b")


def plan_of(schedule="slimpipe", p=4, m=4, n=4, v=1, seq=128, **kw):
    return compile_plan(build_spec(schedule, TINY, pp=p, microbatches=m, slices=n, virtual_stages=v, seq_len=seq, **kw))


def lowered(schedule="slimpipe", model=TINY, p=4, m=4, n=4, v=1, seq=128, **kw):
    """The plan compile_plan hands to the exchange pass (lowered, no KV, no OPT)."""
    spec = build_spec(schedule, model, pp=p, microbatches=m, slices=n, virtual_stages=v, seq_len=seq, **kw)
    return lower_comm(Plan(spec, tuple(tuple(o) for o in schedules.get(schedule).generate(spec)), {}))


def kv_instrs(plan):
    return [(r, i, ins) for r, s in enumerate(plan.ranks) for i, ins in enumerate(s) if ins.kind in KV]


@pytest.mark.parametrize("p,m,n,v", [(4, 4, 4, 1), (4, 4, 4, 2), (4, 8, 8, 1), (2, 3, 6, 2), (8, 8, 16, 1)])
def test_slimpipe_exchange_checks_and_keeps_unit_makespan(p, m, n, v):
    base = plan_of(p=p, m=m, n=n, v=v, seq=16 * n)
    ex = plan_of(p=p, m=m, n=n, v=v, seq=16 * n, exchange=True)
    assert ex.spec.exchange and not base.spec.exchange
    assert check(ex).ok, check(ex).problems[:3]
    assert kv_instrs(ex)
    # the unit-cost pairing adds no wait to the unit-cost replay
    unit = redistribute(lowered(p=p, m=m, n=n, v=v, seq=16 * n, exchange=True), profile=None)
    assert check(unit).ok and kv_instrs(unit)
    assert simulate_units(unit)["makespan"] == simulate_units(base)["makespan"]


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
    # the unit-cost pairing ships whole slices from the prefix start: one slice = 16 tokens here
    assert {(ins.lo, ins.hi) for _, _, ins in kv_instrs(plan)} == {(0, 16)}
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


# ---------------------------------------------------------------- cost-aware pairing

@st.composite
def exchanging(draw):
    fam = draw(st.sampled_from(["gpipe", "looped-bfs", "seq1f1b", "slimpipe"]))
    p = draw(st.integers(2, 4))
    family = schedules.get(fam)
    v = draw(st.integers(1, 2)) if family.allows_virtual else 1
    n = draw(st.sampled_from([2, 4, 8]))
    if fam == "slimpipe" and v > 1:
        n = draw(st.sampled_from([4, 8]))
    m = draw(st.integers(1, 4))
    if fam == "seq1f1b" and v > 1:
        m = -(-p // n) * draw(st.integers(1, 2))
    if fam == "looped-bfs":
        m = max(m, p)
    big = draw(st.booleans())  # a model whose attention imbalance is worth exchanging, or a toy one
    model = (L70.model_copy(update={"layers": 8 * p * v}) if big else TINY.model_copy(update={"layers": max(8, p * v)}))
    seq = draw(st.sampled_from([32768, 131072])) if big else 16 * n
    thr = draw(st.sampled_from([0, 0, 1, 2]))
    return lowered(fam, model, p=p, m=m, n=n, v=v, seq=seq, exchange=True, exchange_threshold=thr, tp=8 if big else 1)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(exchanging(), st.sampled_from(["h100", "a100"]))
def test_cost_aware_result_always_checks(plan, prof):
    out = redistribute(plan, prof)
    rep = check(out)
    assert rep.ok, rep.problems[:3]
    assert out.spec.exchange and out.meta["exchanges"] == len(kv_instrs(out)) // 2
    thr = plan.spec.exchange_threshold
    for _r, _i, ins in kv_instrs(out):
        off = out.spec.slice_offsets(ins.mb)
        assert 0 <= ins.lo < ins.hi <= off[ins.slice] and (not thr or thr >= len(off) or ins.hi - ins.lo <= off[thr])
    # never slower under the cost model than the unit-cost pairing it competes with
    unit = redistribute(plan, None)
    dev = load_profile(prof)
    assert simulate_timed(out, dev)["step_s"] <= simulate_timed(unit, dev)["step_s"] * (1 + 1e-9)


def test_no_exchange_when_nothing_levels_and_pairing_is_slower():
    """llama-7b 4K, slimpipe p=4 m=8 n=4 on h100: levelling finds no step to level, and the unit-cost
    pairing (10 exchanges) times 610.2 ms against 604.1 ms without: the pass keeps none. (It kept the
    pairing untimed, so compiling with the exchange gave a slower plan.)"""
    L7 = resolve_model("llama-7b")
    plan = lowered(model=L7, p=4, m=8, n=4, seq=4096, exchange=True)
    h100 = load_profile("h100")
    unit = redistribute(plan, None)
    assert len(kv_instrs(unit)) == 20
    assert simulate_timed(unit, h100)["step_s"] == pytest.approx(0.6102, abs=1e-4)
    out = redistribute(plan, "h100")
    assert out.spec.exchange and out.meta["exchanges"] == 0 and not kv_instrs(out)
    assert simulate_timed(out, h100)["step_s"] == pytest.approx(0.6041, abs=1e-4)


def test_a_default_exchange_on_a_toy_model_is_kept_only_when_asked_for(tmp_path, capsys):
    """tiny, seq 256, slimpipe p=4 m=4 n=8 on h100: units of microseconds, nothing levels, and the
    unit-cost pairing (18 exchanges) times 660.1 us against 263.1 us without. The CLI's default-on
    exchange lets the cost model drop it (the plan was 2.5x slower by default); an explicit
    --exchange, like compile_plan's default keep_pairing, keeps the pairing the user asked for."""
    import json

    from compiler.cli import main

    base = ["compile", "--schedule", "slimpipe", "--pp", "4", "--microbatches", "4", "--slices", "8",
            "--model", "tiny", "--seq-len", "256"]
    default, asked = str(tmp_path / "default.json"), str(tmp_path / "asked.json")
    assert main(base + ["-o", default]) == 0
    assert capsys.readouterr().out.strip().endswith(
        "644 instructions, 0 KV exchanges (none is faster on h100 in the cost model)")
    assert main(base + ["--exchange", "-o", asked]) == 0
    assert capsys.readouterr().out.strip().endswith("680 instructions, 18 KV exchanges")
    steps = []
    for path in (default, asked):
        assert main(["simulate", path, "--json"]) == 0
        steps.append(json.loads(capsys.readouterr().out)["step_s"])
    assert steps == [pytest.approx(263.1e-6, abs=1e-7), pytest.approx(660.1e-6, abs=1e-7)]
    spec = build_spec("slimpipe", resolve_model("tiny"), pp=4, microbatches=4, slices=8, seq_len=256, exchange=True)
    assert compile_plan(spec).meta["exchanges"] == 18  # the Python API keeps the pairing (keep_pairing=True)
    assert compile_plan(spec, keep_pairing=False).meta["exchanges"] == 0


def test_levelled_exchanges_share_a_lockstep_step():
    plan = lowered(model=L70, p=8, m=4, n=32, seq=524288, tp=8, exchange=True)
    best = cost_pairings(plan)[0]
    assert best and best[0].__class__ is Ex
    step = {(r, i): k for r, i, k in lockstep_steps(plan)}
    busy = {}
    for (r, i), k in step.items():
        busy.setdefault(k, set()).add(r)
    kinds, partners, helpers = set(), {}, 0
    for e in best:
        assert e.owner != e.server and step[(e.owner, e.oi)] == e.step
        u = plan.ranks[e.owner][e.oi]
        assert 0 <= e.lo < e.hi <= plan.spec.slice_offsets(u.mb)[u.slice]
        if e.helper:  # a helper has no unit of its own in that step
            helpers += 1
            assert e.server not in busy[e.step]
        else:
            assert step[(e.server, e.si)] == e.step
            kinds.add((u.kind, plan.ranks[e.server][e.si].kind))
        partners.setdefault((e.owner, e.oi), []).append((e.lo, e.hi))
    assert ("B", "F") in kinds  # steady-state checkerboard: a backward owner, a forward partner
    assert helpers > 0
    # several partners per unit, their ranges disjoint; token ranges, not only slice boundaries
    assert max(len(v) for v in partners.values()) >= 3
    for ranges in partners.values():
        ranges.sort()
        assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))
    bounds = set(plan.spec.slice_offsets(0))
    assert any(e.hi not in bounds for e in best)


def test_levelled_plan_runs_as_the_replay_promises():
    # the chosen plan's rendezvous and helper instructions, as the replay and checker see them
    plan = compile_plan(build_spec("slimpipe", L70, pp=8, microbatches=4, slices=32, seq_len=524288, tp=8,
                                   exchange=True))
    assert check(plan).ok
    helps = [ins for s in plan.ranks for ins in s if ins.kind in KV_HELPER]
    assert helps and plan.meta["exchange_helpers"] == len(helps)
    by_unit = {}
    for r, s in enumerate(plan.ranks):
        for i, ins in enumerate(s):
            if ins.kind in KV_OWNER:
                j = i
                while s[j].kind in KV:
                    j += 1
                by_unit.setdefault((r, j), []).append(ins)
    assert max(len(v) for v in by_unit.values()) >= 3


def test_redistribute_never_slower_than_none_or_unit_pairing():
    for m, v in ((1, 1), (4, 1), (4, 2)):
        kw = dict(model=L70, p=8, m=m, n=32, v=v, seq=524288, tp=8)
        base = lowered(**kw)
        none = simulate_timed(base)["step_s"]
        unit = simulate_timed(redistribute(lowered(exchange=True, **kw), None))["step_s"]
        best = simulate_timed(redistribute(lowered(exchange=True, **kw)))["step_s"]
        assert best <= min(none, unit)


# bubble fraction of llama-70b at 512K, p=8, n=32, tp=8 on h100 (bench/results/exchange.json)
BENCH = {  # (m, v): (none, unit-cost pairing, levelled)
    (1, 1): (0.2851, 0.1995, 0.0245),
    (4, 1): (0.1856, 0.1549, 0.0178),
    (1, 2): (0.2269, 0.1269, 0.0239),
    (4, 2): (0.1501, 0.1219, 0.0264),
}


@pytest.mark.parametrize("m,v", sorted(BENCH))
def test_bench_figures(m, v):
    none, unit, cost = BENCH[(m, v)]
    kw = dict(model=L70, p=8, m=m, n=32, v=v, seq=524288, tp=8)
    base = lowered(**kw)
    a = simulate_timed(base)
    b = simulate_timed(redistribute(lowered(exchange=True, **kw), None))
    c = simulate_timed(compile_plan(base.spec.model_copy(update={"exchange": True})))
    assert (a["bubble_fraction"], b["bubble_fraction"], c["bubble_fraction"]) == pytest.approx((none, unit, cost), abs=5e-4)
    assert c["step_s"] <= b["step_s"] < a["step_s"]
    # issue 13's targets: at m=1 below 10%; at m=4 within 1.15x (v=1) and 1.5x (v=2) of the bound
    bound = 7 / (v * m * 32 + 7)
    assert c["bubble_fraction"] < (0.10 if m == 1 else (1.15 if v == 1 else 1.5) * bound)


@pytest.mark.parametrize("profile", [None, "h100", "a100"])
def test_compile_threads_the_device_profile(profile):
    kw = dict(model=L70, p=8, m=1, n=16, seq=131072, exchange=True)
    plan = compile_plan(build_spec("slimpipe", L70, pp=8, microbatches=1, slices=16, seq_len=131072, exchange=True),
                        profile)
    want = redistribute(lowered(**kw), load_profile(profile))
    assert tuple(s[:-1] for s in plan.ranks) == want.ranks  # the same pairing, then OPT
    assert plan.meta["device_profile"] == (profile or "h100")
    assert plan.meta["exchanges"] == want.meta["exchanges"]


def test_compile_profile_object_and_no_exchange():
    prof = load_profile("a100")
    assert plan_of(exchange=True).meta["device_profile"] == "h100"
    assert compile_plan(build_spec("slimpipe", TINY, pp=4, microbatches=4, slices=4, seq_len=128, exchange=True),
                        prof).meta["device_profile"] == "a100"
    assert "device_profile" not in plan_of(exchange=False).meta
    with pytest.raises(TypeError):
        compile_plan(build_spec("slimpipe", TINY, pp=4, microbatches=4, slices=4, seq_len=128, exchange=True), 3)


def test_cli_compile_device_profile(tmp_path, capsys):
    import json

    from compiler.cli import main

    base = ["compile", "--schedule", "slimpipe", "--pp", "4", "--microbatches", "4", "--slices", "4", "--json"]
    out = str(tmp_path / "p.json")
    assert main(base + ["--device-profile", "a100", "-o", out]) == 0
    assert json.loads(capsys.readouterr().out)["device_profile"] == "a100"
    with open(out) as f:
        assert json.load(f)["meta"]["device_profile"] == "a100"
    prof = tmp_path / "dev.json"
    prof.write_text(json.dumps({**load_profile("h100").to_json(), "name": "mine", "p2p_bandwidth": 1e9}))
    assert main(base + ["--device-profile", str(prof), "-o", out]) == 0
    assert json.loads(capsys.readouterr().out)["device_profile"] == "mine"
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x"}')
    for arg in ("b200", str(bad), str(tmp_path / "missing.json")):
        assert main(base + ["--device-profile", arg, "-o", out]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "--device-profile" in err
