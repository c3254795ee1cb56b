"""Real input end to end: Python's own standard-library sources (present wherever Python is),
a byte-level BPE trained on them with `tokenizers`, and the tiny model trained by slimpipe at p=2
under torchrun for 120 steps: the loss falls well below its start. Bad data ends every rank with
one line, exit 2."""
import json
import math
import os
import re

from compiler.cli import main as slimpipe

from test_executor_runs import torchrun

MODULES = ["textwrap.py", "string.py", "shlex.py", "fnmatch.py", "glob.py", "heapq.py", "colorsys.py", "bisect.py",
           "functools.py", "contextlib.py", "copy.py", "abc.py", "keyword.py", "operator.py", "queue.py", "sched.py"]
VOCAB = 512
CONFIG = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": VOCAB}


def corpus(tmp) -> tuple[str, str]:
    """(corpus.txt, tokenizer.json): 16 stdlib modules (about 200 KB) and a BPE trained on them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    lib = os.path.dirname(os.__file__)
    text = "".join(open(os.path.join(lib, m), encoding="utf-8").read() for m in MODULES)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    paths = (os.path.join(tmp, "corpus.txt"), os.path.join(tmp, "tokenizer.json"))
    with open(paths[0], "w", encoding="utf-8") as f:
        f.write(text)
    tok.save(paths[1])
    return paths


def compile_plan(tmp, vocab=VOCAB) -> str:
    cfg, plan = os.path.join(tmp, "config.json"), os.path.join(tmp, "plan.json")
    with open(cfg, "w") as f:
        json.dump({**CONFIG, "vocab_size": vocab}, f)
    assert slimpipe(["compile", "--schedule", "slimpipe", "--pp", "2", "--microbatches", "2", "--slices", "2",
                     "--seq-len", "64", "--micro-batch-size", "4", "--model", cfg, "-o", plan]) == 0
    return plan


def test_stdlib_corpus_loss_falls(tmp_path):
    text, tok = corpus(str(tmp_path))
    plan = compile_plan(str(tmp_path))
    res = torchrun(2, ["-m", "executor", plan, "--data", text, "--tokenizer", tok, "--steps", "120", "--lr", "3e-3",
                       "--shuffle-seed", "0", "--timeout", "120"], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"^step \d+/120: loss ([0-9.]+)", res.stdout, re.M)]
    assert len(losses) == 120
    # measured: 6.263 at step 1 (about ln 512 = 6.238: uniform over the vocabulary), 4.22 averaged
    # over steps 111-120
    assert abs(losses[0] - math.log(VOCAB)) < 0.15
    last = sum(losses[-10:]) / 10
    assert last < losses[0] - 1.5, (losses[0], last)


def test_ids_beyond_the_vocabulary_end_every_rank_in_one_line(tmp_path):
    import numpy as np

    plan = compile_plan(str(tmp_path), vocab=300)
    ids = np.arange(1000, dtype="uint16") % 301  # 300 first appears at position 300
    ids.tofile(tmp_path / "train.bin")
    res = torchrun(2, ["-m", "executor", plan, "--data", str(tmp_path / "train.bin")], timeout=300)
    lines = sorted(l for l in res.stderr.splitlines() if l.startswith("executor:"))
    assert res.returncode != 0
    assert lines == [f"executor: rank {r}: error: --data {str(tmp_path / 'train.bin')!r}: token id 300 at position 300 "
                     f"is outside the model's vocabulary [0, 300)" for r in range(2)], res.stderr[-2000:]
