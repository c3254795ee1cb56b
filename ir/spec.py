"""PlanSpec: everything a plan needs to be understood alone (model, sizes, slicing, placement)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

from .limits import INT_MAX

# Strict scalars: a plan's JSON must say 4, not 4.0, "4" or true (lax pydantic would coerce them).
_FROZEN = ConfigDict(frozen=True, extra="forbid")


class RuleError(ValueError):
    """A rule between fields, broken (raised in a validator). `text` has a {field} slot for each
    field it names, so a caller that knows where each value came from (a config.json key, a flag)
    can say it in the user's words: render(name), which ir.pydantic_message(name=...) calls."""

    def __init__(self, text: str, **values):
        self.text, self.values = text, values
        super().__init__(self.render(str))

    def render(self, name) -> str:
        return self.text.format(**{f: f"{name(f)}={v}" for f, v in self.values.items()})


ROPE_TYPES = ("default", "linear", "llama3")
VARIANT_FIELDS = ("head_dim", "qkv_bias", "o_bias", "mlp_bias", "qk_norm", "tie_embeddings", "rms_eps", "rope_theta",
                  "rope_type", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_pos",
                  "sliding_window")


class ModelConfig(BaseModel):
    """Llama-style decoder (GQA attention with RoPE, SwiGLU MLP with `ffn` intermediate size) and
    every variant knob of the supported families (Llama, Mistral, Qwen2, Qwen3). Each field changes
    the model, so the cost and memory models and the executor all honour it; the defaults are the
    plain Llama-style decoder of plans written before the field existed (schema compatible).

    head_dim defaults to hidden // heads; qkv_bias / o_bias: biases of the q/k/v and the output
    projections (Qwen2: q/k/v only); qk_norm: per-head RMSNorm of q and k before RoPE (Qwen3);
    tie_embeddings: the LM head is the embedding matrix; sliding_window: attention window in tokens
    (None: full causal; a plan refuses a window shorter than its sequence); rope_type "linear" divides
    positions by rope_factor, "llama3" rescales low frequencies (Llama 3.1)."""

    model_config = _FROZEN
    name: StrictStr = "custom"
    layers: StrictInt = Field(ge=1, le=INT_MAX)
    hidden: StrictInt = Field(ge=1, le=INT_MAX)
    heads: StrictInt = Field(ge=1, le=INT_MAX)
    kv_heads: StrictInt = Field(ge=1, le=INT_MAX)
    ffn: StrictInt = Field(ge=1, le=INT_MAX)
    vocab: StrictInt = Field(ge=1, le=INT_MAX)
    head_dim: StrictInt = Field(ge=1, le=INT_MAX)
    qkv_bias: StrictBool = False
    o_bias: StrictBool = False
    mlp_bias: StrictBool = False
    qk_norm: StrictBool = False
    tie_embeddings: StrictBool = False
    rms_eps: StrictFloat = Field(default=1e-5, gt=0, allow_inf_nan=False)
    rope_theta: StrictFloat = Field(default=10000.0, gt=0, allow_inf_nan=False)
    rope_type: Literal[ROPE_TYPES] = "default"
    rope_factor: StrictFloat = Field(default=1.0, gt=0, allow_inf_nan=False)
    rope_low_freq_factor: StrictFloat = Field(default=1.0, gt=0, allow_inf_nan=False)
    rope_high_freq_factor: StrictFloat = Field(default=4.0, gt=0, allow_inf_nan=False)
    rope_original_max_pos: StrictInt = Field(default=8192, ge=1, le=INT_MAX)
    sliding_window: StrictInt | None = Field(default=None, ge=1, le=INT_MAX)

    @model_validator(mode="before")
    @classmethod
    def _default_head_dim(cls, data):
        if isinstance(data, dict) and data.get("head_dim") is None:
            hidden, heads = data.get("hidden"), data.get("heads")
            if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and hidden > 0:
                if hidden % heads:
                    raise RuleError("{hidden} must be divisible by {heads} (or give head_dim)", hidden=hidden, heads=heads)
                data = {**data, "head_dim": hidden // heads}
        return data

    @model_validator(mode="after")
    def _dims(self):
        if self.heads % self.kv_heads:
            raise RuleError("{heads} must be divisible by {kv_heads}", heads=self.heads, kv_heads=self.kv_heads)
        return self

    def to_json(self) -> dict:
        """The JSON form: the dimensions, and the variant fields only where they differ from the
        plain decoder (head_dim only when it is not hidden / heads), so a plain model's plan reads
        as it did before those fields existed."""
        d = self.model_dump(mode="json")
        plain = {"head_dim": self.hidden // self.heads if self.hidden % self.heads == 0 else None}
        for name, f in type(self).model_fields.items():
            if name in VARIANT_FIELDS and d[name] == plain.get(name, f.default):
                del d[name]
        return d

    @property
    def q_dim(self) -> int:
        """Width of the attention's query / output projection: heads * head_dim."""
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of one of the K / V projections: kv_heads * head_dim."""
        return self.kv_heads * self.head_dim


class PlanSpec(BaseModel):
    """The compile inputs plus the derived layout: slice lengths, placement, layers per stage.

    placement[r][c] is the global stage of local chunk c on rank r; stage_layers[s] the number
    of decoder layers of stage s (stage 0 also holds the embedding, the last stage the final
    norm, LM head and loss); slice_lens[mb] the token count of each slice of micro-batch mb.
    """

    model_config = _FROZEN
    schedule: StrictStr
    model: ModelConfig
    seq_len: StrictInt = Field(ge=1, le=INT_MAX)
    pp: StrictInt = Field(ge=1, le=INT_MAX)
    microbatches: StrictInt = Field(ge=1, le=INT_MAX)
    slices: StrictInt = Field(ge=1, le=INT_MAX)
    virtual_stages: StrictInt = Field(ge=1, le=INT_MAX)
    micro_batch_size: StrictInt = Field(default=1, ge=1, le=INT_MAX)
    partition: Literal["uniform", "flops", "custom"] = "uniform"
    slice_lens: tuple[tuple[StrictInt, ...], ...]
    placement: tuple[tuple[StrictInt, ...], ...]
    stage_layers: tuple[StrictInt, ...]
    # how stage_layers was chosen: uniform (even split), balanced (cost model), custom (by hand)
    layer_split: Literal["uniform", "balanced", "custom"] = "uniform"
    exchange: StrictBool = False
    exchange_threshold: StrictInt = Field(default=0, ge=0, le=INT_MAX)
    # the family's order splits each unit's backward into I and W (compile --split-backward;
    # the zero-bubble families split it whatever this says)
    split_backward: StrictBool = False
    tp: StrictInt = Field(default=1, ge=1, le=INT_MAX)
    cp: StrictInt = Field(default=1, ge=1, le=INT_MAX)
    dp: StrictInt = Field(default=1, ge=1, le=INT_MAX)
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
            if any(x % self.cp for x in lens):  # a GPU's share of a slice would be part of a token
                raise ValueError(f"slice_lens[{mb}]={list(lens)} must each be divisible by cp={self.cp} (context "
                                 f"parallelism splits every slice over the cp GPUs)")
        if len(self.placement) != p or any(len(ch) != v for ch in self.placement):
            raise ValueError(f"placement must list {v} stage(s) for each of {p} rank(s)")
        stages = sorted(s for ch in self.placement for s in ch)
        if stages != list(range(p * v)):
            raise ValueError(f"placement must use each stage 0..{p * v - 1} exactly once")
        if len(self.stage_layers) != p * v or any(x < 1 for x in self.stage_layers):
            raise ValueError(f"stage_layers needs {p * v} positive entries (one per stage)")
        if sum(self.stage_layers) != self.model.layers:
            raise ValueError(f"stage_layers sum to {sum(self.stage_layers)}, model has {self.model.layers} layers")
        heads, kv = self.model.heads, self.model.kv_heads
        if kv % self.tp:  # each GPU of a tensor-parallel group holds whole KV heads (kv divides heads: _dims)
            raise ValueError(f"tp={self.tp} must divide the model's {heads} attention heads and {kv} KV heads "
                             f"(each GPU of a tensor-parallel group holds whole heads)")
        w = self.model.sliding_window
        if w is not None and w < self.seq_len:
            raise ValueError(f"sliding_window={w} is shorter than seq_len={self.seq_len}: sliding-window attention "
                             f"is not supported (use --seq-len <= {w})")
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
