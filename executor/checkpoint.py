"""Checkpoints through torch.distributed.checkpoint (DCP): every rank saves and loads the tensors of
its own stages under their global names (model.<param>, optim.<param>.<state>), so a checkpoint
does not depend on the pipeline layout and data-parallel replicas share one copy (DCP keeps one of
the identical tensors). A step's checkpoint is DIR/step-NNNNNN/: DCP's files, then slimpipe.json
(written last, by rank 0, atomically: a directory without it is incomplete and never resumed).

Everything about a checkpoint that can be wrong (no checkpoint there, another model, a missing
shard, nothing left to run) is found by `find` before any rank starts: one line, exit 2."""
from __future__ import annotations

import json
import os
import re
import warnings

import torch

from ir import SlimpipeError

META = "slimpipe.json"
FORMAT = "slimpipe-checkpoint-1"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(SlimpipeError):
    """--resume/--save names a checkpoint this plan cannot use: one line, exit 2."""

    exit_code = 2


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step-{step:06d}")


def _model_fields(spec) -> dict:
    return spec.model.model_dump(mode="json")


def find(path: str, spec, steps: int) -> tuple[str, dict]:
    """(the checkpoint directory to resume from, its metadata) for --resume `path` (a step
    directory, or a --save directory: its latest complete step); CheckpointError otherwise."""
    if not os.path.isdir(path):
        raise CheckpointError(f"--resume {path}: no such directory")
    chosen = path
    if not os.path.exists(os.path.join(path, META)):
        done = sorted((int(m.group(1)), d) for d in os.listdir(path) if (m := _STEP_DIR.match(d))
                      and os.path.exists(os.path.join(path, d, META)))
        if not done:
            raise CheckpointError(f"--resume {path}: no complete checkpoint there (no {META}, no step-*/{META})")
        chosen = os.path.join(path, done[-1][1])
    try:
        with open(os.path.join(chosen, META)) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"--resume {chosen}: cannot read {META} ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"--resume {chosen}: {META} is not a slimpipe checkpoint (format {FORMAT!r} expected)")
    want = _model_fields(spec)
    got = meta.get("model", {})
    diff = [k for k in want if got.get(k) != want[k]]
    if diff:
        k = diff[0]
        raise CheckpointError(f"--resume {chosen}: the checkpoint's model has {k}={got.get(k)!r}, the plan's model "
                              f"{k}={want[k]!r}; resume with a plan of the same model")
    step = meta.get("step")
    if not isinstance(step, int) or step < 1:
        raise CheckpointError(f"--resume {chosen}: {META} has no valid step ({step!r})")
    if step >= steps:
        raise CheckpointError(f"--resume {chosen}: the checkpoint is at step {step} and --steps {steps} is the total, "
                              f"so no step is left to run; pass --steps > {step}")
    _check_files(chosen)
    return chosen, meta


def _check_files(path: str) -> None:
    """Every file DCP's metadata lists must be there (a missing shard fails here, not mid-load)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        md = FileSystemReader(path).read_metadata()
    except Exception as e:  # noqa: BLE001 - unreadable or absent .metadata: one line
        raise CheckpointError(f"--resume {path}: DCP metadata unreadable ({type(e).__name__}: {e})") from None
    files = sorted({info.relative_path for info in (md.storage_data or {}).values()})
    for name in files:
        if not os.path.exists(os.path.join(path, name)):
            raise CheckpointError(f"--resume {path}: shard {name} listed in the checkpoint is missing")


def rank_state(params) -> dict:
    """This rank's tensors by global name; the optimizer state is created (zeros, step 0) if no
    step has run, so that it can be loaded into in place."""
    sd = {}
    opt = params.optimizer
    for P in params.chunks:
        for name, p in P.items():
            sd[f"model.{name}"] = p.detach()
            if opt is None:
                continue
            st = opt.state[p]
            if not st:
                st["step"] = torch.tensor(0.0, dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            for k in ("step", "exp_avg", "exp_avg_sq"):
                sd[f"optim.{name}.{k}"] = st[k]
    return sd


def save(path: str, states: list | dict, spec, step: int, opts, *, dist: bool, write_meta: bool) -> None:
    """Save `states` to `path`. dist: every rank calls with its own state dict (a DCP collective).
    In-process: one caller with every rank's state dicts. Rank 0 (write_meta) then writes META."""
    import torch.distributed.checkpoint as dcp

    if dist:
        dcp.save(states, checkpoint_id=path)
    else:
        merged = {}
        for sd in states:
            merged.update(sd)
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(merged, checkpoint_id=path, no_dist=True)
    if write_meta:
        meta = {"format": FORMAT, "step": step, "model": _model_fields(spec), "dtype": opts.dtype,
                "schedule": spec.schedule, "pp": spec.pp, "seed": spec.seed}
        tmp = os.path.join(path, META + ".tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, os.path.join(path, META))


def load(path: str, params, *, dist: bool) -> None:
    """Fill this rank's parameters and optimizer state in place from `path`."""
    import torch.distributed.checkpoint as dcp

    sd = rank_state(params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(sd, checkpoint_id=path, no_dist=not dist)
