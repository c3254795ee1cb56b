"""Where a rank computes: its torch device (one GPU per process under torchrun, LOCAL_RANK), the
parameter dtype, and the attention backend that runs there."""
from __future__ import annotations

import os

import torch

from .attention import pick_backend

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def process_device(opts, dist: bool, rank: int) -> torch.device:
    """opts.device ('cpu' or 'cuda', resolved by the CLI); under torchrun (`dist`) each process takes
    the GPU of its LOCAL_RANK (`rank` where that is unset). In-process ranks share one device."""
    device = torch.device(opts.device)
    if device.type == "cuda" and dist:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    return device


def choose_device(opts, transport, rank: int) -> torch.device:
    """process_device for a rank's transport, made the current CUDA device under torchrun."""
    device = process_device(opts, transport.kind == "dist", rank)
    if device.type == "cuda" and transport.kind == "dist":
        torch.cuda.set_device(device)
    return device


def choose_backend(opts, device, head_dim: int = 64):
    """The attention backend for --attention on `device`, self-tested at the plan's head_dim
    (errors.BackendUnavailable: exit 2)."""
    return pick_backend(opts.attention, device, DTYPES[opts.dtype], head_dim)
