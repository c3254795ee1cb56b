"""Spec construction: placement, layer split and uniform slicing, with user-facing errors."""
from __future__ import annotations

from pydantic import ValidationError

from ir import ModelConfig, PlanSpec, SpecError, pydantic_message
from ir.limits import INT_MAX, MAX_UNITS
from passes.costs import load_profile
from passes.partition import balanced_layers, stage_costs, uniform_layers


def plain_or_looping(p: int, v: int) -> tuple[tuple[int, ...], ...]:
    """Chunk c of rank r is stage c*p + r (v=1: stage r on rank r)."""
    return tuple(tuple(c * p + r for c in range(v)) for r in range(p))


split_layers = uniform_layers  # the uniform split (first stages take the extra layers)

LAYER_SPLITS = ("uniform", "balanced")


PLACEMENTS = ("plain", "looping", "v")


def placement_of(kind: str, p: int, v: int) -> tuple[tuple[int, ...], ...]:
    """plain (v = 1: stage r on rank r), looping (chunk c of rank r is stage c*p + r) or v (torch's
    style "v": chunk c of rank r is stage c*p + r for even c, (c+1)*p - 1 - r for odd c; v = 2:
    chunk 0 is stage r, chunk 1 stage 2p-1-r)."""
    if kind == "plain":
        if v != 1:
            raise SpecError(f"--placement plain has one stage per rank; it needs --virtual-stages 1 (got {v}); "
                            f"use looping or v")
        return plain_or_looping(p, 1)
    if kind == "looping":
        return plain_or_looping(p, v)
    if kind == "v":
        if v % 2:
            raise SpecError(f"--placement v pairs chunks in a V; it needs an even --virtual-stages (got {v})")
        return tuple(tuple(c * p + r if c % 2 == 0 else (c + 1) * p - 1 - r for c in range(v)) for r in range(p))
    raise SpecError(f"--placement {kind!r} is unknown; allowed: {', '.join(PLACEMENTS)}")


def family_placement(schedule: str, placement, p: int, v: int):
    """The placement tuple for a name (or None: the family's default), refused in one line where
    the family does not take it; a tuple is taken as given (hand-built placements)."""
    from . import schedules

    fam = schedules.FAMILIES.get(schedule)
    allowed = fam.placements if fam is not None else ("looping",)
    if placement is None:
        placement = allowed[0]
    elif not isinstance(placement, str):
        return tuple(tuple(pl) for pl in placement)
    if placement not in PLACEMENTS:
        raise SpecError(f"--placement {placement!r} is unknown; allowed: {', '.join(PLACEMENTS)}")
    ok = set(allowed) | ({"plain"} if "looping" in allowed and v == 1 else set())
    if placement not in ok:
        raise SpecError(f"--placement {placement}: {schedule} takes {' or '.join(sorted(ok))}")
    return placement_of(placement, p, v)


def layer_split(kind: str, model: ModelConfig, stages: int, slice_lens, profile=None, tp: int = 1, cp: int = 1,
                mbs: int = 1) -> tuple[int, ...]:
    """Decoder layers per stage: `uniform` (even, extra layers on the first stages) or `balanced`
    (minimise the slowest stage under the cost model of `profile`, embedding and LM head + loss
    included; passes.partition.balanced_layers)."""
    if kind == "uniform":
        return uniform_layers(model.layers, stages)
    if kind != "balanced":
        raise SpecError(f"--layer-split {kind!r} is unknown; allowed: {', '.join(LAYER_SPLITS)}")
    uniform_layers(model.layers, stages)  # the same one-line refusal when layers < stages
    layer_s, first_s, last_s = stage_costs(model, slice_lens, load_profile(profile), tp, cp, mbs)
    return balanced_layers(model.layers, layer_s, first_s, last_s, stages)


def uniform_slices(seq_len: int, n: int) -> tuple[int, ...]:
    if n > seq_len:
        raise SpecError(f"--slices {n} is larger than --seq-len {seq_len}; allowed: 1..{seq_len}")
    if seq_len % n:
        raise SpecError(f"--seq-len {seq_len} is not divisible by --slices {n}; uniform slicing needs "
                        f"a divisor of {seq_len} (or --partition flops)")
    return (seq_len // n,) * n


def check_cp(cp: int, seq_len: int, slices: int = 1) -> None:
    """SpecError unless cp divides seq_len / slices (the uniform slices; slices=1: the sequence, which
    any partition's slices sum to). Context parallelism (Megatron, torchtitan) splits every slice's
    tokens over its cp GPUs: a share of a token is no layout (Megatron's load balancing even needs
    2*cp; the cost model only needs whole tokens)."""
    if seq_len % slices:
        return  # not uniform slices: uniform_slices says why
    tokens = seq_len // slices
    if tokens % cp:
        what = f"--seq-len {seq_len}" if slices == 1 else f"the {tokens}-token slices of --seq-len {seq_len} / --slices {slices}"
        raise SpecError(f"--cp {cp} does not divide {what}: context parallelism splits every slice over the cp GPUs; "
                        f"allowed: a --cp that divides {tokens}, or a --seq-len divisible by {slices * cp}")


def check_tp(tp: int, model: ModelConfig) -> None:
    """SpecError unless tp divides the model's KV heads (which divide its attention heads). Tensor
    parallelism (Megatron: tp must divide num_query_groups) gives each GPU whole KV heads; the cost
    and memory models divide K/V by tp and do not replicate heads, and the search (compiler.search)
    skips such a tp, so compile and compare refuse it too."""
    if model.kv_heads % tp:
        heads = (f"{model.heads} attention heads" if model.kv_heads == model.heads
                 else f"{model.heads} attention heads and {model.kv_heads} KV heads")
        raise SpecError(f"--tp {tp} must divide the model's {heads}: each GPU of a tensor-parallel group holds whole "
                        f"KV heads; allowed: a --tp that divides {model.kv_heads}")


def check_positive(**vals: int) -> None:
    """Each size an integer from 1 to INT_MAX; SpecError naming the first that is not."""
    for name, val in vals.items():
        if not isinstance(val, int) or val < 1:
            raise SpecError(f"--{name.replace('_', '-')} {val} must be an integer >= 1")
        if val > INT_MAX:
            raise SpecError(f"--{name.replace('_', '-')} {val} is too large; give an integer from 1 to {INT_MAX}")


def check_units(pp: int, microbatches: int, slices: int, virtual_stages: int) -> None:
    """SpecError when a plan would hold more than MAX_UNITS compute units (ir.limits): said
    before its layout (microbatches x slices slice lengths) is made."""
    units = pp * microbatches * slices * virtual_stages
    if units > MAX_UNITS:
        raise SpecError(f"the plan would hold {units:,} compute units (pp {pp} x microbatches {microbatches} x slices "
                        f"{slices} x virtual stages {virtual_stages}), more than slimpipe plans ({MAX_UNITS:,}: about "
                        f"29 GiB to compile); use fewer micro-batches or slices")


def build_spec(schedule: str, model: ModelConfig, *, pp: int, microbatches: int, slices: int = 1,
               virtual_stages: int = 1, seq_len: int, micro_batch_size: int = 1,
               slice_lens=None, partition: str = "uniform", layer_split_kind: str = "uniform", profile=None,
               placement=None, **extra) -> PlanSpec:
    """Validate sizes and derive the layout. `slice_lens` (one tuple, or one per micro-batch)
    overrides uniform slicing; `layer_split_kind` picks the layer split (`balanced` prices stages
    with `profile`: None = h100, a name, a JSON path or a DeviceProfile); `placement` (rank -> its
    stages) or its name (plain, looping, v; None: the family's default) sets the placement."""
    check_positive(pp=pp, microbatches=microbatches, slices=slices, virtual_stages=virtual_stages,
                   seq_len=seq_len, micro_batch_size=micro_batch_size)
    check_units(pp, microbatches, slices, virtual_stages)
    if slice_lens is None:
        per_mb = (uniform_slices(seq_len, slices),) * microbatches
    elif slice_lens and isinstance(slice_lens[0], int):
        per_mb = (tuple(slice_lens),) * microbatches
    else:
        per_mb = tuple(tuple(x) for x in slice_lens)
    stages = layer_split(layer_split_kind, model, pp * virtual_stages, per_mb[0], profile,
                         extra.get("tp", 1), extra.get("cp", 1), micro_batch_size)
    try:
        return PlanSpec(schedule=schedule, model=model, seq_len=seq_len, pp=pp, microbatches=microbatches,
                        slices=slices, virtual_stages=virtual_stages, micro_batch_size=micro_batch_size,
                        partition=partition, slice_lens=per_mb,
                        placement=family_placement(schedule, placement, pp, virtual_stages),
                        stage_layers=stages, layer_split=layer_split_kind, **extra)
    except ValidationError as e:
        raise SpecError(f"spec: {pydantic_message(e)}") from None
