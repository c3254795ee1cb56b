"""Ctrl-C (issue 17): the executor says it was interrupted and in which step, one line per process,
exit 130 in-process; under torchrun every rank says so (none blames a lost connection)."""
import os
import re
import signal
import subprocess
import sys

import pytest

import ir
from compiler import build_spec, compile_plan, resolve_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
ENV.pop("SLIMPIPE_FAULT", None)


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("interrupt") / "plan.json")
    ir.save(compile_plan(build_spec("1f1b", resolve_model("tiny"), pp=2, microbatches=2, seq_len=32)), path)
    return path


def interrupt_after(cmd: list[str], steps_seen: int) -> tuple[int, str, int]:
    """Start `cmd` in its own process group, send SIGINT to the group (a terminal's Ctrl-C) once
    `steps_seen` progress lines are out; (exit code, stderr, last step seen)."""
    # SIGINT back to its default in the child: a shell starts background jobs with SIGINT ignored, and
    # Python then installs no KeyboardInterrupt handler (pytest run as `... &` passed that on)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = 0
    try:
        for text in proc.stdout:
            if text.startswith("step "):
                seen += 1
                if seen == steps_seen:
                    break
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, err, seen


def test_ctrl_c_in_process(plan_file):
    code, err, seen = interrupt_after([sys.executable, "-m", "executor", plan_file, "--local", "--steps", "200"], 2)
    assert code == 130, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    m = re.fullmatch(r"executor: interrupted in step (\d+) of 200 \(Ctrl-C\)", lines[0])
    assert m and int(m.group(1)) >= seen, lines


def test_ctrl_c_under_torchrun(plan_file):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    code, err, seen = interrupt_after([torchrun, "--nproc-per-node", "2", "-m", "executor", plan_file, "--steps",
                                       "200", "--timeout", "30"], 2)
    assert code != 0
    ours = [t for t in err.splitlines() if t.startswith("executor:")]
    assert sorted(int(re.match(r"executor: rank (\d+): ", t).group(1)) for t in ours) == [0, 1], err
    for t in ours:
        assert re.match(r"executor: rank \d: interrupted in step \d+ of 200 \(Ctrl-C\) at rank \d", t), t
    assert "connection" not in "\n".join(ours) and "launcher ends the job" not in "\n".join(ours)
