"""Model presets and Hugging Face style config.json loading."""
from __future__ import annotations

from pydantic import ValidationError

from ir import ModelConfig, SpecError, pydantic_message, read_user_json
from ir.hfconfig import HF_KEYS, model_fields

PRESETS: dict[str, dict] = {
    # tiny: for tests and the CPU demo (runs in seconds under torchrun/gloo)
    "tiny": dict(layers=8, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=256),
    "llama-7b": dict(layers=32, hidden=4096, heads=32, kv_heads=32, ffn=11008, vocab=32000),
    "llama-13b": dict(layers=40, hidden=5120, heads=40, kv_heads=40, ffn=13824, vocab=32000),
    "llama-70b": dict(layers=80, hidden=8192, heads=64, kv_heads=8, ffn=28672, vocab=32000),
}
DEFAULT_SEQ = {"tiny": 128}



def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _from_config_json(path: str, overrides: dict) -> dict:
    cfg = read_user_json(path, "--model", f"a preset ({', '.join(PRESETS)}) or a config.json path")
    fields = model_fields(cfg, f"--model {path!r}", {k: (_flag(k), v) for k, v in overrides.items()})
    if fields.get("head_dim") == fields["hidden"] // fields["heads"] and fields["hidden"] % fields["heads"] == 0:
        del fields["head_dim"]  # redundant: let --hidden / --heads overrides scale it
    return fields


def resolve_model(model: str, overrides: dict | None = None) -> ModelConfig:
    """A preset name or a config.json path, with non-None overrides (layers, hidden, ...) applied."""
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    for k, v in given.items():
        if v < 1:
            raise SpecError(f"{_flag(k)} {v} must be >= 1")
    if model in PRESETS:
        dims = dict(PRESETS[model], name=model)
    elif model.endswith(".json") or "/" in model:
        dims = _from_config_json(model, overrides or {})
    else:
        raise SpecError(f"--model {model!r} is unknown; allowed: {', '.join(PRESETS)} or a path to config.json")
    dims.update(given)

    def name(field: str) -> str:  # a value as the user gave it: a flag, the file's own key, or the preset's field
        if field in given:
            return _flag(field)
        return HF_KEYS.get(field, field) if model not in PRESETS else field
    try:
        return ModelConfig(**dims)
    except ValidationError as e:
        raise SpecError(f"{_where(model)}: {pydantic_message(e, name=name)}") from None


def _where(model: str) -> str:
    """How a message names the --model value: a preset by name, a config.json by its path."""
    return f"model {model}" if model in PRESETS else f"--model {model!r}"


def check_window(model: str, config: ModelConfig, seq_len: int, seq_given: bool) -> None:
    """SpecError unless the sequence fits the model's attention window (sliding-window attention is
    not supported; PlanSpec refuses it too, without knowing which file or flag said what). Only a
    config.json sets a window, so the message names the file and its key, and the --seq-len given
    (or defaulted)."""
    w = config.sliding_window
    if w is not None and w < seq_len:
        seq = f"--seq-len {seq_len}" if seq_given else f"the default --seq-len {seq_len}"
        raise SpecError(f"{_where(model)}: {HF_KEYS['sliding_window']}={w} is shorter than {seq}: sliding-window "
                        f"attention is not supported; allowed: --seq-len {w} or less")
