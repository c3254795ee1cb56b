"""Spec construction: placement, layer split and uniform slicing, with user-facing errors."""
from __future__ import annotations

from pydantic import ValidationError

from ir import ModelConfig, PlanSpec, SpecError, pydantic_message


def plain_or_looping(p: int, v: int) -> tuple[tuple[int, ...], ...]:
    """Chunk c of rank r is stage c*p + r (v=1: stage r on rank r)."""
    return tuple(tuple(c * p + r for c in range(v)) for r in range(p))


def split_layers(layers: int, stages: int) -> tuple[int, ...]:
    """Even split; when uneven, the first (layers mod stages) stages take one layer more
    (the last stage already carries the LM head and loss)."""
    if layers < stages:
        raise SpecError(f"model has {layers} layers, fewer than pp*virtual_stages={stages} stages; "
                        f"lower --pp/--virtual-stages or raise --layers")
    base, extra = divmod(layers, stages)
    return tuple(base + (1 if s < extra else 0) for s in range(stages))


def uniform_slices(seq_len: int, n: int) -> tuple[int, ...]:
    if n > seq_len:
        raise SpecError(f"--slices {n} is larger than --seq-len {seq_len}; allowed: 1..{seq_len}")
    if seq_len % n:
        raise SpecError(f"--seq-len {seq_len} is not divisible by --slices {n}; uniform slicing needs "
                        f"a divisor of {seq_len} (or --partition flops)")
    return (seq_len // n,) * n


def check_positive(**vals: int) -> None:
    for name, val in vals.items():
        if not isinstance(val, int) or val < 1:
            raise SpecError(f"--{name.replace('_', '-')} {val} must be an integer >= 1")


def build_spec(schedule: str, model: ModelConfig, *, pp: int, microbatches: int, slices: int = 1,
               virtual_stages: int = 1, seq_len: int, micro_batch_size: int = 1,
               slice_lens=None, partition: str = "uniform", **extra) -> PlanSpec:
    """Validate sizes and derive the layout. `slice_lens` (one tuple, or one per micro-batch)
    overrides uniform slicing."""
    check_positive(pp=pp, microbatches=microbatches, slices=slices, virtual_stages=virtual_stages,
                   seq_len=seq_len, micro_batch_size=micro_batch_size)
    stages = split_layers(model.layers, pp * virtual_stages)
    if slice_lens is None:
        per_mb = (uniform_slices(seq_len, slices),) * microbatches
    elif slice_lens and isinstance(slice_lens[0], int):
        per_mb = (tuple(slice_lens),) * microbatches
    else:
        per_mb = tuple(tuple(x) for x in slice_lens)
    try:
        return PlanSpec(schedule=schedule, model=model, seq_len=seq_len, pp=pp, microbatches=microbatches,
                        slices=slices, virtual_stages=virtual_stages, micro_batch_size=micro_batch_size,
                        partition=partition, slice_lens=per_mb,
                        placement=plain_or_looping(pp, virtual_stages), stage_layers=stages, **extra)
    except ValidationError as e:
        raise SpecError(f"spec: {pydantic_message(e)}") from None
