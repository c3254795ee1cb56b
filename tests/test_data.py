"""Real-data batches: every format gives the documented windows in the documented order; bad
ids and files are one-line SpecErrors."""
import json

import numpy as np
import pytest
import torch

import ir
from compiler import resolve_model
from compiler.layout import build_spec
from executor.data import Synthetic, TokenFile, make_source, open_tokens

SEQ = 8


def spec(m=2, mbs=1, vocab=1000):
    return build_spec("1f1b", resolve_model("tiny", {"vocab": vocab}), pp=2, microbatches=m, slices=1, virtual_stages=1,
                      seq_len=SEQ, micro_batch_size=mbs)


def write_bin(path, n, dtype="uint16"):
    np.arange(n, dtype=dtype).tofile(path)
    return str(path)


def test_windows_in_the_documented_order(tmp_path):
    """Sample i = ((step*dp + dp_rank)*m + mb)*mbs + row reads tokens [w*SEQ, w*SEQ + SEQ + 1)."""
    path = write_bin(tmp_path / "train.bin", 10 * SEQ + 1)  # W = 10 windows
    src = TokenFile(spec(m=2, mbs=2), path, dp=2)
    assert src.windows == 10
    b = src.batch(step=1, mb=1, dp_rank=1)
    i = ((1 * 2 + 1) * 2 + 1) * 2  # 14 -> epoch 1, window 4 and 5
    assert b.shape == (2, SEQ + 1) and b.dtype == torch.int64
    assert b[0].tolist() == list(range(4 * SEQ, 5 * SEQ + 1)) and b[1, 0] == 5 * SEQ
    assert i // 10 == 1
    # shuffled: a permutation of the windows per epoch, fixed by the seed, different per epoch
    sh = TokenFile(spec(m=1, mbs=1), path, shuffle_seed=7)
    first = [int(sh.batch(s, 0)[0, 0]) // SEQ for s in range(10)]
    second = [int(sh.batch(s, 0)[0, 0]) // SEQ for s in range(10, 20)]
    assert sorted(first) == sorted(second) == list(range(10)) and first != second and first != list(range(10))
    again = TokenFile(spec(m=1, mbs=1), path, shuffle_seed=7)
    assert [int(again.batch(s, 0)[0, 0]) // SEQ for s in range(10)] == first  # resumable: a pure function


def test_formats(tmp_path):
    s = spec(vocab=70000)
    ids = np.array([3, 69999, 5, 7] * 10, dtype="uint32")
    ids.tofile(tmp_path / "big.bin")  # vocab > 65536: uint32 by default
    assert open_tokens(str(tmp_path / "big.bin"), 70000)[:4].tolist() == [3, 69999, 5, 7]
    np.save(tmp_path / "t.npy", ids.astype("int32"))
    assert TokenFile(s, str(tmp_path / "t.npy")).batch(0, 0)[0, :2].tolist() == [3, 69999]
    # Megatron: the .idx header names the dtype (code 8 = uint16)
    np.array([1, 2, 3, 4] * 10, dtype="uint16").tofile(tmp_path / "meg.bin")
    (tmp_path / "meg.idx").write_bytes(b"MMIDIDX\x00\x00" + (1).to_bytes(8, "little") + bytes([8]))
    assert open_tokens(str(tmp_path / "meg.bin"), 70000)[:4].tolist() == [1, 2, 3, 4]


def test_text_with_a_trained_tokenizer(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = "def f(x):\n    return x + 1\n" * 50
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "a.txt").write_text(text)
    ids = open_tokens(str(tmp_path / "a.txt"), 300, str(tmp_path / "tokenizer.json"))
    assert tok.decode(ids.tolist()) == text
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ("def f(x):", "return 1")))
    ids = open_tokens(str(tmp_path / "a.jsonl"), 300, str(tmp_path / "tokenizer.json")).tolist()
    assert ids.count(tok.token_to_id("<|endoftext|>")) == 2


BAD = [
    (lambda p: write_bin(p / "x.bin", 100), dict(vocab=50), "token id 50 at position 50 is outside the model's vocabulary [0, 50)"),
    (lambda p: write_bin(p / "x.bin", 5), {}, "5 tokens, fewer than seq_len + 1 = 9"),
    (lambda p: str(p / "none.bin"), {}, "no such file"),
    (lambda p: (p / "x.csv").write_text("1,2") and str(p / "x.csv"), {}, "unknown data format '.csv'"),
    (lambda p: (p / "x.txt").write_text("hello") and str(p / "x.txt"), {}, "text data needs --tokenizer"),
    (lambda p: (p / "odd.bin").write_bytes(b"abc") and str(p / "odd.bin"), {}, "3 bytes is not a whole number of uint16"),
]


@pytest.mark.parametrize("make,kw,needle", BAD)
def test_bad_data_is_one_line(tmp_path, make, kw, needle):
    path = make(tmp_path)
    with pytest.raises(ir.SpecError, match=None) as e:
        TokenFile(spec(**kw), path)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_synthetic_stays_the_default():
    s = spec()
    src = make_source(s)
    assert isinstance(src, Synthetic)
    from executor.model import batch_tokens

    assert torch.equal(src.batch(3, 1), batch_tokens(s, 3, 1))
    with pytest.raises(ir.SpecError, match="--tokenizer and --shuffle-seed need --data"):
        make_source(s, shuffle_seed=1)
