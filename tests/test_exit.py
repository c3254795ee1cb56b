"""Issue 15.5: a successful run under torchrun sometimes ended with SIGABRT at exit ('terminate
called without an active exception' after 'reference check ok'; measured 3 in 80 runs of 1f1b
p=2 m=2 --steps 2 --check-reference on a loaded machine). faulthandler showed the main thread
with no Python frame left: the abort came from torch's C++ static destructors at exit(), which
destroyed a thread still joinable. The executor now ends a torchrun process with os._exit once
its output is flushed and its process groups are destroyed (executor.cli.entry).

50 consecutive runs must all exit 0 (before the fix, on this machine under load: 4 of the 100
rank processes aborted with SIGABRT, in runs 20, 32, 46 and 48; after it: none). Each run starts the two rank processes as torchrun would
(RANK, WORLD_SIZE, MASTER_ADDR/PORT), without torchrun's agent process: the abort was in a rank's
own exit, and the agent would double the imports."""
import os
import socket
import subprocess
import sys

import ir
from compiler import build_spec, compile_plan, resolve_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = int(os.environ.get("EXIT_RUNS", "50"))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fifty_consecutive_runs_exit_0(tmp_path):
    plan = str(tmp_path / "p.json")
    ir.save(compile_plan(build_spec("1f1b", resolve_model("tiny"), pp=2, microbatches=2, seq_len=128)), plan)
    base = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1"}
    bad = []
    for i in range(RUNS):
        port = str(_port())
        procs = [subprocess.Popen([sys.executable, "-m", "executor", plan, "--steps", "2", "--check-reference",
                                   "--quiet", "--timeout", "60"], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True,
                                  env={**base, "RANK": str(r), "LOCAL_RANK": str(r), "MASTER_PORT": port})
                 for r in range(2)]
        outs = [p.communicate(timeout=120)[0] for p in procs]
        for r, (p, out) in enumerate(zip(procs, outs)):
            if p.returncode != 0:
                bad.append((i, r, p.returncode, out[-500:]))
        assert "reference check ok" in outs[0], outs[0][-2000:]
    assert not bad, f"{len(bad)} of {2 * RUNS} rank processes did not exit 0: {bad[:3]}"
