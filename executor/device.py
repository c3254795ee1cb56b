"""Where a rank computes: its torch device (one GPU per process under torchrun, LOCAL_RANK), the
parameter dtype, and the attention backend that runs there."""
from __future__ import annotations

import os

import torch

from .attention import pick_backend

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def choose_device(opts, transport, rank: int) -> torch.device:
    """opts.device ('cpu' or 'cuda', resolved by the CLI); under torchrun each process takes the
    GPU of its LOCAL_RANK. In-process ranks share one device."""
    device = torch.device(opts.device if opts.device != "cuda" or transport.kind == "dist" else "cuda")
    if device.type == "cuda" and transport.kind == "dist":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    return device


def core_set(cores: list[int], local_rank: int, local_world: int, threads: int) -> list[int] | None:
    """The processors local rank `local_rank` of `local_world` ranks on this machine keeps to, each
    rank `threads` of them in a row of `cores` (the processors this process may use, ascending);
    None when they do not go round (more ranks x threads than processors: the OS shares them).
    Keeping a rank's threads on processors of its own spares the moves between processors that
    cost its compute thread its warm caches (what DeepSpeed's --bind_cores_to_rank and Intel's
    torch launcher do; bench/executor_vs_torch.py measures it)."""
    if local_world * threads > len(cores) or not 0 <= local_rank < local_world:
        return None
    return cores[local_rank * threads:(local_rank + 1) * threads]


def bind_cores(threads: int) -> list[int] | None:
    """Under torchrun on CPU: keep this process, and every thread it starts from now on (gloo's, the
    watchers', torch's intra-op pool), to this local rank's processors (core_set of LOCAL_RANK and
    LOCAL_WORLD_SIZE); returns them, or None where it does not bind (no launcher variables, no
    sched_setaffinity, or too few processors)."""
    if not hasattr(os, "sched_setaffinity") or "LOCAL_RANK" not in os.environ:
        return None
    mine = core_set(sorted(os.sched_getaffinity(0)), int(os.environ["LOCAL_RANK"]),
                    int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))), threads)
    if mine is not None:
        os.sched_setaffinity(0, mine)
    return mine


def choose_backend(opts, device, head_dim: int = 64):
    """The attention backend for --attention on `device`, self-tested at the plan's head_dim
    (errors.BackendUnavailable: exit 2)."""
    return pick_backend(opts.attention, device, DTYPES[opts.dtype], head_dim)
