"""Memory model: exact breakdowns against its closed forms and the SlimPipe artifact row."""
import pytest

from compiler import build_spec, compile_plan, resolve_model
from passes.memory import layer_params, memory_report, per_token_layer, rank_params

GIB = 2 ** 30


def artifact_plan():
    # SlimPipe artifact: Llama-13B (its tokenizer: vocab 128256), 256K, t=1, c=8, p=8, d=2, n=16, v=5
    m = resolve_model("llama-13b", {"vocab": 128256})
    return compile_plan(build_spec("slimpipe", m, pp=8, microbatches=16, slices=16, virtual_stages=5,
                                   seq_len=262144, tp=1, cp=8, dp=2))


def test_artifact_row_categories():
    plan = artifact_plan()
    rep = memory_report(plan)
    r0, r7 = rep[0]["memory_breakdown"], rep[7]["memory_breakdown"]
    m = plan.spec.model
    n_params = 5 * layer_params(m) + m.vocab * m.hidden
    assert rank_params(plan.spec, 0) == n_params
    assert r0["params"] + r0["grads"] == 6 * n_params
    assert (r0["params"] + r0["grads"]) / GIB == pytest.approx(12.53, abs=0.01)   # artifact 12.53
    assert r0["optimizer"] / GIB == pytest.approx(1.57, abs=0.01)                 # artifact 1.57
    # rank 0 holds n*v + 2(p-1) = 94 units of one layer and 2048 local tokens each
    act, kv = per_token_layer(m)
    assert r0["activations"] == 94 * 2048 * act
    assert r0["kv_cache"] == 94 * 2048 * kv
    assert (r0["activations"] + r0["kv_cache"]) / GIB == pytest.approx(29.56, abs=0.05)  # artifact 29.56
    assert r7["logits"] == 2 * 4 * 2048 * 128256                                      # artifact 1.96 GiB
    assert r7["logits"] / GIB == pytest.approx(1.96, abs=0.01)


def test_breakdown_sums_to_peak_and_units_release():
    m = resolve_model("tiny")
    plan = compile_plan(build_spec("1f1b", m, pp=4, microbatches=8, seq_len=128))
    for r in memory_report(plan):
        assert sum(r["memory_breakdown"].values()) == pytest.approx(r["peak_memory_bytes"])
    # 1F1B: rank 0 holds min(p, m) = 4 micro-batches of 2 layers at the peak
    act, kv = per_token_layer(m)
    assert memory_report(plan)[0]["memory_breakdown"]["activations"] == 4 * 2 * 128 * act


def test_seq1f1b_halves_1f1b_activations():
    m = resolve_model("llama-7b")
    kw = dict(pp=4, microbatches=8, seq_len=32768)
    a = memory_report(compile_plan(build_spec("1f1b", m, **kw)))[0]["memory_breakdown"]
    b = memory_report(compile_plan(build_spec("seq1f1b", m, slices=4, **kw)))[0]["memory_breakdown"]
    # 1F1B rank 0: 4 whole sequences; Seq1F1B: p + n - 1 = 7 quarter-sequence slices
    assert b["activations"] / a["activations"] == pytest.approx(7 / 16)
