"""Every option of every command refuses nonsense with one line naming it, exit 2, nothing written.

The table below must hold a bad value for each option that takes one (the test walks the real
parsers, so an option added without a row here fails `test_every_option_has_a_bad_value`)."""
from __future__ import annotations

import argparse
import os
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO

import pytest

from compiler.cli import build_parser, main
from executor.cli import build_parser as executor_parser
from executor.cli import main as executor_main

PLAN = "<plan>"  # replaced by a valid 2-rank plan
CSV = "<csv>"  # replaced by that plan as a torch schedule CSV
OUT = "<out>"  # replaced by a path in an empty directory

BASE = {
    "compile": ["compile", "--schedule", "1f1b", "--pp", "2", "--microbatches", "2", "-o", OUT + ".json"],
    "check": ["check", PLAN],
    "simulate": ["simulate", PLAN],
    "show": ["show", PLAN],
    "trace": ["trace", PLAN, "-o", OUT + ".json"],
    "plot": ["plot", PLAN, "-o", OUT + ".png"],
    "compare": ["compare", "--pp", "2"],
    "tune": ["tune", "--gpus", "2", "-o", OUT + ".json"],
    "import": ["import", CSV, "-o", OUT + ".json"],
    "export": ["export", PLAN, "-o", OUT + ".csv"],
    "executor": [PLAN, "--local", "--quiet"],
    "profile": ["profile", "-o", OUT + ".json"],
}
MODEL = [("--model", "gpt5", "--model 'gpt5' is unknown"), ("--seq-len", "-3", "argument --seq-len: -3"),
         ("--layers", "0", "argument --layers: 0 is not allowed"), ("--hidden", "x", "argument --hidden: 'x'"),
         ("--heads", "0", "argument --heads: 0"), ("--kv-heads", "-1", "argument --kv-heads: -1"),
         ("--ffn", "1.5", "argument --ffn: '1.5' is not an integer"), ("--vocab", "0", "argument --vocab: 0")]
MISSING = "/nonexistent/plan.json"
BAD = {
    "compile": MODEL + [
        ("--schedule", "zigzag", "--schedule 'zigzag' is unknown"),
        ("--pp", "0", "argument --pp: 0 is not allowed; give an integer >= 1"),
        ("--microbatches", "-1", "argument --microbatches: -1"),
        ("--slices", "0", "argument --slices: 0"), ("--virtual-stages", "two", "argument --virtual-stages: 'two'"),
        ("--micro-batch-size", "0", "argument --micro-batch-size: 0"),
        ("--seed", "abc", "argument --seed: invalid int value: 'abc'"),
        ("--exchange-threshold", "-1", "argument --exchange-threshold: -1 is not allowed; give an integer >= 0"),
        ("--device-profile", "tpu9", "tpu9"), ("--partition", "zigzag", "--partition 'zigzag' is unknown"),
        ("--layer-split", "zigzag", "--layer-split 'zigzag' is unknown"),
        ("--placement", "zigzag", "--placement 'zigzag' is unknown"),
        ("--tp", "0", "argument --tp: 0"), ("--cp", "-2", "argument --cp: -2"), ("--dp", "0", "argument --dp: 0"),
        ("--output", "/nonexistent/dir/p.json", "does not exist"), ("--plan-format", "yaml", "argument --plan-format: invalid choice: 'yaml'"),
        # sizes past a C int, and plans too large to hold, refused before any work (ir.limits)
        ("--seq-len", "1" + "0" * 30, "argument --seq-len: 100000000000...(31 digits) is too large; give an integer from 1 to 2147483647"),
        ("--layers", "2147483648", "argument --layers: 2147483648 is too large; give an integer from 1 to 2147483647"),
        ("--microbatches", "2000000000", "the plan would hold 4,000,000,000 compute units (pp 2 x microbatches 2000000000 x "
                                         "slices 1 x virtual stages 1), more than slimpipe plans (16,777,216"),
        ("--layers", "1000000000", "a stage of 500000000 layers needs 2000000001 transport tags per plan tag (one per layer "
                                   "message) and the plan's p2p tags, up to 5, then pass"),
    ],
    "check": [("plan", MISSING, MISSING), ("--p2p", "nccl", "argument --p2p: invalid choice: 'nccl'")],
    "simulate": [("plan", MISSING, MISSING), ("--device-profile", "tpu9", "tpu9"), ("--dtype", "int8", "--dtype 'int8'"),
                 ("--against", MISSING, MISSING)],
    "profile": MODEL + [
        ("--device", "tpu", "argument --device: invalid choice: 'tpu'"),
        ("--dtype", "int8", "argument --dtype: invalid choice: 'int8'"), ("--scale", "0", "--scale 0 must be > 0"),
        ("--rounds", "0", "argument --rounds: 0 is not allowed; give an integer >= 1"),
        ("--name", "", "--name must not be empty"), ("--output", "/nonexistent/dir/p.json", "does not exist"),
    ],
    "show": [("plan", MISSING, MISSING), ("--max-steps", "-3", "argument --max-steps: -3 is not allowed"),
             ("--rank", "-1", "argument --rank: -1")],
    "trace": [("plan", MISSING, MISSING), ("--output", "/nonexistent/dir/t.json", "does not exist"),
              ("--device-profile", "tpu9", "tpu9")],
    "plot": [("plan", MISSING, MISSING), ("--output", OUT + ".txt", "unknown picture format"),
             ("--device-profile", "tpu9", "tpu9")],
    "compare": MODEL + [
        ("--pp", "0", "argument --pp: 0"), ("--microbatches", "0", "argument --microbatches: 0"),
        ("--tp", "0", "argument --tp: 0"), ("--cp", "-4", "argument --cp: -4"), ("--dp", "x", "argument --dp: 'x'"),
        ("--memory-budget", "lots", "--memory-budget 'lots'"), ("--device-profile", "tpu9", "tpu9"),
        ("--dtype", "int8", "--dtype 'int8' is unknown; allowed: bf16, fp16, fp32"),
        ("--schedules", "zigzag", "--schedules 'zigzag'"),
        ("--time-limit", "-1", "argument --time-limit: -1 is not allowed"),
        ("--time-limit", "1e308", "argument --time-limit: 1e308 is too large; give seconds from 0 (no limit) to 1000000"),
    ],
    "tune": MODEL + [
        ("--gpus", "0", "argument --gpus: 0"), ("--memory-budget", "0GiB", "--memory-budget '0GiB'"),
        ("--global-batch", "0", "argument --global-batch: 0"), ("--device-profile", "tpu9", "tpu9"),
        ("--dtype", "int8", "--dtype 'int8' is unknown; allowed: bf16, fp16, fp32"),
        ("--schedules", "zigzag", "--schedules 'zigzag'"), ("--tp", "0", "--tp '0'"), ("--cp", "a", "--cp 'a'"),
        ("--pp", "-1", "--pp '-1'"), ("--slices", "0", "--slices '0'"), ("--virtual-stages", "0", "--virtual-stages '0'"),
        ("--layer-split", "zigzag", "--layer-split 'zigzag'"), ("--top", "0", "argument --top: 0"), ("--time-limit", "-1", "argument --time-limit: -1 is not allowed"),
        ("--time-limit", "1e308", "argument --time-limit: 1e308 is too large; give seconds from 0 (no limit) to 1000000"),
        ("--output", "/nonexistent/dir/b.json", "does not exist"), ("--plot", OUT + ".txt", "--plot"), ("--plan-format", "yaml", "argument --plan-format: invalid choice: 'yaml'"),
    ],
    "import": MODEL + [("plan", MISSING, MISSING), ("--output", "/nonexistent/dir/p.json", "does not exist"), ("--plan-format", "yaml", "argument --plan-format: invalid choice: 'yaml'")],
    "export": [("plan", MISSING, MISSING), ("--format", "onnx", "argument --format: invalid choice: 'onnx'"),
               ("--output", "/nonexistent/dir/s.csv", "does not exist")],
    "executor": [
        ("plan", MISSING, MISSING), ("--p2p-match", "fifo", "argument --p2p-match: invalid choice: 'fifo'"),
        ("--p2p-wait", "spin", "argument --p2p-wait: invalid choice: 'spin'"),
        ("--post-ahead", "-1", "argument --post-ahead: '-1' is not allowed; give an integer from 0 to 2147483647, or all"), ("--steps", "0", "argument --steps: 0 is not allowed"),
        ("--threads", "1" + "0" * 30, "argument --threads: 100000000000...(31 digits) is too large; give an integer from 1 to 2147483647"),
        ("--threads", "100000", "argument --threads: 100000 is too large; give an integer from 1 to 1024"),
        ("--timeout", "1e308", "argument --timeout: 1e308 is too large; give a number of seconds > 0 and at most 1000000"),
        ("--post-ahead", "2147483648", "argument --post-ahead: '2147483648' is not allowed; give an integer from 0 to 2147483647, or all"),
        ("--attention", "magic", "argument --attention: invalid choice: 'magic'"),
        ("--device", "tpu", "argument --device: invalid choice: 'tpu'"),
        ("--dtype", "int8", "argument --dtype: invalid choice: 'int8'"), ("--lr", "-1", "argument --lr: -1"),
        ("--lr", "-1e-3", "argument --lr: -1e-3 is not allowed"),  # argparse alone: "expected one argument"
        ("--timeout", "nan", "argument --timeout: 'nan' is not a finite number"),
        ("--timeout", "10s", "argument --timeout: '10s' is not a number (write it without a unit, e.g. 10; times are in seconds)"),
        ("--threads", "0", "argument --threads: 0"),
        ("--malloc-arenas", "-1", "argument --malloc-arenas: -1 is not allowed; give an integer >= 0"),
        ("--warmup", "-1", "argument --warmup: -1"), ("--lr-decay", "linear", "argument --lr-decay: invalid choice"),
        ("--decay-steps", "0", "argument --decay-steps: 0"), ("--min-lr", "-1", "argument --min-lr: -1"),
        ("--clip", "x", "argument --clip: 'x'"), ("--save", PLAN, "exists and is not a directory"),
        ("--save-every", "0", "argument --save-every: 0"), ("--resume", "/nonexistent/ck", "no such directory"),
        ("--metrics", "/nonexistent/dir/m.jsonl", "not a writable file path"),
        ("--trace", "/nonexistent/dir/t.json", "does not exist"),
        ("--data", "/nonexistent/d.bin", "--data '/nonexistent/d.bin': no such file"),
        ("--data-dtype", "int8", "argument --data-dtype: invalid choice: 'int8'"),
        ("--export-hf", "/nonexistent/dir/x", "the directory /nonexistent/dir does not exist"),
        ("--hf-model", "/nonexistent/m", "--hf-model '/nonexistent/m': no such directory"),
        ("--shuffle-seed", "x", "argument --shuffle-seed: invalid int value: 'x'"),
        ("--tokenizer", "/nonexistent/t.json", "--tokenizer and --shuffle-seed need --data PATH"),
    ],
}
CASES = [(cmd, opt, val, needle) for cmd, rows in BAD.items() for opt, val, needle in rows]


def _options(parser: argparse.ArgumentParser) -> set[str]:
    """The options of a parser that take a value (long names), and 'plan' for the positional."""
    return {a.option_strings[-1] if a.option_strings else a.dest for a in parser._actions
            if a.nargs != 0 and not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))}


def test_every_option_has_a_bad_value():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parsers = {**sub.choices, "executor": executor_parser()}
    assert set(parsers) == set(BAD)
    for name, parser in parsers.items():
        assert _options(parser) == {opt for opt, _, _ in BAD[name]}, name


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("plan") / "plan.json")
    assert main(["compile", "--schedule", "1f1b", "--pp", "2", "--microbatches", "2", "-o", path]) == 0
    assert main(["export", path, "-o", path + ".csv"]) == 0
    return path


def _call(argv: list[str], executor: bool = False) -> tuple[int, str, str]:
    out, err = StringIO(), StringIO()
    entry = executor_main if executor else main
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = entry(argv)
        except SystemExit as e:  # argparse
            code = e.code
    return code, out.getvalue(), err.getvalue()


def _argv(cmd: str, opt: str, val: str, plan: str, out: str) -> list[str]:
    argv = list(BASE[cmd])
    if opt == "plan":
        argv[argv.index(PLAN if PLAN in argv else CSV)] = val
    elif opt in argv or (opt == "--output" and "-o" in argv):
        argv[argv.index(opt if opt in argv else "-o") + 1] = val
    else:
        argv += [opt, val]
    return [a.replace(CSV, plan + ".csv").replace(PLAN, plan).replace(OUT, out) for a in argv]


@pytest.mark.parametrize("cmd,opt,val,needle", CASES, ids=[f"{c}{o}" for c, o, _, _ in CASES])
def test_bad_value_one_line_exit_2_nothing_written(tmp_path, plan_path, cmd, opt, val, needle):
    out = str(tmp_path / "out")
    argv = _argv(cmd, opt, val.replace(OUT, out), plan_path, out)
    code, stdout, err = _call(argv, executor=cmd == "executor")
    assert code == 2, (argv, code, stdout, err)
    needle = needle.replace(OUT, out)
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    assert os.listdir(tmp_path) == [], argv


def test_show_rank_outside_the_plan(plan_path, capsys):
    """The issue's input: `show --list --rank 7` on a 2-rank plan printed nothing and exited 0."""
    assert main(["show", plan_path, "--list", "--rank", "7"]) == 2
    err = capsys.readouterr().err
    assert "--rank 7 is not a rank of" in err and "allowed: 0..1" in err and err.count("\n") == 1
    assert main(["show", plan_path, "--rank", "1"]) == 2  # --rank without --list would be ignored
    assert "add --list" in capsys.readouterr().err
    assert main(["show", plan_path, "--list", "--rank", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "rank 1:"


def test_show_max_steps_negative(plan_path, capsys):
    """The issue's input: `show --max-steps -3` printed an empty grid and exited 0."""
    assert main(["show", plan_path, "--max-steps", "-3"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "argument --max-steps: -3 is not allowed; give an integer >= 1" in err


@pytest.mark.parametrize("argv,needle", [
    (["trace", PLAN, "-o", OUT + ".json", "--unit-costs", "--device-profile", "a100"], "--unit-costs takes no --device-profile"),
    (["compile", "--schedule", "1f1b", "--pp", "2", "--microbatches", "2", "--exchange-threshold", "2", "-o", OUT + ".json"],
     "--exchange-threshold 2 caps the KV exchange, which this plan does not run"),
    (["compile", "--schedule", "1f1b", "--pp", "2", "--microbatches", "2", "--split-backward", "-o", OUT + ".json"],
     "--split-backward: 1f1b runs a fused backward; the families that split it are slimpipe, zb-h1"),
])
def test_options_that_do_not_apply(tmp_path, plan_path, argv, needle):
    """An option that would be silently ignored is refused instead."""
    out = str(tmp_path / "out")
    code, _, err = _call([a.replace(PLAN, plan_path).replace(OUT, out) for a in argv])
    assert code == 2 and needle in err and err.count("\n") == 1, err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("extra,needle", [
    (["--min-lr", "0.1"], "--min-lr 0.1 shapes the cosine decay, which is off: add --lr-decay cosine"),
    (["--decay-steps", "5"], "--decay-steps shapes the cosine decay, which is off"),
    (["--lr-decay", "cosine", "--min-lr", "1"], "--min-lr 1 is above --lr 0.001"),
    (["--data-dtype", "uint16"], "--data-dtype uint16 is the width of a --data token file: add --data PATH"),
])
def test_executor_options_that_would_be_ignored(plan_path, extra, needle):
    """The executor refused --shuffle-seed without --data but ignored these (found by an audit
    helper): one line, exit 2, before any rank starts."""
    code, _, err = _call([plan_path, "--local", "--steps", "1", *extra], executor=True)
    assert code == 2 and needle in err and err.count("\n") == 1, err


def test_attention_the_machine_cannot_honour_is_one_line_before_any_rank(plan_path, monkeypatch):
    """--attention flash without CUDA (or flash_attn) printed its error once per in-process rank,
    from inside the run; it is one line, exit 2, before any rank starts."""
    code, out, err = _call([plan_path, "--local", "--quiet", "--device", "cpu", "--attention", "flash"], executor=True)
    assert (code, out, err) == (2, "", "executor: error: --attention flash needs --device cuda\n")
    import executor.attention as attention

    monkeypatch.setattr(attention, "self_test", lambda *a, **k: "relative error 3.00e-01 against the math reference")
    code, out, err = _call([plan_path, "--local", "--quiet", "--device", "cpu", "--attention", "sdpa"], executor=True)
    assert (code, out, err) == (2, "", "executor: error: --attention sdpa: backend sdpa failed its self-test "
                                       "(relative error 3.00e-01 against the math reference)\n")
    # auto falls back to the math backend: chosen (and said) once for both ranks, which run on it
    code, out, err = _call([plan_path, "--local", "--quiet", "--device", "cpu"], executor=True)
    assert (code, err) == (0, "")
    assert out.count("executor: attention backend sdpa skipped: relative error 3.00e-01") == 1, out
