"""Model presets and Hugging Face style config.json loading."""
from __future__ import annotations

from pydantic import ValidationError

from ir import ModelConfig, SpecError, pydantic_message, read_user_json

PRESETS: dict[str, dict] = {
    # tiny: for tests and the CPU demo (runs in seconds under torchrun/gloo)
    "tiny": dict(layers=8, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=256),
    "llama-7b": dict(layers=32, hidden=4096, heads=32, kv_heads=32, ffn=11008, vocab=32000),
    "llama-13b": dict(layers=40, hidden=5120, heads=40, kv_heads=40, ffn=13824, vocab=32000),
    "llama-70b": dict(layers=80, hidden=8192, heads=64, kv_heads=8, ffn=28672, vocab=32000),
}
DEFAULT_SEQ = {"tiny": 128}

_HF_KEYS = {
    "num_hidden_layers": "layers",
    "hidden_size": "hidden",
    "num_attention_heads": "heads",
    "num_key_value_heads": "kv_heads",
    "intermediate_size": "ffn",
    "vocab_size": "vocab",
}


def _from_config_json(path: str) -> dict:
    cfg = read_user_json(path, "--model", f"a preset ({', '.join(PRESETS)}) or a config.json path")
    if not isinstance(cfg, dict):
        raise SpecError(f"--model {path!r}: config must be a JSON object with {', '.join(_HF_KEYS)}")
    out = {}
    for hf, ours in _HF_KEYS.items():
        if hf in cfg:
            out[ours] = cfg[hf]
    out.setdefault("kv_heads", out.get("heads"))
    missing = [hf for hf, ours in _HF_KEYS.items() if out.get(ours) is None]
    if missing:
        raise SpecError(f"--model {path!r}: config.json lacks {', '.join(missing)}")
    for hf, ours in _HF_KEYS.items():
        val = out[ours]
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise SpecError(f"--model {path!r}: {hf}={val!r} must be a positive integer")
    out["name"] = str(cfg.get("_name_or_path") or cfg.get("model_type") or path)
    return out


def resolve_model(model: str, overrides: dict | None = None) -> ModelConfig:
    """A preset name or a config.json path, with non-None overrides (layers, hidden, ...) applied."""
    if model in PRESETS:
        dims = dict(PRESETS[model], name=model)
    elif model.endswith(".json") or "/" in model:
        dims = _from_config_json(model)
    else:
        raise SpecError(f"--model {model!r} is unknown; allowed: {', '.join(PRESETS)} or a path to config.json")
    for k, v in (overrides or {}).items():
        if v is not None:
            if v < 1:
                raise SpecError(f"--{k.replace('_', '-')} {v} must be >= 1")
            dims[k] = v
    try:
        return ModelConfig(**dims)
    except ValidationError as e:
        raise SpecError(f"model {dims.get('name')}: {pydantic_message(e)}") from None
