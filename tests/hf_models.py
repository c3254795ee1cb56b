"""Tiny random Hugging Face checkpoints built with transformers (shared by the --hf-model tests)."""
import json
import os

import torch

ARCHS = ("llama", "qwen2", "mistral")
DIMS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=96)


def make(arch: str, out_dir: str, shard: bool = False, seed: int = 0, **extra) -> str:
    """Save a tiny random {arch}ForCausalLM (every parameter random, biases and norms included, so
    each is tested) with save_pretrained; `shard` splits it over several safetensors files."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
           "mistral": (MistralConfig, MistralForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[arch]
    kw = dict(DIMS, **extra)
    if arch == "qwen2":
        kw.setdefault("rope_theta", 1e6)
    if arch == "qwen3":
        kw.setdefault("head_dim", 16)  # hidden / heads = 8: Qwen3 sets head_dim apart
    if arch == "mistral":
        kw.setdefault("sliding_window", 4096)
    torch.manual_seed(seed)
    cfg = cls[0](**kw)
    model = cls[1](cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out_dir, max_shard_size="40KB" if shard else "1GB")
    return out_dir


def config_path(hf_dir: str) -> str:
    return os.path.join(hf_dir, "config.json")


def edit_config(hf_dir: str, **changes) -> None:
    path = config_path(hf_dir)
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)
