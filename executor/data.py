"""Where a step's tokens come from: synthetic tokens (the default) or a real corpus.

The contract every consumer (the interpreter, the reference check, a resumed run) relies on:

    source.batch(step, mb, dp_rank=0, device="cpu") -> LongTensor [micro_batch_size, seq_len + 1]

a pure function of its arguments: the same on every pipeline rank, and a run resumed at step k
reads exactly the batches a straight run reads from step k on.

Real data (`--data PATH`): one stream of token ids, from
  .bin   raw little-endian uint16 or uint32 ids (nanoGPT's train.bin; Megatron's .bin, whose .idx
         header gives the dtype; otherwise uint16 if the vocabulary fits in 16 bits, else uint32,
         or --data-dtype), memory-mapped;
  .npy   a 1-D integer array (memory-mapped);
  .txt / .jsonl  text, encoded with --tokenizer tokenizer.json (the tokenizers library); a .jsonl
         line is an object with a "text" field (or a JSON string); documents are joined with the
         tokenizer's end-of-text token when it has one.
The stream is cut into W = (N - 1) // seq_len windows of seq_len + 1 tokens (window w starts at
token w * seq_len: inputs are its first seq_len tokens, labels the last seq_len). Sample number
    i = ((step * dp + dp_rank) * microbatches + mb) * micro_batch_size + row
reads window perm_e(i mod W) of epoch e = i // W, where perm_e is the identity, or with
--shuffle-seed S the permutation torch.randperm(W) drawn from a generator seeded S + e.
"""
from __future__ import annotations

import json
import os

import torch

from ir import SpecError

from . import model as M

MEGATRON_DTYPES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 8: "uint16"}
EOT_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")


class Synthetic:
    """The default: random ids from a generator seeded by (plan seed, step, micro-batch); dp replicas
    draw different batches (dp_rank 0 reads what a plain run reads)."""

    def __init__(self, spec):
        self.spec = spec

    def batch(self, step: int, mb: int, dp_rank: int = 0, device="cpu") -> torch.Tensor:
        return M.batch_tokens(self.spec, step, mb + dp_rank * self.spec.microbatches, device)


def _megatron_dtype(idx_path: str, where: str) -> str:
    with open(idx_path, "rb") as f:
        head = f.read(18)
    if len(head) < 18 or not head.startswith(b"MMIDIDX\x00\x00"):
        raise SpecError(f"{where}: {idx_path} is not a Megatron index (.idx) file")
    code = head[17]
    if code not in MEGATRON_DTYPES:
        raise SpecError(f"{where}: {idx_path} names token dtype code {code}; allowed: integer codes "
                        f"{sorted(MEGATRON_DTYPES)}")
    return MEGATRON_DTYPES[code]


def _encode_text(path: str, tokenizer_path: str | None, where: str):
    if tokenizer_path is None:
        raise SpecError(f"{where}: text data needs --tokenizer tokenizer.json")
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise SpecError(f"{where}: text data needs the optional package tokenizers (pip install 'slimpipe[hf]'): {e}") from None
    try:
        tok = Tokenizer.from_file(tokenizer_path)
    except Exception as e:  # noqa: BLE001 - the library's own parse/IO error
        raise SpecError(f"--tokenizer {tokenizer_path!r}: not a readable tokenizer.json ({type(e).__name__})") from None
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{where}: cannot read the text ({type(e).__name__})") from None
    if path.endswith(".jsonl"):
        docs = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                raise SpecError(f"{where}: line {n} is not JSON") from None
            text = obj.get("text") if isinstance(obj, dict) else obj
            if not isinstance(text, str):
                raise SpecError(f"{where}: line {n} has no \"text\" string")
            docs.append(text)
    else:
        docs = [raw]
    eot = next((tok.token_to_id(t) for t in EOT_TOKENS if tok.token_to_id(t) is not None), None)
    ids: list[int] = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        ids.extend(enc.ids)
        if eot is not None and len(docs) > 1:
            ids.append(eot)
    return torch.tensor(ids, dtype=torch.int64)


def open_tokens(path: str, vocab: int, tokenizer: str | None = None, dtype: str | None = None):
    """The token stream of a data file (an array supporting len() and slicing to int64), every id
    checked to lie in [0, vocab): SpecError naming the first bad value otherwise."""
    where = f"--data {path!r}"
    if not os.path.isfile(path):
        raise SpecError(f"{where}: no such file")
    ext = os.path.splitext(path)[1]
    if ext in (".txt", ".jsonl"):
        arr = _encode_text(path, tokenizer, where)
    elif ext in (".bin", ".npy"):
        import numpy as np

        if ext == ".npy":
            try:
                arr = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise SpecError(f"{where}: not a readable .npy file ({type(e).__name__})") from None
            if arr.ndim != 1 or arr.dtype.kind not in "iu":
                raise SpecError(f"{where}: must hold a 1-D integer array, not {arr.ndim}-D {arr.dtype}")
        else:
            idx = os.path.splitext(path)[0] + ".idx"
            if dtype is None:
                dtype = _megatron_dtype(idx, where) if os.path.exists(idx) else ("uint16" if vocab <= 65536 else "uint32")
            size = os.path.getsize(path)
            width = np.dtype(dtype).itemsize
            if size == 0 or size % width:
                raise SpecError(f"{where}: {size} bytes is not a whole number of {dtype} token ids")
            arr = np.memmap(path, dtype=dtype, mode="r")
    else:
        raise SpecError(f"{where}: unknown data format {ext or '(no extension)'!r}; allowed: .bin, .npy, .txt, .jsonl")
    _check_ids(arr, vocab, where)
    return arr


def _check_ids(arr, vocab: int, where: str, chunk: int = 1 << 24) -> None:
    for start in range(0, len(arr), chunk):
        part = torch.as_tensor(arr[start:start + chunk].astype("int64") if hasattr(arr, "astype")
                               else arr[start:start + chunk])
        bad = ((part < 0) | (part >= vocab)).nonzero()
        if len(bad):
            at = int(bad[0, 0])
            raise SpecError(f"{where}: token id {int(part[at])} at position {start + at} is outside the "
                            f"model's vocabulary [0, {vocab})")


class TokenFile:
    """Windows of a real token stream in the documented order (see the module docstring)."""

    def __init__(self, spec, path: str, dp: int = 1, tokenizer: str | None = None, shuffle_seed: int | None = None,
                 dtype: str | None = None):
        self.spec, self.dp, self.seed = spec, dp, shuffle_seed
        self.tokens = open_tokens(path, spec.model.vocab, tokenizer, dtype)
        self.windows = (len(self.tokens) - 1) // spec.seq_len
        if self.windows < 1:
            raise SpecError(f"--data {path!r}: {len(self.tokens)} tokens, fewer than seq_len + 1 = {spec.seq_len + 1}")
        self._perm: tuple[int, torch.Tensor] | None = None

    def window(self, i: int) -> int:
        """Window of global sample number i."""
        e, k = divmod(i, self.windows)
        if self.seed is None:
            return k
        perm = self._perm  # one read: ranks of an in-process run share this object
        if perm is None or perm[0] != e:
            g = torch.Generator().manual_seed(self.seed + e)
            perm = self._perm = (e, torch.randperm(self.windows, generator=g))
        return int(perm[1][k])

    def sample(self, i: int) -> torch.Tensor:
        s = self.spec.seq_len
        w = self.window(i)
        part = self.tokens[w * s:w * s + s + 1]
        return torch.as_tensor(part.astype("int64") if hasattr(part, "astype") else part).to(torch.int64)

    def batch(self, step: int, mb: int, dp_rank: int = 0, device="cpu") -> torch.Tensor:
        spec = self.spec
        b = spec.micro_batch_size
        first = ((step * self.dp + dp_rank) * spec.microbatches + mb) * b
        return torch.stack([self.sample(first + r) for r in range(b)]).to(device)


def make_source(spec, path: str | None = None, dp: int = 1, tokenizer: str | None = None,
                shuffle_seed: int | None = None, dtype: str | None = None):
    """The batch source of a run: Synthetic(spec) without a path, else TokenFile."""
    if path is None:
        if tokenizer is not None or shuffle_seed is not None:
            raise SpecError("--tokenizer and --shuffle-seed need --data PATH")
        return Synthetic(spec)
    return TokenFile(spec, path, dp, tokenizer, shuffle_seed, dtype)


class StepBatches:
    """Tokens [micro_batch_size, seq_len + 1] (inputs and next-token labels) of each micro-batch
    of the current step, from `source` (default: Synthetic); the first and the last stage of a
    rank share one copy."""

    def __init__(self, spec, device, source=None, dp_rank: int = 0):
        self.spec, self.device = spec, device
        self.source = source if source is not None else Synthetic(spec)
        self.dp_rank = dp_rank
        self.step = 0
        self.cache: dict = {}

    def begin(self, step: int) -> None:
        self.step, self.cache = step, {}

    def tokens(self, mb: int):
        t = self.cache.get(mb)
        if t is None:
            t = self.cache[mb] = self.source.batch(self.step, mb, self.dp_rank, self.device)
        return t


SyntheticBatches = StepBatches  # the name before real data existed
