"""Hugging Face checkpoints (Llama, Mistral, Qwen2, Qwen3): read a model directory's config.json
and safetensors weights into one rank's stages, write trained weights back as a directory that
transformers' `from_pretrained` loads, and compute transformers' own loss and gradients for the
reference check.

Reading: the directory's config.json must describe the plan's model exactly (ir.hfconfig turns it
into ModelConfig fields; any difference is a SpecError naming the field). Tensors are located
through model.safetensors.index.json (sharded) or model.safetensors, and each rank opens only the
shards holding its own stages' tensors with safetensors' safe_open (lazy, per tensor).
Writing: each rank writes its own tensors as one shard (model-0000r-of-0000p.safetensors); rank 0
writes config.json and the index after an all-gather of the names. safetensors, transformers:
the optional extra `hf`.
"""
from __future__ import annotations

import json
import os

import torch
from pydantic import ValidationError

from ir import ModelConfig, SpecError, pydantic_message
from ir.hfconfig import HF_KEYS, hf_config, model_fields

from . import model as M

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_LAYER = {"attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight",
          "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
          "wo": "self_attn.o_proj.weight", "bq": "self_attn.q_proj.bias", "bk": "self_attn.k_proj.bias",
          "bv": "self_attn.v_proj.bias", "bo": "self_attn.o_proj.bias", "q_norm": "self_attn.q_norm.weight",
          "k_norm": "self_attn.k_norm.weight", "w1": "mlp.gate_proj.weight", "w3": "mlp.up_proj.weight",
          "w2": "mlp.down_proj.weight", "b1": "mlp.gate_proj.bias", "b3": "mlp.up_proj.bias",
          "b2": "mlp.down_proj.bias"}
_TOP = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "lm_head": "lm_head.weight"}
_FROM_HF = {v: k for k, v in _TOP.items()}
def hf_name(name: str) -> str:
    """transformers' state-dict key of one of our parameter names."""
    if name in _TOP:
        return _TOP[name]
    _, i, short = name.split(".")
    return f"model.layers.{i}.{_LAYER[short]}"


def our_name(key: str) -> str | None:
    """Our parameter name of a transformers key (None for keys we do not hold, e.g. buffers)."""
    if key in _FROM_HF:
        return _FROM_HF[key]
    parts = key.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"]:
        for short, tail in _LAYER.items():
            if tail == parts[3]:
                return f"layers.{parts[2]}.{short}"
    return None


def _need_libs(flag: str, *names: str):
    """SpecError unless the optional packages (default: safetensors) import."""
    import importlib

    for name in names or ("safetensors",):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise SpecError(f"{flag} needs the optional package {name} (pip install 'slimpipe[hf]'): {e}") from None


def read_config(hf_dir: str) -> ModelConfig:
    """The ModelConfig a Hugging Face model directory describes (SpecError on any problem)."""
    where = f"--hf-model {hf_dir!r}"
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir):
        raise SpecError(f"{where}: no such directory")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise SpecError(f"{where}: no config.json in the directory") from None
    except (OSError, ValueError) as e:
        raise SpecError(f"{where}: config.json is not a readable JSON file ({type(e).__name__})") from None
    fields = model_fields(cfg, where)
    try:
        return ModelConfig(**fields)
    except ValidationError as e:
        raise SpecError(f"{where}: {pydantic_message(e, name=lambda f: HF_KEYS.get(f, f))}") from None


def check_matches(spec, hf_dir: str) -> ModelConfig:
    """The directory's model, which must be the plan's (SpecError naming the first field that differs)."""
    mine = read_config(hf_dir)
    ours = spec.model
    if mine.sliding_window is not None and mine.sliding_window < spec.seq_len:
        raise SpecError(f"--hf-model {hf_dir!r}: sliding_window={mine.sliding_window} is shorter than the plan's "
                        f"seq_len={spec.seq_len}: sliding-window attention is not supported")
    for field in type(ours).model_fields:
        if field == "name":
            continue
        a, b = getattr(mine, field), getattr(ours, field)
        if a != b:
            key = HF_KEYS.get(field, field)
            raise SpecError(f"--hf-model {hf_dir!r}: config.json gives {key}={a!r} but the plan's model has "
                            f"{field}={b!r} (compile the plan with --model {os.path.join(hf_dir, 'config.json')})")
    return mine


class Checkpoint:
    """Where each tensor of a Hugging Face directory lives; loads a set of our parameters."""

    def __init__(self, hf_dir: str):
        _need_libs("--hf-model")
        self.dir = hf_dir
        where = f"--hf-model {hf_dir!r}"
        index = os.path.join(hf_dir, INDEX)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    wm = json.load(f)["weight_map"]
                if not isinstance(wm, dict):
                    raise TypeError("weight_map is not an object")
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise SpecError(f"{where}: {INDEX} is malformed ({type(e).__name__}: {e})") from None
            self.files = {k: os.path.join(hf_dir, v) for k, v in wm.items()}
            for shard in sorted(set(self.files.values())):
                if not os.path.isfile(shard):
                    raise SpecError(f"{where}: shard {os.path.basename(shard)} listed in {INDEX} is missing")
        elif os.path.isfile(os.path.join(hf_dir, SINGLE)):
            from safetensors import safe_open

            single = os.path.join(hf_dir, SINGLE)
            with safe_open(single, framework="pt") as f:
                self.files = {k: single for k in f.keys()}
        else:
            raise SpecError(f"{where}: neither {INDEX} nor {SINGLE} in the directory")

    def load(self, cfg, names, device, dtype) -> dict:
        """{name: tensor} of our parameter `names`, read from only the shards that hold them."""
        from safetensors import safe_open

        where = f"--hf-model {self.dir!r}"
        by_file: dict[str, list[str]] = {}
        for n in names:
            key = hf_name(n)
            if key not in self.files:
                raise SpecError(f"{where}: the checkpoint lacks tensor {key} (parameter {n} of the plan's model)")
            by_file.setdefault(self.files[key], []).append(n)
        out = {}
        for path, ns in by_file.items():
            with safe_open(path, framework="pt", device="cpu") as f:
                for n in ns:
                    key = hf_name(n)
                    try:
                        t = f.get_tensor(key)
                    except Exception as e:  # noqa: BLE001 - safetensors' own error for a bad entry
                        raise SpecError(f"{where}: cannot read tensor {key} from {os.path.basename(path)}: "
                                        f"{type(e).__name__}") from None
                    want = M.param_shape(cfg, n)
                    if tuple(t.shape) != want:
                        raise SpecError(f"{where}: tensor {key} has shape {list(t.shape)} but the plan's model "
                                        f"needs {list(want)}")
                    out[n] = t.to(device=device, dtype=dtype)
        return out


def load_stage_params(hf_dir: str, spec, stages, device, dtype) -> list[dict]:
    """One rank's stage parameter dicts (as model.stage_params builds them) from the checkpoint."""
    ck = Checkpoint(hf_dir)
    names = list(dict.fromkeys(n for s in stages for n in M.stage_param_names(spec, s)))
    values = ck.load(spec.model, names, device, dtype)
    return M.stage_params(spec, stages, lambda n: torch.nn.Parameter(values[n]))


def check_export_dir(path: str) -> None:
    """Refuse an --export-hf target before training (SpecError): its parent must exist."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(parent):
        raise SpecError(f"--export-hf {path!r}: the directory {parent} does not exist")
    if os.path.exists(path) and not os.path.isdir(path):
        raise SpecError(f"--export-hf {path!r}: exists and is not a directory")


def export_rank(out_dir: str, spec, rank: int, params: list[dict], all_gather, config: dict | None = None) -> None:
    """Write this rank's parameters as shard rank+1 of pp and, on rank 0, config.json and the
    index. `all_gather(obj)` -> [obj of every rank] (the transport's step-end collective);
    `config` is the source checkpoint's config.json (kept as is), else one built from the plan."""
    _need_libs("--export-hf")
    from safetensors.torch import save_file

    p = spec.pp
    owner = spec.stage_rank()
    mine = {}
    for P in params:
        for n, t in P.items():
            if n == "embed" and spec.model.tie_embeddings and owner[0] != rank:
                continue  # the tied copy on the head's rank: rank of stage 0 writes it
            mine[hf_name(n)] = t.detach().to("cpu", torch.float32 if t.dtype == torch.float32 else t.dtype).contiguous()
    os.makedirs(out_dir, exist_ok=True)
    shard = f"model-{rank + 1:05d}-of-{p:05d}.safetensors"
    tmp = os.path.join(out_dir, shard + ".tmp")
    save_file(mine, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(out_dir, shard))
    listing = all_gather({"shard": shard, "keys": sorted(mine), "bytes": sum(t.numel() * t.element_size()
                                                                             for t in mine.values())})
    if rank != 0:
        return
    weight_map = {k: item["shard"] for item in listing for k in item["keys"]}
    index = {"metadata": {"total_size": sum(item["bytes"] for item in listing)}, "weight_map": dict(sorted(weight_map.items()))}
    cfg = dict(config) if config is not None else hf_config(spec.model)
    cfg["dtype"] = "float32" if all(t.dtype == torch.float32 for t in mine.values()) else str(
        next(iter(mine.values())).dtype).removeprefix("torch.")
    cfg.pop("torch_dtype", None)
    for name, obj in ((INDEX, index), ("config.json", cfg)):
        tmp = os.path.join(out_dir, name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, os.path.join(out_dir, name))


def raw_config(hf_dir: str) -> dict:
    with open(os.path.join(hf_dir, "config.json")) as f:
        return json.load(f)


def reference(hf_dir: str, spec, batch, device, dtype=torch.float32) -> tuple[float, dict]:
    """transformers' own model (from_pretrained in `dtype`, fp32 by default) on the step's batch: the step loss (mean token
    loss per micro-batch, averaged over micro-batches, as the pipelined step computes it) and the
    gradient of every parameter under our names. batch(mb) -> [mbs, seq_len + 1] token ids."""
    _need_libs("--hf-model --check-reference", "transformers")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, attn_implementation="eager")
    model.to(device).train()
    m = spec.microbatches
    denom = spec.micro_batch_size * spec.seq_len * m
    total = torch.zeros((), device=device)
    for mb in range(m):
        tok = batch(mb).to(device)
        logits = model(input_ids=tok[:, :-1]).logits.float()
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tok[:, 1:].reshape(-1),
                                               reduction="sum")
        total = total + ce / denom
    total.backward()
    grads = {}
    for key, prm in model.named_parameters():
        n = our_name(key)
        if n is not None and prm.grad is not None:
            grads[n] = prm.grad.detach()
    if spec.model.tie_embeddings:
        grads.pop("lm_head", None)
    return float(total.detach()), grads
