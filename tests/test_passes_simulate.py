"""Timed simulation: the bubble split, exchange vs none, and the CLI's JSON shape."""
import json

import pytest

from compiler import build_spec, compile_plan, resolve_model
from compiler.cli import main
from passes.simulate import simulate_timed, simulate_units, strip_exchanges

KEYS = {"params", "grads", "optimizer", "activations", "kv_cache", "kv_grads", "logits", "weight_grad_inputs"}


def plan_70b(exchange, v=1):
    m = resolve_model("llama-70b")
    return compile_plan(build_spec("slimpipe", m, pp=8, microbatches=1, slices=32, virtual_stages=v,
                                   seq_len=524288, exchange=exchange))


@pytest.mark.parametrize("v", [1, 2])
def test_exchange_brings_bubble_towards_bound(v):
    bound = 7 / (v * 32 + 7)
    a, b = simulate_timed(plan_70b(False, v)), simulate_timed(plan_70b(True, v))
    assert b["bubble_fraction"] - bound < 0.5 * (a["bubble_fraction"] - bound)
    assert b["step_s"] < a["step_s"]
    for o in (a, b):
        bd = o["bubble_breakdown"]
        assert sum(bd.values()) == pytest.approx(o["bubble_fraction"])
        # idle ranks that help take the bubble below the schedule's own: ideal is clamped to it
        assert bd["ideal"] == pytest.approx(min(bound, o["bubble_fraction"]), rel=0.02)


def test_cli_json(tmp_path, capsys):
    plan = str(tmp_path / "p.json")
    assert main(["compile", "--schedule", "slimpipe", "--pp", "4", "--microbatches", "4", "--slices", "4",
                 "--model", "llama-7b", "--seq-len", "16384", "-o", plan]) == 0
    capsys.readouterr()
    assert main(["simulate", plan, "--device-profile", "a100", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"step_s", "bubble_fraction", "bubble_breakdown", "mfu", "ranks"} <= set(out)
    assert set(out["bubble_breakdown"]) == {"ideal", "imbalance", "comm"}
    assert 0 < out["mfu"] < 1
    for r in out["ranks"]:
        assert {"rank", "busy_s", "peak_memory_bytes", "memory_breakdown"} <= set(r)
        assert set(r["memory_breakdown"]) == KEYS
    assert main(["simulate", plan, "--unit-costs", "--json"]) == 0
    u = json.loads(capsys.readouterr().out)
    import ir
    ex = ir.load(plan).meta["exchanges"]
    assert set(u) == {"makespan", "bubble_fraction", "ranks"} | ({"kv_exchanges"} if ex else set())
    assert u.get("kv_exchanges", 0) == ex
    assert main(["simulate", plan, "--device-profile", "nope"]) == 2
    assert main(["simulate", plan, "--dtype", "int4"]) == 2


def test_breakdown_with_exchange_and_several_microbatches():
    # m > 1 with exchange: the ideal part is the schedule's own bubble (KV rendezvous removed), so
    # it equals the uniform-cost bound, or the whole bubble where helpers took it below that; no
    # part is negative and the three sum to the bubble
    m = resolve_model("llama-70b")
    plan = compile_plan(build_spec("slimpipe", m, pp=8, microbatches=4, slices=32, seq_len=524288, tp=8,
                                   exchange=True))
    assert plan.meta.get("exchanges", 0) > 0
    o = simulate_timed(plan)
    bd = o["bubble_breakdown"]
    assert min(bd.values()) >= 0
    assert sum(bd.values()) == pytest.approx(o["bubble_fraction"])
    assert bd["ideal"] == pytest.approx(min(7 / (4 * 32 + 7), o["bubble_fraction"]), rel=0.02)
    # unit costs price no attention: the exchanges' rendezvous only add waits there (501 units
    # against 405), and the figures without them are the schedule's own, (p-1)/(m n + p-1) = 7/135
    u, bare = simulate_units(plan), simulate_units(strip_exchanges(plan))
    assert u["makespan"] == 501 and u["kv_exchanges"] == plan.meta["exchanges"] == 1658
    assert bare["makespan"] == 405 and bare["kv_exchanges"] == 0
    assert bare["bubble_fraction"] == pytest.approx(7 / 135, abs=1e-12)
