"""Hugging Face checkpoints in the executor's model (in-process): the config maps onto the plan's
model, each stage loads only its tensors, and our model's loss and gradients equal transformers'
own on the same batch (fp32)."""
import json
import os

import pytest
import torch

import ir
from compiler import resolve_model
from compiler.layout import build_spec
from executor import hf, model as M
from executor.data import Synthetic

from hf_models import ARCHS, config_path, edit_config, make


VARIANTS = {"llama": {}, "qwen2": {}, "mistral": {}, "qwen3": {},
            "llama-tied-bias-llama3rope": dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                                               rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                                "original_max_position_embeddings": 8})}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    base = tmp_path_factory.mktemp("hf")
    return {a: make(a.split("-")[0], str(base / a), shard=a == "qwen2", **VARIANTS[a]) for a in VARIANTS}


def spec_of(hf_dir, pp=2, m=2, seq=16, **kw):
    return build_spec("1f1b", resolve_model(config_path(hf_dir)), pp=pp, microbatches=m, slices=1, virtual_stages=1,
                      seq_len=seq, **kw)


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("arch", list(VARIANTS))
def test_our_model_equals_transformers(ckpts, arch):
    d = ckpts[arch]
    spec = spec_of(d, pp=1)
    hf.check_matches(spec, d)
    (P,) = hf.load_stage_params(d, spec, [0], "cpu", torch.float32)
    src = Synthetic(spec)
    loss = M.reference_loss(spec, P, 0, batch=lambda mb: src.batch(0, mb))
    loss.backward()
    ref_loss, ref = hf.reference(d, spec, lambda mb: src.batch(0, mb), "cpu")
    assert abs(float(loss.detach()) - ref_loss) / ref_loss < 1e-5
    assert set(ref) == set(P)
    worst = max(rel(P[n].grad, ref[n]) for n in P)
    assert worst < 1e-4, worst


def test_each_rank_reads_only_its_shards(ckpts, monkeypatch):
    d = ckpts["qwen2"]
    index = json.load(open(os.path.join(d, hf.INDEX)))["weight_map"]
    assert len(set(index.values())) > 2  # really sharded
    spec = spec_of(d)
    opened = []
    import safetensors

    real = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda path, **kw: (opened.append(os.path.basename(path)), real(path, **kw))[1])
    (P,) = hf.load_stage_params(d, spec, [1], "cpu", torch.float32)
    assert "embed" not in P and "lm_head" in P and "layers.3.bq" in P and "layers.0.wq" not in P
    want = {index[hf.hf_name(n)] for n in P}
    assert set(opened) == want and want != set(index.values())


MISMATCH = [
    (dict(hidden_size=64), "config.json gives hidden_size=64 but the plan's model has hidden=32"),
    (dict(rms_norm_eps=1e-5), "rms_norm_eps=1e-05 but the plan's model has rms_eps=1e-06"),
    (dict(model_type="gpt_neox"), "model_type='gpt_neox' is not supported"),
]


@pytest.mark.parametrize("change,needle", MISMATCH)
def test_config_not_matching_the_plan(ckpts, tmp_path, change, needle):
    spec = spec_of(ckpts["llama"])
    d = make("llama", str(tmp_path / "m"))
    edit_config(d, **change)
    with pytest.raises(ir.SpecError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        hf.check_matches(spec, d)


def test_checkpoint_problems_are_one_line(ckpts, tmp_path):
    d = make("qwen2", str(tmp_path / "m"), shard=True)
    spec = spec_of(d)
    shards = sorted(f for f in os.listdir(d) if f.startswith("model-"))
    os.remove(os.path.join(d, shards[1]))
    with pytest.raises(ir.SpecError, match="shard model-00002-of-.* listed in model.safetensors.index.json is missing"):
        hf.load_stage_params(d, spec, [0], "cpu", torch.float32)
    # a checkpoint of another size than its config
    d2 = make("llama", str(tmp_path / "m2"))
    spec2 = spec_of(d2)
    edit_config(d2, intermediate_size=128)
    spec3 = spec_of(d2)
    with pytest.raises(ir.SpecError, match=r"tensor model.layers.0.mlp.gate_proj.weight has shape \[64, 32\] but "
                                           r"the plan's model needs \[128, 32\]"):
        hf.load_stage_params(d2, spec3, [0], "cpu", torch.float32)
    assert spec2.model.ffn == 64
    with pytest.raises(ir.SpecError, match="no config.json"):
        hf.read_config(str(tmp_path))


@pytest.mark.parametrize("fields", [{}, dict(attention_bias=True, rope_theta=5e5, rms_norm_eps=1e-5),
                                    dict(model_type="qwen2"), dict(model_type="qwen3", head_dim=16)])
def test_export_of_a_model_trained_from_scratch(tmp_path, fields):
    """A plan compiled from a config.json (no --hf-model): --export-hf writes a config transformers
    reads as the same model (hf_config), so its loss and gradients equal ours on the exported weights."""
    from compiler import compile_plan
    from executor import cli as ecli, runner

    cfg = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "intermediate_size": 64, "vocab_size": 96, **fields}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec = build_spec("slimpipe", resolve_model(str(tmp_path / "config.json")), pp=2, microbatches=2, slices=2,
                      virtual_stages=1, seq_len=16)
    out = str(tmp_path / "export")
    code, _ = runner.run_local(compile_plan(spec), ecli.options(export_hf=out, device="cpu", quiet=True, steps=2))
    assert code == 0
    assert hf.read_config(out) == spec.model.model_copy(update={"name": hf.read_config(out).name})
    one = build_spec("1f1b", spec.model, pp=1, microbatches=2, slices=1, virtual_stages=1, seq_len=16)
    (P,) = hf.load_stage_params(out, one, [0], "cpu", torch.float32)
    src = Synthetic(one)
    loss = M.reference_loss(one, P, 5, batch=lambda mb: src.batch(5, mb))
    loss.backward()
    ref_loss, ref = hf.reference(out, one, lambda mb: src.batch(5, mb), "cpu")
    assert abs(float(loss.detach()) - ref_loss) / ref_loss < 1e-5
    assert max(rel(P[n].grad, ref[n]) for n in P) < 1e-4
