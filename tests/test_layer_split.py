"""Layer split over stages: uniform, and balanced by the cost model (issue: stages balanced by cost)."""
import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compiler import build_spec, compile_plan, resolve_model
from compiler.cli import main
from passes.simulate import simulate_timed
from passes.costs import load_profile
from passes.partition import balanced_layers, stage_costs, uniform_layers

H100 = load_profile("h100")


def slowest(split, layer_s, first_s, last_s):
    extra = [0.0] * len(split)
    extra[0] += first_s
    extra[-1] += last_s
    return max(k * layer_s + e for k, e in zip(split, extra))


@settings(max_examples=150, deadline=None)
@given(stages=st.integers(1, 5), more=st.integers(0, 6), layer_s=st.floats(0.1, 10), first_s=st.floats(0, 20),
       last_s=st.floats(0, 40))
def test_balanced_is_the_best_split_by_brute_force(stages, more, layer_s, first_s, last_s):
    layers = stages + more
    got = balanced_layers(layers, layer_s, first_s, last_s, stages)
    assert sum(got) == layers and min(got) >= 1 and len(got) == stages
    best = min(slowest(c, layer_s, first_s, last_s)
               for c in itertools.product(range(1, layers + 1), repeat=stages) if sum(c) == layers)
    assert slowest(got, layer_s, first_s, last_s) == pytest.approx(best, rel=1e-9)
    # never slower than the uniform split, and uniform whenever uniform is already best
    uni = uniform_layers(layers, stages)
    if slowest(uni, layer_s, first_s, last_s) <= best * (1 + 1e-9):
        assert got == uni


def test_llama7b_large_vocab_figures():
    """llama-7b, 128256-token vocabulary, 4K, 1f1b p=8 m=8, h100: the LM head is worth 2.3 layers.
    Uniform: 4 layers everywhere, the last rank busy 0.408 s (8 x 0.0510 s); balanced moves layers
    off the last stage and the simulated step drops by more than 15%."""
    model = resolve_model("llama-7b", {"vocab": 128256})
    layer_s, first_s, last_s = stage_costs(model, [4096], H100)
    assert last_s / layer_s == pytest.approx(2.3107, rel=1e-3)
    steps = {}
    for kind in ("uniform", "balanced"):
        spec = build_spec("1f1b", model, pp=8, microbatches=8, seq_len=4096, layer_split_kind=kind)
        steps[kind] = simulate_timed(compile_plan(spec), H100)["step_s"]
        if kind == "balanced":
            assert spec.stage_layers == (5, 5, 4, 4, 4, 4, 4, 2) and spec.layer_split == "balanced"
    assert steps["balanced"] <= 0.85 * steps["uniform"], steps
    assert steps["uniform"] == pytest.approx(0.6434, rel=1e-3)


def test_llama70b_512k_balanced_no_worse():
    """80 layers on 64 stages at 512K: attention dominates, no split beats uniform's 2-layer stages."""
    model = resolve_model("llama-70b")
    spec = build_spec("slimpipe", model, pp=16, microbatches=16, slices=32, virtual_stages=4, seq_len=524288,
                      tp=8, layer_split_kind="balanced")
    assert spec.stage_layers == uniform_layers(80, 64)


def test_cli_layer_split(tmp_path, capsys):
    out = tmp_path / "p.json"
    code = main(["compile", "--schedule", "1f1b", "--pp", "2", "--microbatches", "2", "--model", "tiny",
                 "--vocab", "8192", "--layer-split", "balanced", "-o", str(out), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["layer_split"] == "balanced" and summary["stage_layers"] == [7, 1]
    assert json.loads(out.read_text())["spec"]["stage_layers"] == [7, 1]
    code = main(["compile", "--schedule", "1f1b", "--pp", "8", "--microbatches", "8", "--model", "llama-7b",
                 "--vocab", "128256", "--seq-len", "4096", "--layer-split", "balanced", "-o", str(out)])
    assert code == 0 and "model llama-7b (32 layers; balanced split, layers per stage 5 x2, 4 x5, 2), seq 4096" in \
        capsys.readouterr().out  # the human line says which split (the issue's llama-7b case)
    code = main(["compile", "--schedule", "1f1b", "--pp", "4", "--microbatches", "4", "--model", "llama-7b",
                 "--seq-len", "65536", "--layer-split", "balanced", "-o", str(out)])
    assert code == 0 and "balanced split, layers per stage 8 x4 (the uniform split's)" in capsys.readouterr().out
    code = main(["compile", "--schedule", "1f1b", "--pp", "2", "--microbatches", "2", "--layer-split", "even",
                 "-o", str(tmp_path / "q.json")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--layer-split 'even'" in err[0] and "uniform, balanced" in err[0]
    assert not (tmp_path / "q.json").exists()


def _tune(capsys, *argv):
    code = main(["tune", "--model", "llama-7b", "--vocab", "128256", "--tp", "1", "--cp", "1", "--schedules", "1f1b",
                 *argv])
    return code, capsys.readouterr().out


def test_tune_picks_balanced_and_says_so(tmp_path, capsys):
    """llama-7b, 128256-token vocabulary, 4K, 1f1b p=8 m=8: both splits are candidates, balanced is
    17% faster and tune picks it, in its JSON, its table and the written plan's spec."""
    out = tmp_path / "best.json"
    code, text = _tune(capsys, "--seq-len", "4096", "--gpus", "8", "--pp", "8", "--global-batch", "8", "--json",
                       "-o", str(out))
    assert code == 0
    d = json.loads(text)
    assert d["space"]["layer_splits"] == ["uniform", "balanced"]
    assert [(r["layer_split"], round(r["step_s"], 4)) for r in d["top"]] == [("balanced", 0.5315), ("uniform", 0.6434)]
    assert d["families"][0]["best"]["layer_split"] == "balanced"
    spec = json.loads(out.read_text())["spec"]
    assert spec["layer_split"] == "balanced" and spec["stage_layers"] == [5, 5, 4, 4, 4, 4, 4, 2]
    code, text = _tune(capsys, "--seq-len", "4096", "--gpus", "8", "--pp", "8", "--global-batch", "8", "-o", str(out))
    head, first = [x for x in text.splitlines() if x.startswith(" # ") or x.startswith(" 1 ")]
    assert "layers" in head and first.split()[-1] == "balanced", first
    assert "layer split balanced" in text
    # narrowed to uniform: the uniform plan, no balanced candidate
    code, text = _tune(capsys, "--seq-len", "4096", "--gpus", "8", "--pp", "8", "--global-batch", "8", "--json",
                       "--layer-split", "uniform")
    assert [r["layer_split"] for r in json.loads(text)["top"]] == ["uniform"]


@pytest.mark.parametrize("seq,pick", [(4096, "balanced"), (256, "uniform")])
def test_tune_layer_split_tie_goes_to_less_memory(seq, pick, capsys):
    """m=1: a micro-batch crosses every stage once, so the step is the sum of all stages' work
    whatever the split: uniform and balanced tie (within 0.5%) and the plan needing less memory
    wins (tune's one tie rule). At 4K the last rank's logits make it the fullest and balanced,
    which gives it fewer layers, needs less; at 256 tokens rank 0 is the fullest and uniform does."""
    code, text = _tune(capsys, "--seq-len", str(seq), "--gpus", "8", "--pp", "8", "--global-batch", "1", "--json")
    rows = {r["layer_split"]: r for r in json.loads(text)["top"]}
    assert code == 0 and set(rows) == {"uniform", "balanced"}
    u, b = rows["uniform"], rows["balanced"]
    assert b["step_s"] == pytest.approx(u["step_s"], rel=1e-6)
    assert json.loads(text)["top"][0]["layer_split"] == pick
    other = "uniform" if pick == "balanced" else "balanced"
    assert rows[pick]["peak_memory_bytes"] < rows[other]["peak_memory_bytes"]


def test_tune_rejects_an_unknown_layer_split(capsys):
    code = main(["tune", "--model", "tiny", "--gpus", "8", "--layer-split", "uniform,even"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "'even'" in err[0] and "uniform, balanced" in err[0]
