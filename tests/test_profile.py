"""Measured device profiles: the format, the cost model over its curves, processor sharing, the
executor's measured trace against its plan, and `simulate --against` on hand-made traces."""
import json

import pytest

from compiler import compile_plan
from compiler.cli import main
from executor.cli import options
from executor.runner import run_local
from ir import KV, KV_FWD, KV_HELPER, Instr, Kind, SpecError, save
from ir import F as Fi
from passes.costs import PROFILES, CostModel, load_profile, profile_from_dict, unit_cost_table
from passes.replay import replay, replay_shared
from passes.simulate import simulate_timed

from compiler import build_spec, resolve_model


def spec(schedule, p, m, n=1, v=1, seq_len=64, exchange=False):
    return build_spec(schedule, resolve_model("tiny"), pp=p, microbatches=m, slices=n, virtual_stages=v,
                      seq_len=seq_len, exchange=exchange)

MM, ATT, ELEM = 1e-9, 1e-8, 1e-5  # seconds per FLOP, per query-key pair, per token


def measured_profile(processors=0):
    """A profile whose curves are straight lines through zero: the figures have closed forms."""
    toks = [64, 4096]
    return {"name": "hand", **{k: v for k, v in PROFILES["h100"].to_json().items() if k != "name"},
            "measured": {"format": "slimpipe-device-profile/1", "processors": processors,
                         "matmul": [[1e6, 1e6 * MM], [1e9, 1e9 * MM]],
                         "attention": [[p, c, q, q, q * q * ATT * (2 if p == "bwd" else 1)] for p in ("fwd", "bwd")
                                       for c in (0, 1) for q in toks],
                         "elementwise": [[t, t * ELEM, 2 * t * ELEM] for t in toks],
                         "head": [[t, 3 * t * ELEM, 6 * t * ELEM] for t in toks],
                         "embedding": [[t, 0.0, 0.0] for t in toks],
                         "p2p": [[1024, 1e-4], [1 << 20, 1e-3]]}}


def write(tmp_path, d, name="prof.json"):
    path = tmp_path / name
    path.write_text(json.dumps(d))
    return str(path)


def test_measured_profile_loads_and_builtins_still_do(tmp_path):
    assert load_profile("h100").measured is None and load_profile("a100").peak_flops == 312e12
    prof = load_profile(write(tmp_path, measured_profile(2)))
    assert prof.measured.processors == 2 and prof.to_json()["measured"]["matmul"][0] == [1e6, 1e6 * MM]
    assert load_profile(write(tmp_path, prof.to_json(), "again.json")).measured.attention == prof.measured.attention


@pytest.mark.parametrize("edit, says", [
    (lambda m: m.update(format="x"), "format"),
    (lambda m: m.update(processors=-1), "processors"),
    (lambda m: m.update(matmul=[]), "matmul"),
    (lambda m: m["attention"].append(["sideways", 1, 8, 8, 0.1]), "attention"),
    (lambda m: m["p2p"].append([1, "fast"]), "p2p"),
    (lambda m: m.update(weight=[[1024, 0.001, 0.002]]), r"weight: row \[1024, 0\.001, 0\.002\] must be 2 finite"),
    (lambda m: m.update(weight=[]), "weight must be a non-empty list"),
    (lambda m: m.update(timeslice_s=-0.004), r"timeslice_s=-0\.004"),
    (lambda m: m.update(timeslice_s="4ms"), r'timeslice_s="4ms"'),  # as the JSON file spells it
    (lambda m: m.update(timeslice_s=True), r"timeslice_s=true must"),
    (lambda m: m.update(timeslice_s=None), r"timeslice_s=null must"),  # present: a number; absent: fair share
    (lambda m: m.update(timeslice_s=4), r"timeslice_s=4 must be a number of seconds"),
])
def test_bad_measured_block_is_one_line(tmp_path, edit, says):
    d = measured_profile()
    edit(d["measured"])
    with pytest.raises(SpecError, match=says) as e:
        load_profile(write(tmp_path, d))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("field, value, says", [
    ("peak_flops", float("nan"), "peak_flops=NaN must be a finite positive number"),
    ("peak_flops", float("inf"), "peak_flops=Infinity must be a finite positive number"),
    ("p2p_bandwidth", float("nan"), "p2p_bandwidth=NaN must be"),
    ("p2p_latency", float("inf"), "p2p_latency=Infinity must be a finite number >= 0"),
    ("mm_efficiency", float("nan"), "mm_efficiency=NaN must be a number in (0, 1]"),
    ("mm_efficiency", 0, "mm_efficiency=0 must be a number in (0, 1]"),
    ("memory_bytes", float("inf"), "memory_bytes=Infinity must be"),
])
def test_a_profile_number_that_is_not_finite_is_one_line(tmp_path, capsys, field, value, says):
    """JSON's NaN and Infinity (Python's json reads and writes them) made simulate print 'step nan ns'
    and compile write a plan, exit 0 (a new user's trial)."""
    path = write(tmp_path, {**PROFILES["h100"].to_json(), field: value})
    with pytest.raises(SpecError) as e:
        load_profile(path)
    assert says in str(e.value) and "\n" not in str(e.value)
    out = tmp_path / "plan.json"
    assert main(["compile", "--schedule", "1f1b", "--pp", "2", "--microbatches", "2", "--device-profile", path,
                 "-o", str(out)]) == 2
    assert not out.exists() and says in capsys.readouterr().err
    d = measured_profile()
    d["measured"]["matmul"].append([1e12, float("inf")])
    with pytest.raises(SpecError, match="matmul: row .* must be 2 finite numbers"):
        load_profile(write(tmp_path, d, "rows.json"))


def test_a_bad_profile_stored_in_a_plan_is_named_as_such(tmp_path, capsys):
    """A plan compiled for a profile file carries its fields; a hand-edited bad field there is one
    line naming the plan's meta (not a --device-profile the user never gave), exit 2."""
    plan = compile_plan(spec("1f1b", 2, 2, seq_len=256), load_profile(write(tmp_path, measured_profile(2))))
    fields_ = dict(plan.meta["device_profile_fields"], peak_flops=True)
    path = tmp_path / "plan.json"
    save(plan.with_ranks(plan.ranks, device_profile_fields=fields_), str(path))
    assert main(["simulate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "the plan's meta.device_profile_fields: peak_flops=true must be a finite positive number" in err
    assert "--device-profile '" not in err


def test_a_plan_whose_profile_is_gone_is_not_priced_on_h100(tmp_path, capsys):
    """A plan compiled for a profile file without its stored fields (hand-edited, or written by a
    tool that drops meta) was simulated on h100 with no word; now one line, exit 2, and
    --device-profile prices it."""
    prof = write(tmp_path, measured_profile(2))
    plan = compile_plan(spec("1f1b", 2, 2, seq_len=256), load_profile(prof))
    meta = {k: v for k, v in plan.meta.items() if k != "device_profile_fields"}
    path = tmp_path / "plan.json"
    save(type(plan)(plan.spec, plan.ranks, meta, plan.schema_version), str(path))
    assert main(["simulate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "compiled for device profile 'hand'" in err and "give --device-profile" in err
    assert main(["simulate", str(path), "--device-profile", prof, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["device_profile"] == "hand"


def test_unit_time_from_curves():
    """seq 256, 2 slices of 128 on tiny (hidden 64, heads 4 of 16, kv 2, ffn 128), p=2: stage 0 holds
    4 layers and the embedding, stage 1 4 layers and the head."""
    plan = compile_plan(spec("seq1f1b", 2, 1, n=2, seq_len=256))
    cm = CostModel(plan.spec, profile_from_dict(measured_profile()), 4)
    s = 128
    mm = 2 * s * 64 * (64 + 32 + 32 + 64 + 128 + 128 + 128) * MM  # q, k, v, o, w1, w3, w2
    f0 = 4 * (mm + s * s * ATT + s * ELEM)                      # slice 0: causal only
    f1 = 4 * (mm + 2 * s * s * ATT + s * ELEM) + 3 * s * ELEM   # slice 1 on the last stage: + one full call, head
    b1 = 4 * (2 * mm + 4 * s * s * ATT + 2 * s * ELEM) + 6 * s * ELEM
    assert cm.unit_time(0, Fi(0, 0, 0)) == pytest.approx(f0)
    assert cm.unit_time(1, Fi(0, 1, 0)) == pytest.approx(f1)
    assert cm.unit_time(1, Instr(Kind.B, 0, 1, 0)) == pytest.approx(b1)
    # a unit's fixed cost (optional curve) comes on top, once per unit
    d = measured_profile()
    d["measured"]["unit"] = [[64, 1e-3, 2e-3], [4096, 1e-3, 2e-3]]
    cm = CostModel(plan.spec, profile_from_dict(d), 4)
    assert cm.unit_time(1, Fi(0, 1, 0)) == pytest.approx(f1 + 1e-3)
    assert cm.unit_time(1, Instr(Kind.B, 0, 1, 0)) == pytest.approx(b1 + 2e-3)
    # a split unit (I, W) runs the loss head unfused: with head_split its F and I take the head from it
    d = measured_profile()
    d["measured"]["head_split"] = [[t, 1 * t * ELEM, 8 * t * ELEM] for t in (64, 4096)]
    zb = compile_plan(build_spec("zb-h1", resolve_model("tiny"), pp=2, microbatches=2, seq_len=128))
    cm, fused = CostModel(zb.spec, profile_from_dict(d), 4, plan=zb), CostModel(zb.spec, profile_from_dict(d), 4)
    f_last = 4 * (mm + s * s * ATT + s * ELEM)  # 128 tokens, one slice: causal attention only
    assert cm.unit_time(1, Fi(0, 0, 0)) == pytest.approx(f_last + 1 * s * ELEM)
    assert fused.unit_time(1, Fi(0, 0, 0)) == pytest.approx(f_last + 3 * s * ELEM)  # no plan: a unit with one B
    # W: the projections' weight-gradient half, and on the last stage the LM head's dW (the split
    # head leaves it to the WeightGradStore too): 2 * tokens * hidden * vocab FLOPs
    cfg = zb.spec.model
    w_head = 2 * s * cfg.hidden * cfg.vocab * MM
    w = 4 * mm + w_head
    b_split = 4 * (2 * mm + 2 * s * s * ATT + 2 * s * ELEM) + 8 * s * ELEM
    assert cm.unit_time(1, Instr(Kind.I, 0, 0, 0)) == pytest.approx(b_split - w)
    assert cm.unit_time(1, Instr(Kind.W, 0, 0, 0)) == pytest.approx(w)
    assert cm.unit_time(0, Instr(Kind.W, 0, 0, 0)) == pytest.approx(4 * mm)  # no head on stage 0
    # with a measured W curve (per layer, caches cold) W takes it; I stays the fused backward less
    # its dW matmuls (so a split unit's I + W exceed its B by what the split costs)
    d["measured"]["weight"] = [[t, 2 * t * 1e-6] for t in (64, 4096)]
    cm = CostModel(zb.spec, profile_from_dict(d), 4, plan=zb)
    assert cm.unit_time(0, Instr(Kind.W, 0, 0, 0)) == pytest.approx(4 * 2 * s * 1e-6)
    assert cm.unit_time(1, Instr(Kind.W, 0, 0, 0)) == pytest.approx(4 * 2 * s * 1e-6 + w_head)
    assert cm.unit_time(1, Instr(Kind.I, 0, 0, 0)) == pytest.approx(b_split - w)


def test_prefix_attention_priced_per_gathered_block():
    """The executor attends the earlier slices in blocks of up to GATHER_SLICES (4) query lengths
    (ir.limits.gather_blocks), and the cost model prices one call per block: with a fixed cost C
    per attention call, slice 5 of six 64-token slices pays the causal call and two prefix calls
    ([0, 256) and [256, 320)), not five; an exchange shipping slice 1 saves its keys' share, not a
    call (the blocks left, [0, 64) and [128, 320), are two calls again)."""
    C = 1e-4
    d = measured_profile()
    d["measured"]["attention"] = [[p, c, q, q, C + q * q * ATT * (2 if p == "bwd" else 1)]
                                  for p in ("fwd", "bwd") for c in (0, 1) for q in (64, 4096)]
    plan = compile_plan(spec("seq1f1b", 2, 1, n=6, seq_len=384))
    cm = CostModel(plan.spec, profile_from_dict(d), 4)
    s = 64
    mm = 2 * s * 64 * (64 + 32 + 32 + 64 + 128 + 128 + 128) * MM
    attn = (C + s * s * ATT) + (2 * C + s * 5 * s * ATT)
    assert cm.unit_time(0, Fi(0, 5, 0)) == pytest.approx(4 * (mm + attn + s * ELEM))
    ex = Instr(Kind.KVF_SEND, 0, 5, 0, peer=1, tag=0, lo=64, hi=128)
    assert cm.kv_shift(0, ex) == pytest.approx(4 * s * s * ATT)


def test_processor_sharing_closed_forms():
    """Two ranks whose units all run at once: on one processor each takes twice as long."""
    plan = compile_plan(spec("gpipe", 2, 2))
    flat = plan.with_ranks([tuple(i for i in s if i.kind in (Kind.F, Kind.B)) for s in plan.ranks])
    one = replay(flat, lambda r, i: 1.0)
    assert one.makespan == 4.0
    assert replay_shared(flat, lambda r, i: 1.0, 2).makespan == 4.0
    shared = replay_shared(flat, lambda r, i: 1.0, 1)
    assert shared.makespan == 8.0 and shared.busy == [8.0, 8.0]
    # with its messages the pipeline fills and drains: the shared replay equals replay() with 2 processors
    a, b = replay(plan, lambda r, i: 1.0 if i.kind == Kind.F else 2.0), replay_shared(
        plan, lambda r, i: 1.0 if i.kind == Kind.F else 2.0, 2)
    assert (a.makespan, a.busy) == (b.makespan, b.busy)


def test_timeslice_closed_forms():
    """Two ranks with two units of 1 s each on one processor. A slice longer than a unit: rank 0
    runs both units while rank 1 waits for the processor (busy = wall of each unit once it got the
    processor), makespan 4. A slice of 0.5 s: they take turns, every unit is stretched by the other."""
    plan = compile_plan(spec("gpipe", 2, 2))
    flat = plan.with_ranks([tuple(i for i in s if i.kind in (Kind.F, Kind.B)) for s in plan.ranks])
    two = [(r, ins) for r, s in enumerate(flat.ranks) for ins in s]
    assert len(two) == 8  # F, F, B, B on each rank
    cost = lambda r, i: 0.5  # noqa: E731
    run = replay_shared(flat, cost, 1, timeslice=10.0, record=True)
    assert run.makespan == 4.0
    # first come first served: rank 0 holds the processor through all four of its units
    assert [(r, t0, t1) for r, _i, t0, t1 in sorted(run.timeline, key=lambda e: e[2])][:4] == [
        (0, 0.0, 0.5), (0, 0.5, 1.0), (0, 1.0, 1.5), (0, 1.5, 2.0)]
    assert run.busy == [2.0, 2.0]
    turns = replay_shared(flat, cost, 1, timeslice=0.25, record=True)
    assert turns.makespan == 4.0 and turns.busy == [3.75, 3.75]
    # with processors to spare the slice changes nothing
    assert replay_shared(flat, cost, 2, timeslice=0.25).makespan == replay(flat, cost).makespan == 2.0


def test_timeslice_that_ran_out_unwatched_ends_when_a_rank_queues():
    """A rank that computes on past the end of its slice while nobody waits keeps the processor;
    when a rank then queues, the slice ends at that moment. The shared replay ended it at the
    slice's own (past) end instead: its clock went back, and a rank started a unit before its
    message had arrived. 1F1B p=3 m=3 on 2 processors, slice 1.5 s, F 1 s, B 2 s: rank 2 runs B1 from
    7 (its slice from 6 ran out at 7.5 with ranks 0 and 1 waiting for gradients); at 8 rank 1's B0
    ends and sends, rank 1 takes its freed processor for F2 and rank 0 queues for B0, so rank 2
    hands over at 8 (it had B0 of rank 0 start at 7.5, before its gradient): B0 runs 8-10 on rank 0,
    and rank 2's B1, back at 9 when rank 1 waits, ends at 10; the step ends at 17, not 17.5."""
    plan = compile_plan(spec("1f1b", 3, 3))
    res = replay_shared(plan, lambda r, i: 1.0 if i.kind == Kind.F else 2.0, 2, timeslice=1.5, record=True)
    at = {(r, plan.ranks[r][i].kind, plan.ranks[r][i].mb): (t0, t1) for r, i, t0, t1 in res.timeline}
    assert at[(0, Kind.B, 0)] == (8.0, 10.0) and at[(2, Kind.B, 1)] == (7.0, 10.0)
    assert res.makespan == 17.0
    for (r, k, mb), (t0, _t1) in at.items():  # no unit before its input: F after the rank before, B after the one after
        src = (r - 1, k, mb) if k == Kind.F else (r + 1, k, mb)
        if src in at:
            assert t0 >= at[src][1], (r, k, mb)


def test_message_cost_closed_forms():
    """Each send and receive occupies its rank for msg_cost (its data leaves when it is posted): 1F1B
    p=2 m=1, F = B = 1 s: rank 0's activation leaves at 1; rank 1 pays 0.1 for its receive, runs F
    and B (1.1 to 3.1) and sends; rank 0 pays 0.1 for that receive and runs B: 3.2 to 4.2."""
    plan = compile_plan(spec("1f1b", 2, 1))
    one = lambda r, i: 1.0  # noqa: E731
    msg = lambda r, i: 0.1  # noqa: E731
    assert replay(plan, one).makespan == 4.0
    assert replay(plan, one, msg_cost=msg).makespan == pytest.approx(4.2)
    res = replay_shared(plan, one, 2, msg_cost=msg, timeslice=10.0)
    assert res.makespan == pytest.approx(4.2) and res.busy == [2.0, 2.0]  # message time is not busy
    # on one processor the message work queues too: rank 1's receive waits for rank 0's send (1.1),
    # and rank 0's receive for rank 1's send (3.3): 0.2 later
    assert replay_shared(plan, one, 1, msg_cost=msg, timeslice=10.0).makespan == pytest.approx(4.4)


def test_profile_message_cpu_and_timeslice_reach_the_model(tmp_path):
    """p2p_cpu prices every send and receive, timeslice_s switches processor sharing to turns;
    a profile without them (older files) predicts what it did."""
    plan = compile_plan(spec("1f1b", 4, 4, seq_len=256))
    d = measured_profile(2)
    base = simulate_timed(plan, load_profile(write(tmp_path, d)), 4)["step_s"]
    d["measured"]["p2p_cpu"] = [[1024, 1e-3], [1 << 20, 1e-3]]
    prof = load_profile(write(tmp_path, d, "cpu.json"))
    cm = CostModel(plan.spec, prof, 4, plan=plan)
    send = next(i for i in plan.ranks[0] if i.kind == Kind.SEND_ACT)
    assert cm.msg_time(0, send) == 1e-3 and prof.measured.timeslice == 0.0
    priced = simulate_timed(plan, prof, 4)["step_s"]
    assert priced > base + 6 * 1e-3  # the critical path crosses at least 6 sends and receives
    d["measured"]["timeslice_s"] = 0.004
    sliced = simulate_timed(plan, load_profile(write(tmp_path, d, "slice.json")), 4)
    assert sliced["step_s"] != priced


def test_exchange_messages_cost_both_sides():
    """kv_cpu: per layer, p2p_cpu at the request's and at the reply's bytes on the owner and on the
    partner (tiny: q_dim = 64, K+V = 64 values per token, fp32, 4 layers per stage at p=2); with
    1 ms per message the exchange pass keeps none at seq 1024 (its pieces save less than that) and
    two without message cost."""
    d = measured_profile(0)
    free = profile_from_dict(d)
    d["measured"]["p2p_cpu"] = [[1024, 1e-3], [1 << 24, 1e-3]]
    priced = profile_from_dict(d)
    plan = compile_plan(spec("slimpipe", 2, 2, n=4, seq_len=4096, exchange=True), profile=priced, keep_pairing=False)
    kv = [(r, i) for r, st in enumerate(plan.ranks) for i in st if i.kind in KV]
    assert kv
    a, b = CostModel(plan.spec, free, 4, plan=plan), CostModel(plan.spec, priced, 4, plan=plan)
    for r, i in kv:
        s, x = plan.spec.slice_lens[i.mb][i.slice], i.hi - i.lo
        req, rep = b.kv_messages(i)
        if i.kind in KV_FWD:
            assert (req, rep) == ((s * 64 + x * 64) * 4, s * 64 * 4 + s * 4 * 4)
        else:
            assert (req, rep) == ((3 * s * 64 + x * 64) * 4 + s * 4 * 4, (s * 64 + x * 64) * 4)
        assert a.kv_cpu(r, i) == 0.0 and b.kv_cpu(r, i) == pytest.approx(4 * 2e-3)
    ta, tb = unit_cost_table(plan, a), unit_cost_table(plan, b)
    served_by_units = sum(1 for _r, i in kv if i.kind not in KV_HELPER)
    assert sum(tb.values()) - sum(ta.values()) == pytest.approx(served_by_units * 8e-3)
    for r, i in kv:
        if i.kind in KV_HELPER:
            assert b.help_time(r, i) - a.help_time(r, i) == pytest.approx(8e-3)
    count = lambda prof: sum(1 for st in compile_plan(  # noqa: E731
        spec("slimpipe", 2, 2, n=4, seq_len=1024, exchange=True), profile=prof, keep_pairing=False).ranks
        for i in st if i.kind in KV)
    assert (count(free), count(priced)) == (2, 0)


def test_simulate_uses_the_profiles_processors(tmp_path):
    plan = compile_plan(spec("1f1b", 4, 4, seq_len=256))
    alone = simulate_timed(plan, load_profile(write(tmp_path, measured_profile(0))), 4)
    shared = simulate_timed(plan, load_profile(write(tmp_path, measured_profile(2), "two.json")), 4)
    assert shared["step_s"] > 1.2 * alone["step_s"]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """A real --local run with --trace: 3 steps of slimpipe with the KV exchange."""
    d = tmp_path_factory.mktemp("trace")
    plan = compile_plan(spec("slimpipe", 2, 2, n=4, exchange=True))
    path = d / "plan.json"
    save(plan, str(path))
    trace = str(d / "measured.json")
    code, summary = run_local(plan, options(device="cpu", steps=3, quiet=True, json=True, trace=trace))
    assert code == 0
    return plan, str(path), trace, summary


def test_trace_has_every_instruction_once_in_plan_order(measured):
    plan, _, trace, summary = measured
    t = json.load(open(trace))
    ev = [e for e in t["traceEvents"] if e["ph"] == "X"]
    assert len(ev) == 3 * sum(len(s) for s in plan.ranks)
    for step in range(3):
        for r, stream in enumerate(plan.ranks):
            mine = sorted((e for e in ev if e["pid"] == r and e["args"]["step"] == step), key=lambda e: e["ts"])
            assert [e["args"]["index"] for e in mine] == list(range(len(stream)))
            assert [e["args"]["instr"] for e in mine] == [str(i) for i in stream]
            for a, b in zip(mine, mine[1:]):
                assert a["ts"] + a["dur"] <= b["ts"] + 1e-3  # microseconds; never overlapping on a rank
    names = {e["name"] for e in ev}
    assert {"F0.0", "B1.3", "SEND_ACT", "RECV_GRAD", "KVF_SEND", "OPT"} <= names
    # --local runs the ranks as threads of one process: no per-rank process CPU
    assert t["otherData"]["step_cpu_s"] == [[None] * 3, [None] * 3]
    assert summary["kinds"]["F"]["count"] == 2 * 2 * 4 * 1 and summary["trace"] == trace


def test_trace_has_the_kv_requests_each_rank_served(measured):
    """Every rank that serves an exchange (KV*_RECV in its stream) records, per step, the seconds it
    spent answering requests, in the instructions it answered them in (args.kv_served_s, [forward,
    backward]) and after its last one (otherData.kv_served_after_s); the owners record none. An
    instruction's share lies within its own duration."""
    from ir import KV_SERVER

    plan, _, trace, _ = measured
    t = json.load(open(trace))
    ev = [e for e in t["traceEvents"] if e["ph"] == "X"]
    after = t["otherData"]["kv_served_after_s"]
    assert len(after) == 2 and all(len(pr) == 3 for pr in after)
    servers = {r for r, s in enumerate(plan.ranks) if any(ins.kind in KV_SERVER for ins in s)}
    assert servers and servers != {0, 1}
    for step in range(3):
        for r in range(2):
            mine = [e for e in ev if e["pid"] == r and e["args"]["step"] == step]
            pairs = [e["args"]["kv_served_s"] for e in mine if "kv_served_s" in e["args"]]
            pairs += [after[r][step]] if after[r][step] is not None else []
            assert all(len(p) == 2 and min(p) >= 0 for p in pairs)
            assert (sum(map(sum, pairs)) > 0) == (r in servers)
            for e in mine:
                assert sum(e["args"].get("kv_served_s", [0, 0])) <= e["dur"] / 1e6 + 1e-6


def test_trace_under_torchrun_has_each_ranks_process_cpu(tmp_path):
    """Ranks as processes (torchrun, gloo): per rank and step the process's CPU and its compute
    thread's, the process's at least the thread's (gloo's threads and the watchers on top)."""
    import subprocess
    import sys

    from tests.test_executor_runs import ENV, ROOT, free_port

    plan = compile_plan(spec("1f1b", 2, 2, seq_len=128))
    save(plan, str(tmp_path / "plan.json"))
    trace = str(tmp_path / "t.json")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                        "127.0.0.1", "--master-port", str(free_port()), "-m", "executor", str(tmp_path / "plan.json"),
                        "--steps", "2", "--quiet", "--trace", trace], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.load(open(trace))["otherData"]["step_cpu_s"]
    assert len(rows) == 2 and all(len(pr) == 2 for pr in rows)
    for pr in rows:
        for proc, thread in pr:
            assert 0 < thread <= proc


def hand_trace(plan, durations, steps=2, gap=0.0, cpu=None):
    """A measured trace laid out back to back per rank from `durations[(rank, index)]` seconds
    (no waits: each rank runs its own stream as fast as the durations say); `cpu` CPU seconds."""
    ev = []
    for st in range(steps):
        for r, s in enumerate(plan.ranks):
            t = 1e6 * st * 10
            for i, ins in enumerate(s):
                d = durations[(r, i)] * 1e6
                ev.append({"name": str(ins.kind), "ph": "X", "pid": r, "tid": 0, "ts": t, "dur": d,
                           "args": {"index": i, "step": st, **({"cpu_s": cpu.get((r, i), 0.0)} if cpu else {})}})
                t += d + gap
    return {"traceEvents": ev}


def against_slower(tmp_path, capsys, family, slower):
    """The plan of `family` (p=2, m=2), simulated with a measured profile, against a hand-made trace
    where every unit takes its predicted time and every `slower` unit 0.01 s more: (plan, the
    predicted and the measured durations, the trace path, simulate --against --json's output)."""
    plan = compile_plan(spec(family, 2, 2, seq_len=256))
    prof = load_profile(write(tmp_path, measured_profile()))
    sim = simulate_timed(plan, prof, 4, record=True)
    pred = {(r, i): t1 - t0 for r, i, t0, t1 in sim["_replay"].timeline}
    dur = {(r, i): pred.get((r, i), 0.0) + (0.01 if ins.kind == slower else 0.0)
           for r, s in enumerate(plan.ranks) for i, ins in enumerate(s)}
    tr = write(tmp_path, hand_trace(plan, dur), "measured.json")
    save(plan, str(tmp_path / "plan.json"))
    assert main(["simulate", str(tmp_path / "plan.json"), "--device-profile", str(tmp_path / "prof.json"),
                 "--against", tr, "--json"]) == 0
    return plan, pred, dur, tr, json.loads(capsys.readouterr().out)


def test_against_a_hand_made_trace(tmp_path, capsys):
    # measured: every F takes its predicted time, every B 0.01 s longer, nothing else takes time
    plan, pred, dur, tr, out = against_slower(tmp_path, capsys, "gpipe", Kind.B)
    assert out["step"] == 1
    kinds = {k["kind"]: k for k in out["kinds"]}
    assert out["kinds"][0]["kind"] == "B" and kinds["B"]["residual_s"] == pytest.approx(0.04)
    assert kinds["F"]["residual_s"] == pytest.approx(0.0, abs=1e-12)
    assert [s["slice"] for s in out["slices"] if s["kind"] == "B"] == [0]
    busy = [sum(dur[(r, i)] for i, ins in enumerate(s) if ins.kind in (Kind.F, Kind.B)) for r, s in enumerate(plan.ranks)]
    assert out["measured"]["busy_s"] == pytest.approx(busy)
    assert out["predicted"]["busy_s"] == pytest.approx([b - 0.02 for b in busy])
    # back to back per rank: the step is the busiest rank's sum, the bubble what the others idle
    step = max(busy)
    assert out["measured"]["step_s"] == pytest.approx(step)
    assert out["measured"]["bubble_fraction"] == pytest.approx(1 - sum(busy) / (2 * step))
    assert main(["simulate", str(tmp_path / "plan.json"), "--device-profile", str(tmp_path / "prof.json"),
                 "--against", tr]) == 0
    assert "residual" in capsys.readouterr().out
    # CPU times equal to the predicted unit times: replayed like the prediction, they give its step
    tr = write(tmp_path, hand_trace(plan, dur, cpu=pred), "cpu.json")
    assert main(["simulate", str(tmp_path / "plan.json"), "--device-profile", str(tmp_path / "prof.json"),
                 "--against", tr, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["measured"]["cpu_replay_step_s"] == pytest.approx(out["predicted"]["step_s"])
    assert out["cpu_replay_error"] == pytest.approx(0.0, abs=1e-9)
    assert "other_threads_cpu_s" not in out["measured"]  # the trace has no per-step process CPU
    # per rank and step [process CPU, compute thread CPU] (the executor writes them when each rank is
    # a process): the report sums them, the rest being the ranks' other threads
    t = hand_trace(plan, dur, cpu=pred)
    t["otherData"] = {"step_cpu_s": [[[0.5, 0.4], [0.30, 0.25]], [[0.6, 0.6], [0.45, 0.44]]]}
    tr = write(tmp_path, t, "cpu2.json")
    assert main(["simulate", str(tmp_path / "plan.json"), "--device-profile", str(tmp_path / "prof.json"),
                 "--against", tr, "--json"]) == 0
    m = json.loads(capsys.readouterr().out)["measured"]
    assert m["process_cpu_s"] == [0.30, 0.45] and m["compute_thread_cpu_s"] == [0.25, 0.44]
    assert m["other_threads_cpu_s"] == pytest.approx(0.06)
    assert main(["simulate", str(tmp_path / "plan.json"), "--device-profile", str(tmp_path / "prof.json"),
                 "--against", tr]) == 0
    assert "60 ms in their other threads" in capsys.readouterr().out
    t["otherData"]["step_cpu_s"][1][1] = None  # a rank without the pair: no figure, no failure
    tr = write(tmp_path, t, "cpu3.json")
    assert main(["simulate", str(tmp_path / "plan.json"), "--device-profile", str(tmp_path / "prof.json"),
                 "--against", tr, "--json"]) == 0
    assert "other_threads_cpu_s" not in json.loads(capsys.readouterr().out)["measured"]


def test_against_splits_the_bubble_like_the_prediction_on_shared_processors(tmp_path, capsys):
    """4 ranks on a 2-processor profile: the prediction's `ideal` replays on the 2 processors (ranks
    share them, and a unit's busy time is its stretched wall time: 1f1b p=4 m=4 reads 13/36, not
    the closed form 3/7). With measured CPU times equal to the predicted unit costs, the measured
    split replays them the same way and its `ideal` is the prediction's; it was the free replay of
    the wall durations, the closed form, so the two `ideal`s of one output meant different things."""
    from passes.costs import unit_cost_table

    plan = compile_plan(spec("1f1b", 4, 4, seq_len=256))
    prof = load_profile(write(tmp_path, measured_profile(2)))
    table = unit_cost_table(plan, CostModel(plan.spec, prof, 4, plan=plan))
    units = {(r, i): table[(r, ins.kind, ins.mb, ins.slice, ins.chunk)]
             for r, s in enumerate(plan.ranks) for i, ins in enumerate(s) if ins.kind in (Kind.F, Kind.B)}
    dur = {(r, i): units.get((r, i), 0.0) for r, s in enumerate(plan.ranks) for i in range(len(s))}
    # wall time: each instruction, then an idle gap of 3 longest units (the turns and the waits)
    tr = write(tmp_path, hand_trace(plan, dur, gap=3e6 * max(units.values()), cpu=units), "shared.json")
    save(plan, str(tmp_path / "plan.json"))
    assert main(["simulate", str(tmp_path / "plan.json"), "--device-profile", str(tmp_path / "prof.json"),
                 "--against", tr, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ideal_p, ideal_m = out["predicted"]["bubble_breakdown"]["ideal"], out["measured"]["bubble_breakdown"]["ideal"]
    assert ideal_p == pytest.approx(13 / 36) and ideal_p < out["measured"]["bubble_fraction"]
    assert ideal_m == pytest.approx(ideal_p)
    assert sum(out["measured"]["bubble_breakdown"].values()) == pytest.approx(out["measured"]["bubble_fraction"])
    # per kind, the units' own CPU: the cost model's seconds (no sharing) next to the measured CPU
    # times, here the same figures; the simulated durations are the turns' stretched wall times
    for row in out["kinds"]:
        if row["kind"] in ("F", "B"):
            own = sum(t for (r, i), t in units.items() if plan.ranks[r][i].kind == row["kind"])
            assert row["predicted_cpu_s"] == pytest.approx(own) == pytest.approx(row["measured_cpu_s"])
            assert row["predicted_s"] > 1.2 * own
        else:
            assert "predicted_cpu_s" not in row
    # a profile with a processor per rank keeps the free replay of the wall durations: the closed form
    assert main(["simulate", str(tmp_path / "plan.json"), "--device-profile", write(tmp_path, measured_profile(0), "own.json"),
                 "--against", tr, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["measured"]["bubble_breakdown"]["ideal"] == pytest.approx(3 / 7)


def test_against_a_split_backward_plan(tmp_path, capsys):
    """zb-h1 (I and W units): the measured busy time and the per-kind residuals count I and W too
    (--against stopped with KeyError 'I' before)."""
    plan, _, dur, _, out = against_slower(tmp_path, capsys, "zb-h1", Kind.W)
    kinds = {k["kind"]: k for k in out["kinds"]}
    assert kinds["W"]["residual_s"] == pytest.approx(0.04) and kinds["I"]["residual_s"] == pytest.approx(0.0, abs=1e-12)
    busy = [sum(dur[(r, i)] for i, ins in enumerate(s) if ins.kind in (Kind.F, Kind.I, Kind.W))
            for r, s in enumerate(plan.ranks)]
    assert out["measured"]["busy_s"] == pytest.approx(busy)


def test_against_counts_kv_requests_served_in_waits_as_unit_work(tmp_path, capsys):
    """The executor answers a partner's KV requests wherever the rank is, inside a receive's wait
    too (the trace's args.kv_served_s), while the model prices them in the partner's units: --against
    moves the served seconds of a non-unit instruction into the rank's next unit of that direction
    (forward: its next F, backward: its next B), and those served after the last instruction
    (otherData.kv_served_after_s) into its last one. Before, the measured bubble counted them as
    idle: slimpipe p=2 at 4096 tokens read 12.5% against 9.2% with them counted, 6.0% predicted."""
    plan = compile_plan(spec("slimpipe", 2, 2, n=4, seq_len=256, exchange=True))
    s0 = plan.ranks[0]
    assert (s0[8].kind, s0[13].kind, s0[15].kind, s0[17].kind, s0[18].kind) == (
        Kind.KVF_RECV, Kind.RECV_GRAD, Kind.F, Kind.RECV_GRAD, Kind.B)  # rank 0 is rank 1's partner
    last_f = max(i for i, ins in enumerate(s0) if ins.kind == Kind.F)
    last_b = max(i for i, ins in enumerate(s0) if ins.kind == Kind.B)
    dur = {(r, i): {Kind.F: 0.01, Kind.B: 0.02}.get(ins.kind, 0.005)
           for r, s in enumerate(plan.ranks) for i, ins in enumerate(s)}
    t = hand_trace(plan, dur)
    for e in t["traceEvents"]:
        if e["pid"] == 0 and e["args"]["index"] in (13, 17):
            e["args"]["kv_served_s"] = [0.004, 0.0] if e["args"]["index"] == 13 else [0.0, 0.003]
        if e["pid"] == 0 and e["args"]["index"] == 15:
            e["args"]["kv_served_s"] = [0.002, 0.0]  # inside a unit: already its time
    t["otherData"] = {"kv_served_after_s": [[None, [0.001, 0.0015]], [None, None]]}
    save(plan, str(tmp_path / "plan.json"))
    args = ["simulate", str(tmp_path / "plan.json"), "--device-profile", write(tmp_path, measured_profile()),
            "--against", write(tmp_path, t, "served.json")]
    assert main(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    m = out["measured"]
    moved = 0.004 + 0.003 + 0.001 + 0.0015
    assert m["kv_served_outside_units_s"] == pytest.approx([moved, 0.0])
    busy = [sum(dur[(r, i)] for i, ins in enumerate(s) if ins.kind in (Kind.F, Kind.B)) for r, s in enumerate(plan.ranks)]
    assert m["busy_s"] == pytest.approx([busy[0] + moved, busy[1]])
    assert m["bubble_fraction"] == pytest.approx(1 - (sum(busy) + moved) / (2 * m["step_s"]))
    kinds = {k["kind"]: k for k in out["kinds"]}
    n = {k: sum(ins.kind == k for s in plan.ranks for ins in s) for k in (Kind.F, Kind.B, Kind.RECV_GRAD)}
    assert kinds["F"]["measured_s"] == pytest.approx(0.01 * n[Kind.F] + 0.004 + 0.001)
    assert kinds["B"]["measured_s"] == pytest.approx(0.02 * n[Kind.B] + 0.003 + 0.0015)
    assert kinds["RECV_GRAD"]["measured_s"] == pytest.approx(0.005 * n[Kind.RECV_GRAD] - 0.007)
    # everything answered, inside units too, beside the model's answers: rank 0 serves the one
    # exchange, 4 layers of a full block of the slice's 64 queries over the shipped keys (the hand
    # profile's attention: ATT s per query-key pair; it has no p2p_cpu, so replies cost nothing)
    ex = s0[8]
    assert m["kv_served_s"] == pytest.approx([moved + 0.002, 0.0])
    assert out["predicted"]["kv_served_s"] == pytest.approx([4 * 64 * (ex.hi - ex.lo) * ATT, 0.0])
    # into which units: #15 (F1.2) and #18 (B0.2) the waits' before them, the last F (F1.3) and B (B1.0) the rest
    assert (s0[15].slice, s0[18].slice, s0[last_f].slice, s0[last_b].slice) == (2, 2, 3, 0)
    per_slice = {(k["kind"], k["slice"]): k["measured_s"] for k in out["slices"]}
    assert per_slice == pytest.approx({("F", 0): 0.04, ("F", 1): 0.04, ("F", 2): 0.044, ("F", 3): 0.041,
                                       ("B", 0): 0.0815, ("B", 1): 0.08, ("B", 2): 0.083, ("B", 3): 0.08})
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "outside their units (in waits and other instructions)" in text and "KV requests answered (attention block and reply" in text
    # a bad pair in an event: the line names the step and the event
    t["traceEvents"][0]["args"]["kv_served_s"] = [-1, 0]
    assert main(args[:-1] + [write(tmp_path, t, "bad_event.json")]) == 2
    err = capsys.readouterr().err
    assert f"step 0: event {t['traceEvents'][0]['name']!r} (rank 0 #0)'s args.kv_served_s is [-1, 0]" in err
    t["traceEvents"][0]["args"].pop("kv_served_s")
    # a pair that is not two seconds >= 0: one line naming it
    t["otherData"]["kv_served_after_s"][0][1] = [0.1]
    assert main(args[:-1] + [write(tmp_path, t, "bad.json")]) == 2
    err = capsys.readouterr().err
    assert "otherData.kv_served_after_s of rank 0 is [0.1]" in err and err.count("\n") == 1


def test_against_refuses_a_trace_of_another_plan(tmp_path, capsys):
    plan = compile_plan(spec("gpipe", 2, 2))
    # another number of ranks: said in those words
    four = compile_plan(spec("gpipe", 4, 4))
    save(plan, str(tmp_path / "plan.json"))
    tr = write(tmp_path, hand_trace(four, {(r, i): 0.001 for r, s in enumerate(four.ranks) for i in range(len(s))}),
               "four.json")
    assert main(["simulate", str(tmp_path / "plan.json"), "--against", tr]) == 2
    err = capsys.readouterr().err
    assert "the trace has 4 ranks and the plan 2: a trace of another plan?" in err and err.count("\n") == 1
    other = compile_plan(spec("gpipe", 2, 3))
    save(plan, str(tmp_path / "plan.json"))
    dur = {(r, i): 0.001 for r, s in enumerate(other.ranks) for i in range(len(s))}
    tr = write(tmp_path, hand_trace(other, dur), "other.json")
    assert main(["simulate", str(tmp_path / "plan.json"), "--against", tr]) == 2
    err = capsys.readouterr().err
    assert "outside the plan" in err and err.count("\n") == 1


def test_profile_command_refuses_bad_options_in_one_line(tmp_path, capfd):
    for argv, says in ((["--scale", "0"], "--scale"), (["-o", str(tmp_path / "nowhere" / "p.json")], "does not exist"),
                       (["--model", "llama-9b"], "llama-9b"),
                       # the measuring subprocess refuses it, in slimpipe's name (it said executor.profile)
                       (["--device", "cuda", "-o", str(tmp_path / "c.json")],
                        "slimpipe profile: error: --device cuda but no CUDA device is available")):
        assert main(["profile", *argv]) == 2
        err = capfd.readouterr().err
        assert says in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_stage_runner_measures_through_the_executors_stage():
    """The profiler's whole-unit measurement drives executor.stage.Stage alone (no KV-exchange
    partners): it must run, not crash, and give positive forward/backward times."""
    import torch

    from executor.attention import pick_backend
    from executor.profile import _stage_runner

    cfg = resolve_model("tiny")
    be = pick_backend("auto", torch.device("cpu"))
    calls = []
    once = _stage_runner(cfg, torch.device("cpu"), torch.float32, be, 32, 1, lambda: None,
                         lambda *shape: torch.randn(*shape), lambda: calls.append("unit"))
    fwd, bwd, w = once()
    assert fwd > 0 and bwd > 0 and w == 0.0
    assert calls == ["unit", "unit"]  # evict runs before the forward and before the backward
    # split: the backward is the unit's I, then its W runs (the store's dW) after its own eviction
    calls = []
    once = _stage_runner(cfg, torch.device("cpu"), torch.float32, be, 32, 1, lambda: None,
                         lambda *shape: torch.randn(*shape), lambda: calls.append("unit"), split=True,
                         evict_weight=lambda: calls.append("w"))
    for _ in range(2):
        fwd, i, w = once()
        assert fwd > 0 and i > 0 and w > 0
    assert calls == ["unit", "unit", "w"] * 2
    # a config.json with a sliding window shorter than the length measured (Mistral's 4096 at 32
    # tokens here: the window 16) is measured too (the plan spec refused the runner's plan)
    once = _stage_runner(cfg.model_copy(update={"sliding_window": 16}), torch.device("cpu"), torch.float32, be, 32, 1,
                         lambda: None, lambda *shape: torch.randn(*shape))
    assert min(once()[:2]) > 0


def test_cache_eviction_writes_twice_the_last_level_cache(tmp_path):
    """cache_bytes reads the largest cache level sysfs lists (32 MiB where it lists none);
    evict_caches writes twice that on CPU and nothing on CUDA."""
    import torch

    from executor.profile import cache_bytes, evict_caches

    for level, size in ((1, "32K"), (2, "1024K"), (3, "16384K")):
        d = tmp_path / f"index{level}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "size").write_text(size + "\n")
    (tmp_path / "uevent").write_text("")  # not a cache folder: skipped
    assert cache_bytes(str(tmp_path)) == 16 << 20
    assert cache_bytes(str(tmp_path / "missing")) == 32 << 20
    # one level (W's eviction: the per-core cache), 1 MiB where sysfs does not list it
    assert cache_bytes(str(tmp_path), level=2) == 1 << 20 and cache_bytes(str(tmp_path), level=1) == 32 << 10
    assert cache_bytes(str(tmp_path), level=4) == 1 << 20
    assert evict_caches(torch.device("cuda")) is None and callable(evict_caches(torch.device("cpu")))
    assert callable(evict_caches(torch.device("cpu"), level=2))


def test_profile_spreads_each_figure_over_rounds(monkeypatch):
    """measure_compute in 2 rounds at 32 tokens, scale 0.1: every figure takes its runs from both
    rounds (the progress line names them in order), the units' runners are built once and kept, and
    the evictions are the closed form: reps_for = 3, cold_runs = 3, so 2 turns a round; a turn runs
    the 1-, 3- and split 2-layer units (2 full evictions each, W 1 of the core's cache): 4 turns x 6
    = 24 full and 4 per-core; the head 2 rounds x 2 variants x (2 forwards + 2 backwards) = 16."""
    import torch

    from executor import profile as EP
    from executor.attention import pick_backend

    assert (EP.reps_for(32, 0.1), EP.cold_runs(32, 0.1), EP.per_round(3, 2)) == (3, 3, 2)
    assert (EP.reps_for(32, 1.0), EP.cold_runs(32, 1.0), EP.cold_runs(1024, 1.0), EP.per_round(12, 4)) == (30, 12, 3, 3)
    evictions = {None: 0, 2: 0}

    def counting(device, level=None):
        def evict():
            evictions[level] += 1
        return evict

    built = []
    runner = EP._stage_runner
    monkeypatch.setattr(EP, "evict_caches", counting)
    monkeypatch.setattr(EP, "_stage_runner", lambda *a, **k: built.append(a[5]) or runner(*a, **k))
    steps = []
    prog = EP.Progress(8, quiet=True)
    prog.step = steps.append
    cfg = resolve_model("tiny").model_copy(update={"layers": 4})
    out = EP.measure_compute(cfg, torch.device("cpu"), torch.float32, (32,), 0.1, prog, rounds=2)
    assert steps == [f"round {k}/2: {what}" for k in (1, 2) for what in
                     ("matmul, 32 tokens", "attention, 32 queries", "stage units, 32 tokens", "head, 32 tokens")]
    assert built == [1, 3, 2]  # one runner per unit, kept for the second round
    assert evictions == {None: 40, 2: 4}
    assert [r[0] for r in out["layer"]] == [32] and len(out["weight"]) == len(out["head"]) == 1
    assert sorted((p, c, q, k) for p, c, q, k, _ in out["attention"]) == [
        ("bwd", 0, 32, 32), ("bwd", 1, 32, 32), ("fwd", 0, 32, 32), ("fwd", 1, 32, 32)]
    assert len(out["round_speed"]["matmul"]) == len(out["round_speed"]["unit"]) == 2
    assert out["attention_backend"] == pick_backend("auto", torch.device("cpu"), torch.float32).name


def test_round_speed_and_the_note_it_gives():
    """round_speed: per round, the median over points of that round's median / all rounds' median;
    the CLI's note names a figure whose rounds moved more than 10%."""
    from compiler.cli.cmd_profile import speed_moved
    from executor.profile import round_speed

    # pooled medians: a 1.0 (1, 1, 3), b 2.0; round 1 runs both at their median, round 2 a at 3x, b at 1x
    assert round_speed([{"a": [1.0, 1.0], "b": [2.0]}, {"a": [3.0], "b": [2.0, 2.0]}]) == [1.0, 2.0]
    assert round_speed([{"a": [1.0]}, {}]) == [1.0, 1.0]
    assert speed_moved({"matmul": [0.96, 1.34], "unit": [0.95, 1.05]}) == "matmul rounds took 0.96-1.34x their median"
    assert speed_moved({"matmul": [0.91, 1.09]}) == "" and speed_moved({}) == ""


def test_processor_sharing_ends_at_large_clocks():
    """Units of hours on a clock of hours: when a unit's remaining work was below the float step at
    the current time, the shared replay's clock stopped moving (dt = 0) and it looped forever (a new
    user's `compile --device-profile cpu.json` of llama-7b at 32K). The same plan at 1/1000 of the
    costs gives the same schedule, so the makespans scale exactly up to rounding."""
    import threading

    plan = compile_plan(spec("gpipe", 3, 4))
    flat = plan.with_ranks([tuple(i for i in s if i.kind in (Kind.F, Kind.B)) for s in plan.ranks])
    # costs found by a random search that made the old loop stick (seed 0, trial 727)
    hours = {"0 F mb0 s0 c0": 9651.615917317193, "1 F mb0 s0 c0": 10693.334942803254,
             "2 F mb0 s0 c0": 7164.7331948488245, "2 F mb1 s0 c0": 12658.820577028711,
             "0 F mb1 s0 c0": 10523.233206324609, "1 F mb1 s0 c0": 8415.114439971623,
             "1 F mb2 s0 c0": 14984.982347563966, "2 F mb2 s0 c0": 5185.528349237852,
             "0 F mb2 s0 c0": 13937.11728925591, "2 F mb3 s0 c0": 12359.329369014338,
             "1 F mb3 s0 c0": 5216.77752676688, "0 F mb3 s0 c0": 6268.3521928446935,
             "2 B mb0 s0 c0": 14145.273731850975, "1 B mb0 s0 c0": 14142.703070386675,
             "0 B mb0 s0 c0": 13070.00965447121, "2 B mb1 s0 c0": 14546.391905504952,
             "0 B mb1 s0 c0": 8866.80128180053}
    out = {}

    def run(scale, key):
        out[key] = replay_shared(flat, lambda r, i: hours.get(f"{r} {i}", 10000.0) * scale, 2)

    th = threading.Thread(target=run, args=(1.0, "hours"), daemon=True)
    th.start()
    th.join(30)
    assert "hours" in out, "replay_shared did not finish"
    run(1e-3, "seconds")
    assert out["hours"].makespan == pytest.approx(1e3 * out["seconds"].makespan, rel=1e-9)
    assert out["hours"].busy == pytest.approx([1e3 * b for b in out["seconds"].busy], rel=1e-9)


# ---------------------------------------------------------------- the dtype a measured profile was taken in

def test_a_measured_profiles_dtype_is_every_commands_default(tmp_path, monkeypatch):
    """simulate, compile's exchange levelling, compare and tune size messages and memory with the
    dtype the profile was measured in (fp32 here: 4 bytes), not bf16's 2 bytes, when no --dtype is
    given; a built-in profile keeps bf16."""
    from passes import costs as C
    from passes.costs import profile_dtype_bytes

    assert profile_dtype_bytes(load_profile("h100")) == 2 and profile_dtype_bytes(None, 4) == 4
    d = measured_profile(2)
    assert profile_dtype_bytes(load_profile(write(tmp_path, d, "none.json"))) == 2  # no dtype recorded
    d["measured"]["dtype"] = "fp32"
    fp32 = write(tmp_path, d, "fp32.json")
    assert profile_dtype_bytes(load_profile(fp32)) == 4
    seen = []
    real_init = C.CostModel.__init__

    def spy(self, *a, **kw):
        real_init(self, *a, **kw)
        seen.append(self.bytes)  # what it sizes messages with, however the caller chose it

    monkeypatch.setattr(C.CostModel, "__init__", spy)
    plan = compile_plan(spec("slimpipe", 2, 2, n=4, seq_len=256, exchange=True), fp32)
    assert seen and set(seen) == {4}, seen  # the levelling priced in fp32
    seen.clear()
    from passes.trace import chrome_trace

    chrome_trace(plan, load_profile(fp32))  # `slimpipe trace` and `plot` draw what simulate prices
    assert seen and set(seen) == {4}, seen
    seen.clear()
    compile_plan(spec("slimpipe", 2, 2, n=4, seq_len=256, exchange=True), "h100")
    assert seen and set(seen) == {2}, seen


def test_compare_sizes_memory_in_the_profiles_dtype(tmp_path, capsys):
    """compare's peak memory is the memory model's at the profile's dtype: 4 bytes for an fp32
    profile (3818496 B at bf16, 4341760 B at fp32 for tiny 1f1b p=2 m=2 seq 64)."""
    from compiler.search import exact_peak_memory

    one = spec("1f1b", 2, 2)
    d = measured_profile(2)
    for dt, nbytes in (("bf16", 2), ("fp32", 4)):
        d["measured"]["dtype"] = dt
        path = write(tmp_path, d, f"{dt}.json")
        assert main(["compare", "--model", "tiny", "--pp", "2", "--microbatches", "2", "--seq-len", "64",
                     "--schedules", "1f1b", "--device-profile", path, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        (row,) = out["rows"]
        assert out["dtype"] == dt
        assert row["peak_memory_bytes"] == exact_peak_memory(one, nbytes) == {2: 3818496, 4: 4341760}[nbytes]
    # --dtype overrides the profile's (d is the fp32 profile now)
    assert main(["compare", "--model", "tiny", "--pp", "2", "--microbatches", "2", "--seq-len", "64",
                 "--schedules", "1f1b", "--device-profile", path, "--dtype", "bf16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"][0]["peak_memory_bytes"] == 3818496
    assert main(["tune", "--model", "tiny", "--gpus", "2", "--seq-len", "64", "--device-profile", path,
                 "--schedules", "1f1b", "--time-limit", "20", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["dtype"], got["dtype_bytes"]) == ("fp32", 4)


@pytest.mark.parametrize("cmd", [["compare", "--pp", "2"], ["tune", "--gpus", "2"]])
def test_unknown_dtype_option_is_one_line(cmd, capsys):
    assert main([*cmd, "--model", "tiny", "--seq-len", "64", "--dtype", "fp8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("error: --dtype 'fp8' is unknown; allowed: bf16, fp16, fp32") and "\n" not in err


def test_unknown_measured_dtype_is_one_line(tmp_path, capsys):
    d = measured_profile(2)
    d["measured"]["dtype"] = "int8"
    path = write(tmp_path, d)
    with pytest.raises(SpecError, match=r"measured\.dtype=\"int8\" is unknown; allowed: bf16, fp16, fp32"):
        load_profile(path)
