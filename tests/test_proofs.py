"""Proofs remembered between commands (ir.proofs): `slimpipe check` notes a plan file's proof,
the commands after it skip their own for the same bytes and the same checker code, and anything
else (an edited file, another checker, a failed check, the cache turned off) proves again."""
import hashlib
import json
import os
import subprocess
import sys

import pytest

import ir
import passes.check  # noqa: F401 (the module: `passes.check` is also its function's name)
from compiler import build_spec, compile_plan, resolve_model
from compiler.cli import main

pc = sys.modules["passes.check"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def plan_file(tmp_path):
    spec = build_spec("1f1b", resolve_model("tiny"), pp=2, microbatches=2, seq_len=64)
    path = tmp_path / "plan.json"
    ir.save(compile_plan(spec), str(path))
    return str(path)


@pytest.fixture
def proofs_made(monkeypatch):
    """How many times the rules ran (passes.check.validate), counted."""
    calls = []
    real = pc.validate

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(pc, "validate", counting)
    return calls


def _stored():
    d = ir.proofs.cache_dir()
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def test_load_records_the_digest_of_the_bytes(plan_file):
    plan = ir.load(plan_file)
    assert plan.source == hashlib.sha256(open(plan_file, "rb").read()).hexdigest()
    assert plan.with_ranks(plan.ranks).source is None  # another plan: no file says what it is
    assert ir.loads(open(plan_file).read()).source is None


def test_check_notes_the_proof_and_simulate_uses_it(plan_file, proofs_made, capsys, monkeypatch):
    assert main(["simulate", plan_file, "--device-profile", "h100"]) == 0  # nothing noted yet: the rules run
    assert len(proofs_made) == 1 and _stored() == []  # the rules alone prove no deadlock freedom: nothing noted
    assert main(["check", plan_file]) == 0
    assert len(proofs_made) == 2
    key = pc.proof_key(ir.load(plan_file))
    assert _stored() == [key]
    noted = json.loads(ir.proofs.read(key))  # the proof's unit-cost figures: 1f1b p=2 m=2, F 1, B 2
    assert noted == {"unit_costs": {"makespan": 9.0, "bubble_fraction": 1 - 12 / 18, "kv_exchanges": 0, "ranks": [
        {"rank": 0, "busy": 6.0, "peak_units": 2}, {"rank": 1, "busy": 6.0, "peak_units": 1}]}}
    assert noted["unit_costs"] == passes.simulate_units(ir.load(plan_file))
    out_before = capsys.readouterr().out
    # simulate --unit-costs prints the noted figures: the plan's instructions are not even read
    monkeypatch.setattr(sys.modules["compiler.cli.cmd_simulate"], "load_plan", lambda *a: pytest.fail("plan read"))
    assert main(["simulate", plan_file, "--unit-costs", "--json"]) == 0
    assert len(proofs_made) == 2
    out = json.loads(capsys.readouterr().out)
    assert (out["makespan"], out["bubble_fraction"], [r["busy"] for r in out["ranks"]]) == (9.0, 1 - 12 / 18, [6.0, 6.0])
    assert "valid" in out_before
    assert main(["export", plan_file, "-o", plan_file + ".csv"]) == 0
    assert len(proofs_made) == 2


def test_simulate_unit_costs_is_a_whole_proof(plan_file, proofs_made):
    """The rules and the unit-cost replay (its deadlock proof) are what check runs: simulate
    --unit-costs of a plan that passes both notes the proof, with the replay."""
    assert main(["simulate", plan_file, "--unit-costs"]) == 0
    key = pc.proof_key(ir.load(plan_file))
    assert _stored() == [key] and json.loads(ir.proofs.read(key))["unit_costs"]["makespan"] == 9.0
    assert main(["export", plan_file, "-o", plan_file + ".csv"]) == 0
    assert main(["check", plan_file]) == 0  # check itself always proves
    assert len(proofs_made) == 2


@pytest.mark.parametrize("content", [b"", b"not json", b'{"unit_costs": {"makespan": 1.0}}', b'{"unit_costs": {"makespan": '
                                     b'"1", "bubble_fraction": 0, "kv_exchanges": 0, "ranks": [{"rank": 0, "busy": 1, "peak_units": 1}]}}'])
def test_a_proof_without_usable_figures_replays(plan_file, proofs_made, capsys, content):
    """A proof noted without the figures (an older slimpipe's empty file) or with ones of another
    shape: simulate --unit-costs replays (the rules are not run again)."""
    key = pc.proof_key(ir.load(plan_file))
    ir.proofs.note(key, content)
    assert main(["simulate", plan_file, "--unit-costs", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["makespan"] == 9.0 and proofs_made == []


def test_an_edited_file_is_proved_again(plan_file, proofs_made):
    assert main(["check", plan_file]) == 0
    with open(plan_file, "a") as f:
        f.write("\n")  # the same plan, other bytes
    assert main(["simulate", plan_file, "--unit-costs"]) == 0
    assert len(proofs_made) == 2


def test_a_broken_plan_is_never_noted(plan_file, proofs_made, capsys):
    doc = json.load(open(plan_file))
    doc["ranks"][0] = [t for t in doc["ranks"][0] if not t.startswith("SEND_ACT")]  # unmatched receives on rank 1
    with open(plan_file, "w") as f:
        json.dump(doc, f)
    assert main(["check", plan_file]) == 1
    assert _stored() == []
    assert main(["simulate", plan_file, "--unit-costs"]) == 1
    assert "plan breaks a rule, not simulated" in capsys.readouterr().err
    assert len(proofs_made) == 2


def test_another_checker_or_no_cache_proves_again(plan_file, proofs_made, monkeypatch):
    assert main(["check", plan_file]) == 0
    monkeypatch.setattr(pc, "_code_fingerprint", lambda: "another checker")
    assert main(["simulate", plan_file, "--unit-costs"]) == 0
    assert len(proofs_made) == 2
    monkeypatch.undo()
    monkeypatch.setattr(pc, "validate", lambda *a, **k: proofs_made.append(1) or [])
    monkeypatch.setenv("SLIMPIPE_NO_CACHE", "1")
    assert ir.proofs.cache_dir() is None
    assert main(["simulate", plan_file, "--unit-costs"]) == 0
    assert len(proofs_made) == 3


def test_require_valid_with_the_deadlock_proof_notes_it(plan_file, proofs_made):
    plan = ir.load(plan_file)
    pc.require_valid(plan, "not run", plan_file)  # what the executor calls
    assert _stored() == [pc.proof_key(plan)]
    pc.require_valid(plan, "not run", plan_file)
    assert len(proofs_made) == 1


def test_an_unwritable_store_changes_nothing(plan_file, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("SLIMPIPE_CACHE_DIR", str(blocker))  # proved/ cannot be made under a file
    assert main(["check", plan_file]) == 0
    assert main(["simulate", plan_file, "--unit-costs"]) == 0


def test_the_command_line_process_exits_with_mains_code(plan_file):
    """`python -m compiler.cli` (and the slimpipe script) end through os._exit after flushing:
    the same codes and the whole output."""
    run = lambda *a: subprocess.run([sys.executable, "-m", "compiler.cli", *a], capture_output=True, text=True,
                                    cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    ok = run("simulate", plan_file, "--unit-costs", "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["makespan"] == 9.0
    bad = run("check", plan_file + ".missing")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not found" in bad.stderr


def test_where_the_store_is(monkeypatch, tmp_path):
    monkeypatch.delenv("SLIMPIPE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ir.proofs.cache_dir() == str(tmp_path / "xdg" / "slimpipe" / "proved")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # the XDG spec: a relative path is ignored
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ir.proofs.cache_dir() == str(tmp_path / "home" / ".cache" / "slimpipe" / "proved")
    monkeypatch.setenv("HOME", "relative")  # no usable home: no store in the working folder
    assert ir.proofs.cache_dir() is None
    monkeypatch.setenv("SLIMPIPE_CACHE_DIR", str(tmp_path / "c"))
    for value, off in (("", False), ("0", False), ("1", True), ("no", True)):  # anything but '' and '0' turns it off
        monkeypatch.setenv("SLIMPIPE_NO_CACHE", value)
        assert (ir.proofs.cache_dir() is None) == off


def test_no_readable_checker_sources_no_memory(plan_file, proofs_made, monkeypatch):
    """slimpipe imported from a zip or installed without .py files: nothing to fingerprint the
    checker with, so nothing is remembered and every command proves (and none fails)."""
    monkeypatch.setattr(pc, "_code_fingerprint", lambda: None)
    assert main(["check", plan_file]) == 0
    assert main(["simulate", plan_file, "--unit-costs"]) == 0
    assert len(proofs_made) == 2 and _stored() == []
    monkeypatch.undo()
    real = pc._code_fingerprint
    assert real() is not None
    monkeypatch.setattr(pc.os, "listdir", lambda d: (_ for _ in ()).throw(NotADirectoryError(d)))  # a zip
    real.cache_clear()
    try:
        assert real() is None
    finally:
        monkeypatch.undo()
        real.cache_clear()


def test_output_that_cannot_be_written(plan_file):
    """The console entry with stdout closed (a valid plan is still exit 0), and with stdout on a
    full disk (one line, exit 120: the verdict never got out)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | {"PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "compiler.cli", "check", plan_file]
    closed = subprocess.run(cmd, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env, preexec_fn=lambda: os.close(1))
    assert closed.returncode == 0 and closed.stderr == ""
    missing = [sys.executable, "-m", "compiler.cli", "check", plan_file + ".missing"]
    closed = subprocess.run(missing, capture_output=True, text=True, cwd=ROOT, env=env, preexec_fn=lambda: os.close(2))
    assert closed.returncode == 2 and closed.stdout == ""  # the error line does not land in the output
    if os.path.exists("/dev/full"):
        with open("/dev/full", "w") as full:
            r = subprocess.run(cmd, stdout=full, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
            assert r.returncode == 120 and r.stderr == "slimpipe: error: cannot write the output: No space left on device\n"
            # unbuffered (as PYTHONUNBUFFERED=1 makes it): the command's own print fails, main says so
            r = subprocess.run(cmd, stdout=full, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env | {"PYTHONUNBUFFERED": "1"})
            assert r.returncode == 120 and r.stderr == "slimpipe check: error: No space left on device\n"
