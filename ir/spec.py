"""PlanSpec: everything a plan needs to be understood alone (model, sizes, slicing, placement)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

# Strict scalars: a plan's JSON must say 4, not 4.0, "4" or true (lax pydantic would coerce them).
_FROZEN = ConfigDict(frozen=True, extra="forbid")


class ModelConfig(BaseModel):
    """Llama-style decoder dimensions (GQA attention, SwiGLU MLP with `ffn` intermediate size)."""

    model_config = _FROZEN
    name: StrictStr = "custom"
    layers: StrictInt = Field(ge=1)
    hidden: StrictInt = Field(ge=1)
    heads: StrictInt = Field(ge=1)
    kv_heads: StrictInt = Field(ge=1)
    ffn: StrictInt = Field(ge=1)
    vocab: StrictInt = Field(ge=1)

    @model_validator(mode="after")
    def _dims(self):
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} must be divisible by heads={self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads} must be divisible by kv_heads={self.kv_heads}")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


class PlanSpec(BaseModel):
    """The compile inputs plus the derived layout: slice lengths, placement, layers per stage.

    placement[r][c] is the global stage of local chunk c on rank r; stage_layers[s] the number
    of decoder layers of stage s (stage 0 also holds the embedding, the last stage the final
    norm, LM head and loss); slice_lens[mb] the token count of each slice of micro-batch mb.
    """

    model_config = _FROZEN
    schedule: StrictStr
    model: ModelConfig
    seq_len: StrictInt = Field(ge=1)
    pp: StrictInt = Field(ge=1)
    microbatches: StrictInt = Field(ge=1)
    slices: StrictInt = Field(ge=1)
    virtual_stages: StrictInt = Field(ge=1)
    micro_batch_size: StrictInt = Field(default=1, ge=1)
    partition: Literal["uniform", "flops", "custom"] = "uniform"
    slice_lens: tuple[tuple[StrictInt, ...], ...]
    placement: tuple[tuple[StrictInt, ...], ...]
    stage_layers: tuple[StrictInt, ...]
    # how stage_layers was chosen: uniform (even split), balanced (cost model), custom (by hand)
    layer_split: Literal["uniform", "balanced", "custom"] = "uniform"
    exchange: StrictBool = False
    exchange_threshold: StrictInt = Field(default=0, ge=0)
    tp: StrictInt = Field(default=1, ge=1)
    cp: StrictInt = Field(default=1, ge=1)
    dp: StrictInt = Field(default=1, ge=1)
    seed: StrictInt = 0

    @model_validator(mode="after")
    def _consistent(self):
        p, v, n = self.pp, self.virtual_stages, self.slices
        if len(self.slice_lens) != self.microbatches:
            raise ValueError(f"slice_lens has {len(self.slice_lens)} micro-batches, microbatches={self.microbatches}")
        for mb, lens in enumerate(self.slice_lens):
            if len(lens) != n:
                raise ValueError(f"slice_lens[{mb}] has {len(lens)} slices, slices={n}")
            if any(x < 1 for x in lens) or sum(lens) != self.seq_len:
                raise ValueError(f"slice_lens[{mb}]={list(lens)} must be positive and sum to seq_len={self.seq_len}")
        if len(self.placement) != p or any(len(ch) != v for ch in self.placement):
            raise ValueError(f"placement must list {v} stage(s) for each of {p} rank(s)")
        stages = sorted(s for ch in self.placement for s in ch)
        if stages != list(range(p * v)):
            raise ValueError(f"placement must use each stage 0..{p * v - 1} exactly once")
        if len(self.stage_layers) != p * v or any(x < 1 for x in self.stage_layers):
            raise ValueError(f"stage_layers needs {p * v} positive entries (one per stage)")
        if sum(self.stage_layers) != self.model.layers:
            raise ValueError(f"stage_layers sum to {sum(self.stage_layers)}, model has {self.model.layers} layers")
        return self

    # derived layout (cheap; callers in hot loops should hoist them)
    @property
    def num_stages(self) -> int:
        return self.pp * self.virtual_stages

    def stage_rank(self) -> list[int]:
        """stage -> rank owning it."""
        out = [0] * self.num_stages
        for r, chunks in enumerate(self.placement):
            for s in chunks:
                out[s] = r
        return out

    def stage_chunk(self) -> list[int]:
        """stage -> local chunk index on its rank."""
        out = [0] * self.num_stages
        for chunks in self.placement:
            for c, s in enumerate(chunks):
                out[s] = c
        return out

    def stage_first_layer(self) -> list[int]:
        """stage -> index of its first decoder layer."""
        out, acc = [], 0
        for k in self.stage_layers:
            out.append(acc)
            acc += k
        return out

    def slice_offsets(self, mb: int) -> list[int]:
        """Token offset of each slice of micro-batch mb (the prefix length it attends over)."""
        out, acc = [], 0
        for k in self.slice_lens[mb]:
            out.append(acc)
            acc += k
        return out
