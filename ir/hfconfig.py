"""A Hugging Face config.json (Llama, Mistral, Qwen2, Qwen3) as ModelConfig fields.

Every key of the file is either honoured (it becomes a ModelConfig field), known not to change
the model (token ids, dtype, cache and init settings), or refused with a SpecError naming the key
and its value: nothing is silently ignored. Defaults of absent keys are transformers' own for the
model_type; a file without model_type is read as a Llama config. Pure: the compiler (`--model`)
and the executor (`--hf-model`, to compare a checkpoint with its plan) both use it.
"""
from __future__ import annotations

import math

from .errors import SpecError
from .limits import INT_MAX

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}

DIMS = {"num_hidden_layers": "layers", "hidden_size": "hidden", "num_attention_heads": "heads",
        "num_key_value_heads": "kv_heads", "intermediate_size": "ffn", "vocab_size": "vocab"}

# the config.json key of each ModelConfig field the file sets (rope factors sit in rope_scaling or
# rope_parameters; attention_bias sets both biases): how messages name a value the user wrote
HF_KEYS = {**{ours: hf for hf, ours in DIMS.items()}, "head_dim": "head_dim", "rms_eps": "rms_norm_eps",
           "rope_theta": "rope_theta", "tie_embeddings": "tie_word_embeddings", "sliding_window": "sliding_window",
           "qkv_bias": "attention_bias", "o_bias": "attention_bias", "mlp_bias": "mlp_bias", "rope_type": "rope_type",
           "rope_factor": "factor", "rope_low_freq_factor": "low_freq_factor", "rope_high_freq_factor": "high_freq_factor",
           "rope_original_max_pos": "original_max_position_embeddings"}

# keys that do not change the model's function (ids, dtype, caching, initialisation, bookkeeping)
NEUTRAL = {
    "architectures", "model_type", "_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id", "initializer_range",
    "max_position_embeddings", "pretraining_tp", "tokenizer_class", "return_dict", "output_attentions",
    "output_hidden_states", "torchscript", "id2label", "label2id", "problem_type", "finetuning_task",
    "task_specific_params", "chunk_size_feed_forward", "prefix", "is_decoder", "is_encoder_decoder",
    "add_cross_attention", "tie_encoder_decoder", "pruned_heads", "use_bfloat16", "tf_legacy_loss",
    "_attn_implementation_autoset", "attn_implementation", "bad_words_ids", "num_labels", "max_length",
}
# keys each family understands beyond the dimensions (transformers' modeling code reads them)
FAMILY_KEYS = {
    "llama": {"head_dim", "attention_bias", "mlp_bias", "tie_word_embeddings", "rms_norm_eps", "rope_theta",
              "rope_scaling", "rope_parameters", "hidden_act", "attention_dropout"},
    "mistral": {"head_dim", "tie_word_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
                "hidden_act", "attention_dropout", "sliding_window"},
    "qwen2": {"head_dim", "tie_word_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "hidden_act",
              "attention_dropout", "sliding_window", "use_sliding_window", "max_window_layers", "layer_types"},
    "qwen3": {"head_dim", "attention_bias", "tie_word_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
              "rope_parameters", "hidden_act", "attention_dropout", "sliding_window", "use_sliding_window",
              "max_window_layers", "layer_types"},
}
ROPE_KEYS = {"rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
             "original_max_position_embeddings"}


def _fail(where: str, msg: str):
    raise SpecError(f"{where}: {msg}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(where, key, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
        _fail(where, f"{key}={v!r} must be a positive finite number")
    return float(v)


def _count(where, key, v) -> int:
    """A size or count: a positive integer no larger than ModelConfig (a C int) takes."""
    if not _is_int(v) or not 1 <= v <= INT_MAX:
        _fail(where, f"{key}={v!r} must be a positive integer (at most {INT_MAX})")
    return v


def _bool(where, key, v) -> bool:
    if not isinstance(v, bool):
        _fail(where, f"{key}={v!r} must be true or false")
    return v


def model_type(cfg: dict, where: str) -> str:
    """The family of a config.json: its model_type (or its architectures entry); 'llama' if neither."""
    mt = cfg.get("model_type")
    if mt is None:
        archs = cfg.get("architectures") or []
        by_class = {v: k for k, v in ARCHITECTURES.items()}
        mt = next((by_class[a] for a in archs if a in by_class), None) if isinstance(archs, list) else None
        if mt is None and archs:
            _fail(where, f"architectures={archs!r} is not supported; allowed: {', '.join(ARCHITECTURES.values())}")
        mt = mt or "llama"
    if mt not in ARCHITECTURES:
        _fail(where, f"model_type={mt!r} is not supported; allowed: {', '.join(ARCHITECTURES)}")
    archs = cfg.get("architectures")
    if archs is not None and (not isinstance(archs, list) or any(a != ARCHITECTURES[mt] for a in archs)):
        _fail(where, f"architectures={archs!r} does not match model_type={mt!r} (expected {ARCHITECTURES[mt]})")
    return mt


def _rope(cfg: dict, where: str) -> dict:
    """rope_theta and the scaling (transformers v4 rope_theta + rope_scaling, v5 rope_parameters)."""
    params = cfg.get("rope_parameters")
    scaling = cfg.get("rope_scaling")
    for key, d in (("rope_parameters", params), ("rope_scaling", scaling)):
        if d is not None and not isinstance(d, dict):
            _fail(where, f"{key}={d!r} must be an object or null")
    merged = {**(scaling or {}), **(params or {})}
    unknown = sorted(set(merged) - ROPE_KEYS)
    if unknown:
        _fail(where, f"rope parameter {unknown[0]}={merged[unknown[0]]!r} is not supported "
                     f"(understood: {', '.join(sorted(ROPE_KEYS))})")
    out = {}
    theta = merged.get("rope_theta", cfg.get("rope_theta", 10000.0))
    out["rope_theta"] = _num(where, "rope_theta", theta)
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        _fail(where, f"rope type {kind!r} is not supported; allowed: default, linear, llama3")
    out["rope_type"] = kind
    if kind in ("linear", "llama3"):
        if "factor" not in merged:
            _fail(where, f"rope type {kind!r} needs a factor")
        out["rope_factor"] = _num(where, "rope factor", merged["factor"])
    if kind == "llama3":
        for key, ours in (("low_freq_factor", "rope_low_freq_factor"), ("high_freq_factor", "rope_high_freq_factor")):
            if key not in merged:
                _fail(where, f"rope type 'llama3' needs {key}")
            out[ours] = _num(where, key, merged[key])
        omp = merged.get("original_max_position_embeddings", cfg.get("max_position_embeddings"))
        out["rope_original_max_pos"] = _count(where, "original_max_position_embeddings", omp)
    return out


def _sliding(cfg: dict, mt: str, layers: int, where: str):
    """The attention window of the layers that use one (None: every layer attends causally in full)."""
    window = cfg.get("sliding_window")
    if window is not None and (not _is_int(window) or not 1 <= window <= INT_MAX):
        _fail(where, f"sliding_window={window!r} must be a positive integer (at most {INT_MAX}) or null")
    if mt == "mistral":
        return window
    if mt == "llama":
        return None
    layer_types = cfg.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list) or len(layer_types) != layers:
            _fail(where, f"layer_types must list one entry per layer ({layers})")
        bad = [t for t in layer_types if t not in ("full_attention", "sliding_attention")]
        if bad:
            _fail(where, f"layer_types entry {bad[0]!r} is not supported; allowed: full_attention, sliding_attention")
        sliding = "sliding_attention" in layer_types
    else:
        use = _bool(where, "use_sliding_window", cfg.get("use_sliding_window", False))
        mwl = cfg.get("max_window_layers", 28)
        if not _is_int(mwl):
            _fail(where, f"max_window_layers={mwl!r} must be an integer")
        sliding = use and mwl < layers
    if sliding and window is None:
        _fail(where, "sliding-window layers but sliding_window is null")
    return window if sliding else None


def model_fields(cfg, where: str, given: dict | None = None) -> dict:
    """ModelConfig keyword arguments of a decoded config.json (SpecError naming the first key that
    is malformed or not supported). `where` starts each message, e.g. "--model 'x/config.json'".
    `given`: {dimension: (the caller's flag, its value or None)}, the caller's overrides: a value
    given stands in for a key the file lacks (the caller, which sets it over the file's, checks it),
    and the message for a missing key names the flag that can supply it."""
    if not isinstance(cfg, dict):
        _fail(where, f"config must be a JSON object with {', '.join(DIMS)}")
    mt = model_type(cfg, where)
    unknown = sorted(set(cfg) - set(DIMS) - NEUTRAL - FAMILY_KEYS[mt])
    if unknown:
        _fail(where, f"field {unknown[0]}={cfg[unknown[0]]!r} is not supported for model_type {mt!r} "
                     "(slimpipe refuses what it cannot honour)")
    given = given or {}
    out = {ours: cfg[hf] for hf, ours in DIMS.items() if cfg.get(hf) is not None}
    for hf, ours in DIMS.items():
        if ours in out:
            _count(where, hf, out[ours])
        elif given.get(ours, (None, None))[1] is not None:
            out[ours] = given[ours][1]
    out.setdefault("kv_heads", out.get("heads"))  # transformers' default: no grouping (so never missing alone)
    missing = [hf for hf, ours in DIMS.items() if ours != "kv_heads" and out.get(ours) is None]
    if missing:
        flags = [given[DIMS[hf]][0] for hf in missing if DIMS[hf] in given]
        _fail(where, f"config.json lacks {', '.join(missing)}" + (
              f"; add {'it' if len(missing) == 1 else 'them'} to the file or give {', '.join(flags)}" if flags else ""))
    if cfg.get("head_dim") is not None:
        out["head_dim"] = _count(where, "head_dim", cfg["head_dim"])
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        _fail(where, f"hidden_act={act!r} is not supported; allowed: silu (SwiGLU MLP)")
    drop = cfg.get("attention_dropout", 0.0)
    if isinstance(drop, bool) or not isinstance(drop, (int, float)) or drop != 0:
        _fail(where, f"attention_dropout={drop!r} is not supported; allowed: 0")
    out["rms_eps"] = _num(where, "rms_norm_eps", cfg.get("rms_norm_eps", 1e-6))
    out["tie_embeddings"] = _bool(where, "tie_word_embeddings", cfg.get("tie_word_embeddings", False))
    if mt == "qwen2":
        out["qkv_bias"], out["o_bias"] = True, False
    elif mt in ("llama", "qwen3"):
        out["qkv_bias"] = out["o_bias"] = _bool(where, "attention_bias", cfg.get("attention_bias", False))
    if mt == "llama":
        out["mlp_bias"] = _bool(where, "mlp_bias", cfg.get("mlp_bias", False))
    out["qk_norm"] = mt == "qwen3"
    out.update(_rope(cfg, where))
    out["sliding_window"] = _sliding(cfg, mt, out["layers"], where)
    out["name"] = str(cfg.get("_name_or_path") or mt)
    return out


def hf_config(model) -> dict:
    """A transformers config.json for a ModelConfig (the inverse of model_fields): Qwen3 when it
    has qk_norm, Qwen2 for q/k/v-only biases, else Llama (Mistral's sliding window is refused
    below the sequence length, so a Mistral model is written as the Llama it then computes)."""
    if model.qk_norm:
        mt = "qwen3"
    elif model.qkv_bias and not model.o_bias and not model.mlp_bias:
        mt = "qwen2"
    elif model.qkv_bias != model.o_bias:
        raise SpecError(f"model {model.name}: q/k/v bias {model.qkv_bias} with output bias {model.o_bias} "
                        "has no transformers architecture")
    else:
        mt = "llama"
    if mt in ("qwen2", "qwen3") and model.mlp_bias:
        raise SpecError(f"model {model.name}: mlp_bias has no {mt} counterpart")
    rope = {"rope_type": model.rope_type, "rope_theta": model.rope_theta}
    if model.rope_type != "default":
        rope["factor"] = model.rope_factor
    if model.rope_type == "llama3":
        rope.update(low_freq_factor=model.rope_low_freq_factor, high_freq_factor=model.rope_high_freq_factor,
                    original_max_position_embeddings=model.rope_original_max_pos)
    cfg = {"architectures": [ARCHITECTURES[mt]], "model_type": mt, "hidden_size": model.hidden,
           "num_hidden_layers": model.layers, "num_attention_heads": model.heads,
           "num_key_value_heads": model.kv_heads, "intermediate_size": model.ffn, "vocab_size": model.vocab,
           "head_dim": model.head_dim, "hidden_act": "silu", "rms_norm_eps": model.rms_eps,
           "tie_word_embeddings": model.tie_embeddings, "rope_parameters": rope,
           "rope_theta": model.rope_theta, "attention_dropout": 0.0}
    if model.rope_type != "default":
        cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if mt in ("llama", "qwen3"):
        cfg["attention_bias"] = model.qkv_bias
    if mt == "llama":
        cfg["mlp_bias"] = model.mlp_bias
    return cfg
