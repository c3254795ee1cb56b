"""Data parallel x pipeline: pp=2 x dp=2 (4 processes) against the single-process reference on the
global batch (both replicas' micro-batches), under one torchrun agent and under two agents on this
machine (multi-node rendezvous), and in-process; a run without the gradient average fails the check."""
import json
import os
import subprocess
import sys

import pytest

import ir
from compiler import compile_plan
from tests.executor_plans import spec
from tests.test_executor_runs import ENV, ROOT, TOL, free_port, local_opts

PLANS = {
    "1f1b": lambda: spec("1f1b", 2, 3, dp=2),
    "interleaved-1f1b": lambda: spec("interleaved-1f1b", 2, 2, v=2, dp=2),
    "slimpipe": lambda: spec("slimpipe", 2, 2, n=4, exchange=True, dp=2),
}


def _paths(tmp):
    paths = []
    for name, make in PLANS.items():
        path = os.path.join(tmp, f"{name}.json")
        ir.save(compile_plan(make()), path)
        paths.append(path)
    return paths


def _results(stdout):
    out = {}
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[7:])
            out[r["plan"][:-5]] = r
    return out


def _agent(nproc, nnodes, node_rank, port, paths):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node-rank", str(node_rank),
           "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1", "--master-port", str(port),
           "tests/executor_driver.py"] + paths
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _check(res):
    assert set(res) == set(PLANS)
    for name, r in res.items():
        assert r["code"] == 0, name
        assert r["dp"] == 2 and r["pp"] == 2 and len(r["peak_activation_bytes"]) == 4, name
        assert r["max_grad_rel_err"] < TOL and r["loss_rel_err"] < TOL, (name, r)


@pytest.mark.parametrize("agents", [1, 2], ids=["one-agent", "two-agents"])
def test_pp2_dp2_reference_under_torchrun(tmp_path, agents):
    """4 processes: one agent with --nproc-per-node 4, or two agents (--nnodes 2 --node-rank 0/1,
    2 processes each) meeting at a rendezvous on 127.0.0.1, as two nodes would."""
    paths = _paths(str(tmp_path))
    port = free_port()
    procs = [_agent(4 // agents, agents, k, port, paths) for k in range(agents)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, "\n".join(l for l in err.splitlines() if not l.startswith("W1"))[-3000:]
    _check(_results(outs[0][0]))  # global rank 0 runs under the node-rank-0 agent


def test_pp2_dp2_in_process_and_the_average_matters(monkeypatch):
    """In-process the same plan passes; without the dp average each replica keeps its own half's
    gradients and the reference check (global batch) fails."""
    from executor import params
    from executor.runner import run_local

    plan = compile_plan(PLANS["1f1b"]())
    code, s = run_local(plan, local_opts())
    assert code == 0 and s["dp"] == 2 and s["max_grad_rel_err"] < TOL and s["loss_rel_err"] < TOL
    monkeypatch.setattr(params.GradReducer, "finish", lambda self, wait: None)
    code, s = run_local(plan, local_opts())
    assert code == 1 and s["max_grad_rel_err"] > 1e-2


@pytest.mark.parametrize("world, want", [
    ("6", "plan has pp=2 x dp=2 = 4 ranks but torchrun started 6 process(es); launch with --nproc-per-node 4"),
    ("3", "plan has pp=2 x dp=2 = 4 ranks but torchrun started 3 process(es)"),
])
def test_replica_count_mismatch_is_one_line(tmp_path, monkeypatch, capsys, world, want):
    from executor.cli import main

    path = str(tmp_path / "dp2.json")
    ir.save(compile_plan(PLANS["1f1b"]()), path)
    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("RANK", "0")
    assert main([path, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("executor: rank 0: error: " + want)


def test_dp1_plan_runs_world_over_pp_replicas():
    from executor.cli import replicas_mismatch

    sp = spec("1f1b", 2, 3)
    assert replicas_mismatch(sp, 4) == replicas_mismatch(sp, 2) == ""
    assert replicas_mismatch(sp, 3).startswith("plan has pp=2 ranks but torchrun started 3 process(es)")


def test_reduce_grad_follows_each_chunks_last_backward():
    """The pass puts REDUCE_GRAD c right after chunk c's last B on every rank (only that unit's sends
    in between), so chunk 1's all-reduce of interleaved-1f1b starts while chunk 0 still computes;
    dp=1 plans have none."""
    plan = compile_plan(PLANS["interleaved-1f1b"]())
    for r, stream in enumerate(plan.ranks):
        kinds = [i.kind for i in stream]
        assert kinds.count("REDUCE_GRAD") == 2 and kinds[-1] == "OPT"
        for c in (0, 1):
            last_b = max(i for i, ins in enumerate(stream) if ins.kind == "B" and ins.chunk == c)
            at = next(i for i, ins in enumerate(stream) if ins.kind == "REDUCE_GRAD" and ins.chunk == c)
            assert at > last_b and all(stream[i].kind == "SEND_GRAD" for i in range(last_b + 1, at)), (r, c)
        first = next(i for i, ins in enumerate(stream) if ins.kind == "REDUCE_GRAD")
        assert any(ins.kind == "B" for ins in stream[first:])  # chunk 1's reduction overlaps chunk 0's cool-down
    assert not any(i.kind == "REDUCE_GRAD" for s in compile_plan(spec("1f1b", 2, 3)).ranks for i in s)


def test_misplaced_reduce_grad_is_refused():
    from passes import check

    plan = compile_plan(PLANS["1f1b"]())
    stream = list(plan.ranks[0])
    at = next(i for i, ins in enumerate(stream) if ins.kind == "REDUCE_GRAD")
    last_b = max(i for i, ins in enumerate(stream) if ins.kind == "B")
    early = stream[:last_b] + [stream[at]] + [s for i, s in enumerate(stream[last_b:], last_b) if i != at]
    twice = stream[:at + 1] + [stream[at]] + stream[at + 1:]
    for bad in (early, twice):
        rep = check(plan.with_ranks([bad] + list(plan.ranks[1:])))
        assert not rep.ok and rep.problems[0].rule == "reduce-grad" and rep.problems[0].rank == 0


def test_executor_starts_each_reduction_at_its_instruction(monkeypatch):
    """Every chunk's all-reduce is already in flight when the step closes (started by REDUCE_GRAD,
    not by the fallback at the optimizer step)."""
    from executor import params
    from executor.runner import run_local

    seen = []
    finish = params.GradReducer.finish

    def checked(self, wait):
        seen.append(sorted(self.open))
        finish(self, wait)

    monkeypatch.setattr(params.GradReducer, "finish", checked)
    code, s = run_local(compile_plan(PLANS["interleaved-1f1b"]()), local_opts())
    assert code == 0 and s["max_grad_rel_err"] < TOL
    assert seen == [[0, 1]] * 4  # 4 ranks (2 x 2), one step, both chunks started by their instruction


def test_reduce_grad_exports_as_torchs_action():
    """torch.distributed.pipelining has the same action: a dp plan exports it per stage."""
    from compiler.torchcsv import to_rows

    rows = to_rows(compile_plan(PLANS["interleaved-1f1b"]()))
    cells = [[str(a) for a in row if a is not None] for row in rows]
    assert [c for c in cells[0] if c.endswith("REDUCE_GRAD")] == ["2REDUCE_GRAD", "0REDUCE_GRAD"]
    assert [c for c in cells[1] if c.endswith("REDUCE_GRAD")] == ["3REDUCE_GRAD", "1REDUCE_GRAD"]
