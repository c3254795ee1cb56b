"""The executor against the single-process reference: every schedule family under torchrun
(gloo) at p=2 and p=4, a hand-edited plan, the in-process transport, and launch errors."""
import json
import os
import socket
import subprocess
import sys

import pytest

import ir
from ir import KV
from executor.cli import options as executor_options
from passes import check
from tests.executor_plans import matrix
from compiler import compile_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
TOL = 1e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(p, args, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(p), "--master-addr", "127.0.0.1",
           "--master-port", str(free_port())] + args
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def swapped_plan(plan):
    """Swap the first adjacent pair of different-kind instructions on rank 0 that keeps the plan valid."""
    stream = list(plan.ranks[0])
    for i in range(len(stream) - 1):
        a, b = stream[i], stream[i + 1]
        if a.kind == b.kind or "OPT" in (a.kind, b.kind) or (a.mb, a.slice) == (b.mb, b.slice):
            continue
        new = stream[:i] + [b, a] + stream[i + 2:]
        cand = plan.with_ranks([new] + list(plan.ranks[1:]), hand_edited=f"rank 0 #{i} <-> #{i + 1}")
        if check(cand).ok:
            return cand
    raise AssertionError("no valid swap found")


def run_matrix(p, tmp):
    plans = matrix(p)
    if p == 2:
        plans["hand-edited-1f1b"] = swapped_plan(plans["1f1b"])
        plans["hand-edited-slimpipe"] = swapped_plan(plans["slimpipe-v1-exchange"])
    paths = []
    for name, plan in plans.items():
        assert check(plan).ok, name
        path = os.path.join(tmp, f"{name}.json")
        ir.save(plan, path)
        paths.append(path)
    res = torchrun(p, ["tests/executor_driver.py"] + paths)
    assert res.returncode == 0, "\n".join(l for l in res.stderr.splitlines() if not l.startswith("W1"))[:4000]
    out = {}
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[7:])
            out[r["plan"][:-5]] = r
    assert set(out) == set(plans), res.stdout[-2000:]
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    cache = {}

    def get(p):
        if p not in cache:
            cache[p] = run_matrix(p, str(tmp_path_factory.mktemp(f"p{p}")))
        return cache[p]

    return get


NAMES = list(matrix(2))


@pytest.mark.parametrize("p", [2, 4])
@pytest.mark.parametrize("name", NAMES)
def test_reference_check_under_torchrun(results, p, name):
    r = results(p)[name]
    assert r["code"] == 0
    assert r["max_grad_rel_err"] < TOL
    assert r["loss_rel_err"] < TOL
    assert abs(r["loss"] - r["ref_loss_step1"]) <= TOL * abs(r["ref_loss_step1"])
    assert len(r["peak_activation_bytes"]) == p and min(r["peak_activation_bytes"]) > 0


def test_matrix_runs_every_post_ahead(results):
    """The driver gives the plans --post-ahead all (the default, None), 0, 1 and 2 in turn: each
    setting passes the reference check on some plan at p=2; the exchange plans (watcher waits) get all, 0 and 2."""
    from tests.executor_driver import POST_AHEAD
    got = {}
    for name, r in results(2).items():
        got.setdefault(r["post_ahead"], []).append(name)
    assert set(got) == set(POST_AHEAD), got
    assert {None, 0, 2} <= {results(2)[n]["post_ahead"] for n in results(2) if "exchange" in n}


@pytest.mark.parametrize("name", ["hand-edited-1f1b", "hand-edited-slimpipe"])
def test_hand_edited_plan_runs_exactly(results, name):
    r = results(2)[name]
    assert r["code"] == 0 and r["max_grad_rel_err"] < TOL and r["loss_rel_err"] < TOL


def test_exchange_plans_carry_kv_instructions():
    plans = matrix(4)
    for name in ("slimpipe-v1-exchange", "slimpipe-v2-exchange", "seq1f1b-v1-flops-exchange"):
        kinds = {i.kind for r in plans[name].ranks for i in r}
        assert {"KVF_SEND", "KVF_RECV", "KVB_SEND", "KVB_RECV"} <= kinds, name
    # the levelled plans (p=4, n=8) carry every form issue 13 added: helpers of both directions,
    # several partners before one unit, ranges that cut slices (slices are 8 tokens here)
    for name in ("slimpipe-levelled-v1", "slimpipe-levelled-v2"):
        plan = plans[name]
        kinds = {i.kind for r in plan.ranks for i in r}
        assert {"KVF_HELP", "KVB_HELP", "KVF_RECV", "KVB_RECV"} <= kinds, name
        most, cut = 0, 0
        for s in plan.ranks:
            run = 0
            for ins in s:
                run = run + 1 if ins.kind in ("KVF_SEND", "KVB_SEND") else (0 if ins.kind not in KV else run)
                most = max(most, run)
                cut += ins.kind in KV and (ins.lo % 8 or ins.hi % 8)
        assert most >= 3 and cut > 0, name


def local_opts(**kw):
    kw = {"check_reference": True, "quiet": True, "device": "cpu", "timeout": 120.0, **kw}
    return executor_options(**kw)


def test_local_transport_matches_torchrun(results):
    from executor.runner import run_local

    plan = matrix(4)["slimpipe-v2-exchange"]
    code, summary = run_local(plan, local_opts())
    dist = results(4)["slimpipe-v2-exchange"]
    assert code == 0
    assert abs(summary["loss"] - dist["loss"]) <= 1e-6 * abs(dist["loss"])
    assert summary["max_grad_rel_err"] < TOL
    assert summary["transport"] == "local" and dist["transport"] == "dist"


def test_local_two_steps_train():
    from executor.runner import run_local

    plan = matrix(2)["slimpipe-v1-exchange"]
    code, summary = run_local(plan, local_opts(steps=2, lr=1e-2))
    assert code == 0 and summary["steps"] == 2 and summary["loss"] > 0


def test_slimpipe_holds_less_activation_than_1f1b():
    from executor.runner import run_local

    seq, p, m = 1024, 4, 4
    plans = {
        "1f1b": compile_plan(_spec(p, m, seq, "1f1b", 1)),
        "slimpipe": compile_plan(_spec(p, m, seq, "slimpipe", 8)),
    }
    peak = {}
    for name, plan in plans.items():
        code, s = run_local(plan, local_opts(check_reference=False))
        assert code == 0
        peak[name] = s["peak_activation_bytes"][0]
    assert peak["slimpipe"] < 0.6 * peak["1f1b"], peak


def _spec(p, m, seq, schedule, n):
    from compiler import resolve_model
    from compiler.layout import build_spec

    return build_spec(schedule, resolve_model("tiny"), pp=p, microbatches=m, slices=n, seq_len=seq)


def run_cli(args, env=None):
    return subprocess.run([sys.executable, "-m", "executor"] + args, cwd=ROOT, env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=120)


def test_world_size_mismatch_is_one_line_on_every_rank(tmp_path):
    path = str(tmp_path / "p4.json")
    ir.save(matrix(4)["1f1b"], path)
    res = torchrun(2, ["-m", "executor", path], timeout=120)
    assert res.returncode != 0
    lines = [l for l in res.stderr.splitlines() if l.startswith("executor:")]
    assert sorted(lines) == [f"executor: rank {r}: error: plan has pp=4 ranks but torchrun started 2 process(es); "
                             f"launch with --nproc-per-node 4" for r in range(2)]


def test_unknown_schema_version_and_malformed_plan(tmp_path):
    d = ir.to_dict(matrix(2)["gpipe"])
    d["schema_version"] = 99
    bad = tmp_path / "v99.json"
    bad.write_text(json.dumps(d))
    res = run_cli([str(bad), "--local"])
    assert res.returncode == 2 and "schema_version 99" in res.stderr and "Traceback" not in res.stderr
    (tmp_path / "junk.json").write_text("{not json")
    res = run_cli([str(tmp_path / "junk.json")], env={"WORLD_SIZE": "2", "RANK": "1"})
    assert res.returncode == 2 and res.stderr.startswith(f"executor: rank 1: error: {tmp_path / 'junk.json'}: plan is not valid JSON")
    assert len(res.stderr.strip().splitlines()) == 1


def test_direct_wait_is_refused_for_a_plan_with_kv_exchanges(tmp_path):
    """Ranks of an exchange serve their partners' requests while they wait: --p2p-wait direct (the
    rank blocked in one message) could deadlock them, so it is refused before any rank starts."""
    path = str(tmp_path / "s.json")
    ir.save(matrix(2)["slimpipe-v1-exchange"], path)
    res = run_cli([path, "--p2p-wait", "direct", "--check-only"])
    assert res.returncode == 2 and res.stderr == (
        "executor: error: --p2p-wait direct: the plan has KV exchanges, whose ranks serve requests while they wait; "
        "use --p2p-wait auto or watcher\n")
    res = run_cli([path, "--p2p-wait", "watcher", "--check-only"])
    assert res.returncode == 0, res.stderr


def test_cli_json_last_line(tmp_path):
    path = str(tmp_path / "s.json")
    ir.save(matrix(2)["slimpipe-v1-exchange"], path)
    res = run_cli([path, "--local", "--json", "--check-reference", "--steps", "2"])
    assert res.returncode == 0, res.stderr
    last = json.loads(res.stdout.strip().splitlines()[-1])
    for k in ("step_s", "tokens_per_s", "loss", "peak_rss_mib", "peak_activation_bytes", "attention_backend",
              "max_grad_rel_err"):
        assert k in last
    assert last["attention_backend"] == "sdpa" and last["max_grad_rel_err"] < TOL


def test_reference_check_catches_a_wrong_attention(monkeypatch):
    """Dropping the earlier slices' contribution must fail the check (exit code 1)."""
    import executor.attention as A
    from executor.runner import run_local

    monkeypatch.setattr(A, "merge", lambda out, lse, out2, lse2: (out, lse))
    code, summary = run_local(matrix(2)["slimpipe-v1"], local_opts())
    assert code == 1 and summary["max_grad_rel_err"] > 1e-2


def test_runs_without_numpy(tmp_path):
    """NumPy is not a dependency: with `import numpy` failing, a 2-rank torchrun job still runs and
    passes the reference check (torch.distributed's object collectives need NumPy; we avoid them)."""
    blocker = tmp_path / "site" / "numpy"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'numpy'\", name='numpy')\n")
    path = str(tmp_path / "p.json")
    ir.save(matrix(2)["slimpipe-v1"], path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "executor", path, "--check-reference", "--json"]
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(blocker.parent), ROOT, ENV.get("PYTHONPATH", "")])}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["max_grad_rel_err"] < 1e-4
