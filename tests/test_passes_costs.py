"""Cost model closed forms, the Seq1F1B partition example, and profile validation."""
import json

import pytest

from compiler import build_spec, compile_plan, resolve_model
from ir import KV_HELPER, ModelConfig, SpecError
from passes.costs import PROFILES, CostModel, layer_flops, load_profile, model_forward_flops, unit_cost_table, unit_parts
from passes.partition import flops_partition

REF = ModelConfig(layers=24, hidden=4096, heads=32, kv_heads=32, ffn=16384, vocab=32000)


def test_seq1f1b_reference_partition():
    # MHA, plain two-matrix MLP: reproduces the reference's [4930, 4238, 3776, 3440]
    assert flops_partition(REF, 16384, 4, mlp_matrices=2) == [4930, 4238, 3776, 3440]
    assert flops_partition(REF, 16384, 4, mlp_matrices=2, elementwise=False) == [4930, 4238, 3776, 3440]


def test_forward_flops_match_seq1f1b_formula_without_elementwise():
    S, P = 3000, 10000  # slice of 3000 tokens ending at 10000
    H, h, d, V, F, L = 4096, 32, 128, 32000, 16384, 24
    theirs = 4 * S * H * V + L * (S * P * (4 * d + 3) * h - S * S * (4 * d + 3) * h / 2 + 8 * S * H * h * d + 4 * S * H * F)
    ours = model_forward_flops(REF, S, P - S, mlp_matrices=2, elementwise=False)
    assert ours == pytest.approx(theirs, rel=1e-12)


def test_gqa_and_swiglu_terms():
    m = resolve_model("llama-70b")
    mm, attn = layer_flops(m, 1, 0, elementwise=False)
    # 2H(H + 2*g*d) + 2H^2 + 6HF for one token
    assert mm == 2 * 8192 * (8192 + 2 * 8 * 128) + 2 * 8192 ** 2 + 6 * 8192 * 28672
    assert attn == (4 * 128 + 3) * 64 * 0.5


def test_flops_partition_slices_shrink_and_sum():
    m = resolve_model("llama-70b")
    lens = flops_partition(m, 524288, 32)
    assert sum(lens) == 524288 and all(a > b for a, b in zip(lens, lens[1:]))
    costs = [model_forward_flops(m, s, sum(lens[:j])) for j, s in enumerate(lens)]
    target = sum(costs) / len(costs)
    assert all(abs(c / target - 1) < 0.01 for c in costs[1:])


def test_exchange_moves_work_without_creating_it():
    m = resolve_model("llama-7b")
    kw = dict(pp=4, microbatches=4, slices=8, seq_len=65536)
    a = compile_plan(build_spec("slimpipe", m, **kw))
    b = compile_plan(build_spec("slimpipe", m, exchange=True, **kw))
    cm = CostModel(a.spec, PROFILES["h100"])
    ta, tb = unit_cost_table(a, cm), unit_cost_table(b, cm)
    helped = sum(cm.help_time(r, i) for r, st in enumerate(b.ranks) for i in st if i.kind in KV_HELPER)
    assert helped > 0  # idle ranks help here (p=4 at m=4 has warm-up and cool-down steps)
    assert sum(ta.values()) == pytest.approx(sum(tb.values()) + helped, rel=1e-9)
    owners = [(r, "F" if i.kind == "KVF_SEND" else "B", i.mb, i.slice, i.chunk)
              for r, st in enumerate(b.ranks) for i in st if i.kind in ("KVF_SEND", "KVB_SEND")]
    assert owners and all(tb[k] < ta[k] for k in owners)


def test_parallel_degrees_divide_compute():
    m = resolve_model("llama-7b")
    h100 = PROFILES["h100"]
    f1 = unit_parts(m, 8192, 0, False, 1, 1, h100, layers=8)
    f4 = unit_parts(m, 8192, 0, False, 4, 1, h100, layers=8)
    assert f4[0] == pytest.approx(f1[0] / 4) and f4[1] == pytest.approx(f1[1] / 4)
    assert f1[3] == 0 and f4[3] > 0  # tp collectives appear only with tp > 1


def test_profile_files(tmp_path):
    assert load_profile("a100").peak_flops == 312e12
    good = dict(PROFILES["h100"].to_json(), name="mine", mm_efficiency=0.5)
    f = tmp_path / "p.json"
    f.write_text(json.dumps(good))
    assert load_profile(str(f)).mm_efficiency == 0.5
    for bad in (dict(good, mm_efficiency=1.5), dict(good, peak_flops=-1), dict(good, foo=1)):
        f.write_text(json.dumps(bad))
        with pytest.raises(SpecError):
            load_profile(str(f))
    with pytest.raises(SpecError, match="allowed: h100, a100"):
        load_profile("v100")


def test_cp_ring_pays_latency_and_small_blocks():
    """Context parallelism is not free on tiny slices (issue 17): each of the ring's cp-1 steps per
    layer (2(cp-1) in backward) pays the link latency, and chunks shorter than a flash tile cost a
    whole tile."""
    from passes.costs import FLASH_TILE

    m, h100 = resolve_model("tiny"), PROFILES["h100"]
    for bwd in (False, True):
        _, a1, r1, _ = unit_parts(m, 32, 64, bwd, 1, 1, h100, layers=4)
        _, a4, r4, _ = unit_parts(m, 32, 64, bwd, 1, 4, h100, layers=4)
        steps = 3 * (2 if bwd else 1)
        kv = 2 * m.kv_heads * (m.hidden // m.heads) * 96 * 2
        assert r1 == 0
        assert r4 == pytest.approx(4 * (0.75 * kv / h100.intra_bandwidth * (2 if bwd else 1) + steps * h100.p2p_latency))
        # 32 tokens over 2*4 chunks of 4 queries: each padded to a 128-query tile
        assert a4 == pytest.approx(a1 / 4 * FLASH_TILE / 4)
    # a whole step: cp=4 on the tiny model is slower than cp=1, not faster
    kw = dict(pp=2, microbatches=2, seq_len=128)
    from passes.simulate import simulate_timed

    t1 = simulate_timed(compile_plan(build_spec("1f1b", m, **kw)), h100)["step_s"]
    t4 = simulate_timed(compile_plan(build_spec("1f1b", m, cp=4, **kw)), h100)["step_s"]
    assert t4 > t1
    # a long slice keeps its tiles full: the padding factor is 1
    big = resolve_model("llama-7b")
    _, b1, _, _ = unit_parts(big, 8192, 0, False, 1, 1, h100)
    _, b8, _, _ = unit_parts(big, 8192, 0, False, 1, 8, h100)
    assert b8 == pytest.approx(b1 / 8)
