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


def test_check_notes_the_proof_and_simulate_uses_it(plan_file, proofs_made, capsys):
    assert main(["simulate", plan_file, "--unit-costs"]) == 0  # nothing noted yet: the rules run
    assert len(proofs_made) == 1 and _stored() == []  # the rules alone prove no deadlock freedom: nothing noted
    assert main(["check", plan_file]) == 0
    assert len(proofs_made) == 2
    assert _stored() == [pc.proof_key(ir.load(plan_file))]
    out_before = capsys.readouterr().out
    assert main(["simulate", plan_file, "--unit-costs", "--json"]) == 0
    assert len(proofs_made) == 2  # proved by check: not again
    assert json.loads(capsys.readouterr().out)["makespan"] == 9.0 and "valid" in out_before
    assert main(["export", plan_file, "-o", plan_file + ".csv"]) == 0
    assert len(proofs_made) == 2


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
