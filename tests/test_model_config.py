"""Every config.json field that changes the model is honoured (IR, cost and memory models, executor)
or refused with one line naming it (issue 15, fault 2)."""
import json
import math

import pytest

import ir
from compiler import compile_plan, resolve_model
from compiler.cli import main
from compiler.layout import build_spec
from executor import cli as ecli, model as M, runner
from passes.costs import layer_flops
from passes.memory import layer_params, per_token_layer, rank_params

BASE = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100}
H, h, g, F, V = 64, 4, 2, 128, 100


def model_of(tmp_path, **fields):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**BASE, **fields}))
    return resolve_model(str(path))


def compile_cli(tmp_path, capsys, cfg, *extra):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "p.json"
    code = main(["compile", "--schedule", "1f1b", "--pp", "2", "--microbatches", "2", "--model", str(path),
                 "--seq-len", "32", "-o", str(out), *extra])
    _, err = capsys.readouterr()
    return code, err, out


def test_head_dim_apart_from_hidden_over_heads(tmp_path):
    """Qwen3-style head_dim 128 with hidden/heads = 16: parameters, K/V bytes, FLOPs and the
    executor's shapes all use 128."""
    m = model_of(tmp_path, head_dim=128)
    assert (m.head_dim, m.q_dim, m.kv_dim) == (128, 512, 256)
    d = 128
    assert layer_params(m) == H * (h * d + 2 * g * d) + h * d * H + 3 * H * F + 2 * H == 123008
    assert layer_params(model_of(tmp_path)) == 36992  # head_dim 16
    assert per_token_layer(m, 2, "executor")[1] == 2 * g * d * 2 == 1024
    mm, attn = layer_flops(m, 10, 0)
    assert attn == (4 * d + 3) * h * 50
    assert M.param_shape(m, "layers.0.wq") == (512, 64) and M.param_shape(m, "layers.0.wo") == (64, 512)
    # an explicit head_dim stays under --heads overrides; a redundant one (= hidden / heads) scales
    model_of(tmp_path, head_dim=128)
    assert resolve_model(str(tmp_path / "config.json"), {"heads": 8}).head_dim == 128
    model_of(tmp_path, head_dim=16)
    assert resolve_model(str(tmp_path / "config.json"), {"heads": 8}).head_dim == 8


def test_biases_qk_norm_tie_in_parameter_count(tmp_path):
    base = layer_params(model_of(tmp_path))
    d = 16
    assert layer_params(model_of(tmp_path, attention_bias=True)) - base == (h + 2 * g) * d + H
    assert layer_params(model_of(tmp_path, mlp_bias=True)) - base == 2 * F + H
    q2 = model_of(tmp_path, model_type="qwen2")
    assert (q2.qkv_bias, q2.o_bias) == (True, False) and layer_params(q2) - base == (h + 2 * g) * d
    q3 = model_of(tmp_path, model_type="qwen3", head_dim=32)
    assert q3.qk_norm and layer_params(q3) == layer_params(model_of(tmp_path, head_dim=32)) + 2 * 32
    for tied in (False, True):
        m = model_of(tmp_path, tie_word_embeddings=tied)
        one = build_spec("1f1b", m, pp=1, microbatches=1, slices=1, virtual_stages=1, seq_len=16)
        two = build_spec("1f1b", m, pp=2, microbatches=2, slices=1, virtual_stages=1, seq_len=16)
        # tied on one rank: the head is the embedding (one V*H); on two ranks each keeps a copy
        assert rank_params(one, 0) == 2 * base + H + (1 if tied else 2) * V * H
        assert rank_params(two, 0) + rank_params(two, 1) == 2 * base + H + 2 * V * H


def test_rope_and_norm_fields_reach_the_model(tmp_path):
    m = model_of(tmp_path, rms_norm_eps=1e-3, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    assert (m.rms_eps, m.rope_theta) == (1e-3, 500000.0)
    cos, _ = M.rope_tables(m, 1, 1, "cpu", __import__("torch").float64)
    assert abs(float(cos[0, 1]) - math.cos(1 / 500000 ** (2 / 16))) < 1e-6
    v4 = model_of(tmp_path, rope_theta=20000, rope_scaling={"type": "linear", "factor": 4.0})
    assert (v4.rope_theta, v4.rope_type, v4.rope_factor) == (20000.0, "linear", 4.0)
    assert float(M.rope_inv_freq(v4)[1]) == pytest.approx(1 / 20000 ** (2 / 16) / 4)
    # defaults of an absent field are transformers' (1e-6), presets keep the executor's 1e-5
    assert model_of(tmp_path).rms_eps == 1e-6 and resolve_model("tiny").rms_eps == 1e-5


REFUSED = [
    ({"model_type": "gpt2"}, "model_type='gpt2' is not supported; allowed: llama, mistral, qwen2, qwen3"),
    ({"architectures": ["GPTNeoXForCausalLM"], "model_type": "llama"}, "architectures=['GPTNeoXForCausalLM'] does not match"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn' is not supported"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "rope parameter partial_rotary_factor=0.5 is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"attention_dropout": 0.1}, "attention_dropout=0.1 is not supported"),
    ({"num_experts": 8}, "field num_experts=8 is not supported for model_type 'llama'"),
    ({"model_type": "mistral", "mlp_bias": True}, "field mlp_bias=True is not supported for model_type 'mistral'"),
    ({"head_dim": 0}, "head_dim=0 must be a positive integer"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings='yes' must be true or false"),
]


@pytest.mark.parametrize("fields,needle", REFUSED)
def test_refused_fields_one_line_exit_2(tmp_path, capsys, fields, needle):
    code, err, out = compile_cli(tmp_path, capsys, {**BASE, **fields})
    assert code == 2 and needle in err and err.count("\n") == 1, err
    assert not out.exists()


DROP = object()  # a key left out of the file
BAD_VALUES = [  # config.json fields, extra flags, the message after "--model '<path>': "
    ({"num_hidden_layers": 0}, (), "num_hidden_layers=0 must be a positive integer (at most 2147483647)"),
    ({"num_hidden_layers": 2 ** 40}, (), "num_hidden_layers=1099511627776 must be a positive integer (at most 2147483647)"),
    ({"num_hidden_layers": DROP}, (), "config.json lacks num_hidden_layers; add it to the file or give --layers"),
    ({"num_attention_heads": DROP, "num_key_value_heads": DROP, "vocab_size": DROP}, ("--vocab", "100"),
     "config.json lacks num_attention_heads; add it to the file or give --heads"),
    ({"num_hidden_layers": DROP, "num_attention_heads": DROP}, (),
     "config.json lacks num_hidden_layers, num_attention_heads; add them to the file or give --layers, --heads"),
    ({"num_key_value_heads": 3}, (), "num_attention_heads=4 must be divisible by num_key_value_heads=3"),
    ({"hidden_size": 66}, (), "hidden_size=66 must be divisible by num_attention_heads=4 (or give head_dim)"),
    ({}, ("--heads", "3"), "hidden_size=64 must be divisible by --heads=3 (or give head_dim)"),
    ({"rms_norm_eps": float("inf")}, (), "rms_norm_eps=inf must be a positive finite number"),
    ({"model_type": "mistral", "sliding_window": 2 ** 31}, (),
     "sliding_window=2147483648 must be a positive integer (at most 2147483647) or null"),
    ({"model_type": "mistral", "sliding_window": 16}, (),
     "sliding_window=16 is shorter than --seq-len 32: sliding-window attention is not supported; allowed: --seq-len 16 "
     "or less"),
    ({"model_type": "qwen2", "use_sliding_window": True, "max_window_layers": 1, "sliding_window": 8}, (),
     "sliding_window=8 is shorter than --seq-len 32: sliding-window attention is not supported; allowed: --seq-len 8 "
     "or less"),
]


@pytest.mark.parametrize("fields,flags,message", BAD_VALUES)
def test_bad_values_name_the_file_and_its_key(tmp_path, capsys, fields, flags, message):
    """A bad or missing value of a config.json is said with the file and the key the user wrote (not
    slimpipe's field name, e.g. layers), and a value given by a flag with that flag."""
    cfg = {k: v for k, v in {**BASE, **fields}.items() if v is not DROP}
    code, err, out = compile_cli(tmp_path, capsys, cfg, *flags)
    assert (code, err) == (2, f"slimpipe compile: error: --model {str(tmp_path / 'config.json')!r}: {message}\n")
    assert not out.exists()


@pytest.mark.parametrize("cmd", [("compile", "--schedule", "1f1b", "--pp", "2", "--microbatches", "2"),
                                 ("compare", "--pp", "2"), ("tune", "--gpus", "2")])
def test_a_window_shorter_than_the_default_sequence_names_the_file(tmp_path, capsys, cmd):
    """Without --seq-len a config.json model runs 4096 tokens: a window of 16 is said with the file, its
    key and the default, before any work (compile said "spec: sliding_window=16 is shorter than
    seq_len=4096"; compare and tune listed it as a rule every candidate broke, exit 1)."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**BASE, "model_type": "mistral", "sliding_window": 16}))
    out = tmp_path / "p.json"
    code = main([*cmd, "--model", str(path), *(("-o", str(out)) if cmd[0] == "compile" else ())])
    stdout, err = capsys.readouterr()
    assert (code, stdout, err) == (2, "", f"slimpipe {cmd[0]}: error: --model {str(path)!r}: sliding_window=16 is shorter "
                                          "than the default --seq-len 4096: sliding-window attention is not supported; "
                                          "allowed: --seq-len 16 or less\n")
    assert not out.exists()


def test_a_flag_supplies_a_key_the_file_lacks(tmp_path, capsys):
    """--layers (any dimension flag) sets a value over the file's, so it also stands in for a key the
    file lacks (it was refused: "config.json lacks num_hidden_layers"); kv heads then follow --heads,
    as transformers' default follows num_attention_heads."""
    cfg = {k: v for k, v in BASE.items() if k not in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads")}
    code, err, out = compile_cli(tmp_path, capsys, cfg, "--layers", "6", "--heads", "8")
    assert (code, err) == (0, "")
    m = ir.load(str(out)).spec.model
    assert (m.layers, m.heads, m.kv_heads, m.hidden, m.head_dim) == (6, 8, 8, 64, 8)
    code, err, _ = compile_cli(tmp_path, capsys, cfg, "--layers", "6", "--heads", "8", "--kv-heads", "3")
    assert (code, err) == (2, f"slimpipe compile: error: --model {str(tmp_path / 'config.json')!r}: --heads=8 must be "
                              "divisible by --kv-heads=3\n")


def test_hf_model_directory_names_its_keys(tmp_path):
    """--hf-model reads a config.json the same way: a rule between two values names both keys."""
    from executor import hf
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "num_key_value_heads": 3}))
    with pytest.raises(ir.SpecError) as e:
        hf.read_config(str(tmp_path))
    assert str(e.value) == f"--hf-model {str(tmp_path)!r}: num_attention_heads=4 must be divisible by num_key_value_heads=3"


def test_windows_that_do_not_bite_are_accepted(tmp_path, capsys):
    for fields in ({"model_type": "mistral", "sliding_window": 32}, {"model_type": "mistral", "sliding_window": None},
                   {"model_type": "qwen2", "use_sliding_window": False, "sliding_window": 8},
                   {"model_type": "qwen2", "use_sliding_window": True, "max_window_layers": 2, "sliding_window": 8}):
        code, err, out = compile_cli(tmp_path, capsys, {**BASE, **fields})
        assert code == 0, (fields, err)
        w = ir.load(str(out)).spec.model.sliding_window
        assert w == (32 if fields.get("sliding_window") == 32 else None)


def test_plans_without_the_new_fields_still_load(tmp_path):
    plan = compile_plan(build_spec("1f1b", resolve_model("tiny"), pp=2, microbatches=2, slices=1, virtual_stages=1,
                                   seq_len=16))
    d = ir.to_dict(plan)
    d["spec"]["model"] = {k: d["spec"]["model"][k] for k in ("name", "layers", "hidden", "heads", "kv_heads", "ffn", "vocab")}
    old = ir.from_dict(json.loads(json.dumps(d)))
    assert old.spec.model == plan.spec.model and old.spec.model.head_dim == 16


@pytest.mark.parametrize("fields", [dict(head_dim=24), dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
                                    dict(model_type="qwen3", head_dim=8, rope_theta=1e6, rms_norm_eps=1e-3),
                                    dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 16})])
def test_executor_runs_variants_against_its_reference(tmp_path, fields):
    """The sliced, pipelined executor (slimpipe p=2 with the exchange) builds each variant's shapes
    and matches the unsliced model; tied embeddings split over the two ranks swap gradients."""
    m = model_of(tmp_path, **fields)
    spec = build_spec("slimpipe", m, pp=2, microbatches=2, slices=4, virtual_stages=1, seq_len=32, exchange=True)
    code, summary = runner.run_local(compile_plan(spec), ecli.options(check_reference=True, device="cpu", quiet=True))
    assert code == 0 and summary["max_grad_rel_err"] < 1e-4 and summary["loss_rel_err"] < 1e-5


def test_plain_models_serialise_as_before_and_variants_round_trip(tmp_path):
    plain = compile_plan(build_spec("1f1b", resolve_model("tiny"), pp=2, microbatches=2, slices=1, virtual_stages=1,
                                    seq_len=16))
    assert set(ir.to_dict(plain)["spec"]["model"]) == {"name", "layers", "hidden", "heads", "kv_heads", "ffn", "vocab"}
    m = model_of(tmp_path, model_type="qwen3", head_dim=32, rope_theta=1e6, tie_word_embeddings=True)
    plan = compile_plan(build_spec("1f1b", m, pp=1, microbatches=1, slices=1, virtual_stages=1, seq_len=16))
    back = ir.loads(ir.dumps(plan))
    assert back.spec.model == m and ir.to_dict(plan)["spec"]["model"]["head_dim"] == 32
