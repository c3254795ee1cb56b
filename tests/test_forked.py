"""passes.forked and check(parallel=True): the value comes from a child process where forking is
safe, the caller computes it where the child fails, and check's report is the sequential one for a
valid plan, a deadlocked one and one that breaks a rule."""
import os
import sys
import threading

import pytest

from compiler import build_spec, compile_plan, resolve_model
import ir
import passes.check  # noqa: F401 - loads the module: `passes.check` the attribute is the function
from passes import forked
from passes import simulate_units
from passes.check import check

check_mod = sys.modules["passes.check"]

needs_fork = pytest.mark.skipif(not forked.can_fork(), reason="forking needs Linux, two processors, one thread")


@needs_fork
def test_value_is_computed_in_a_child():
    here = os.getpid()
    assert forked.start(os.getpid).result() not in (here, None)


@needs_fork
def test_a_failing_child_leaves_the_answer_to_the_caller():
    here = os.getpid()
    calls = []

    def fn():
        calls.append(os.getpid())  # only the caller's list sees this
        if os.getpid() != here:
            raise RuntimeError("in the child")
        return "computed here"

    assert forked.start(fn).result() == "computed here"
    assert calls == [here]

    def boom():
        raise ValueError("bad value 7")

    with pytest.raises(ValueError, match="bad value 7"):  # the caller sees fn's own exception
        forked.start(boom).result()


@needs_fork
def test_cancel_reaps_the_child():
    job = forked.start(lambda: sum(range(10 ** 8)))
    job.cancel()
    with pytest.raises(ChildProcessError):
        os.waitpid(job._pid, os.WNOHANG)


def test_no_fork_with_a_second_thread():
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert not forked.can_fork()
        assert forked.start(os.getpid).result() == os.getpid()
    finally:
        stop.set()
        t.join()


def _plan():
    spec = build_spec("1f1b", resolve_model("tiny"), pp=4, microbatches=8, seq_len=64)
    return compile_plan(spec)


@pytest.mark.parametrize("mutant", ["valid", "deadlock", "rule"])
def test_parallel_check_reports_what_the_sequential_one_does(monkeypatch, mutant):
    monkeypatch.setattr(check_mod, "PARALLEL_MIN", 0)
    plan = _plan()
    ranks = [list(s) for s in plan.ranks]
    if mutant == "deadlock":  # rank 0 receives its first gradient before sending its first activation
        i = next(j for j, ins in enumerate(ranks[0]) if ins.kind == ir.Kind.SEND_ACT)
        k = next(j for j, ins in enumerate(ranks[0]) if ins.kind == ir.Kind.RECV_GRAD)
        ranks[0].insert(i, ranks[0].pop(k))
    elif mutant == "rule":
        del ranks[1][0]
    plan = plan.with_ranks(tuple(map(tuple, ranks)))
    seq = check(plan, step=None)
    here = []  # replays run in this process (a forked child's calls land in its own copy)
    real = check_mod.replay
    monkeypatch.setattr(check_mod, "replay", lambda *a, **k: here.append(1) or real(*a, **k))
    par = check(plan, step=None, parallel=True)
    assert [p.to_json() for p in par.problems] == [p.to_json() for p in seq.problems]
    rules = [p.rule for p in seq.problems]
    if mutant == "valid":
        assert rules == []
    elif mutant == "deadlock":
        assert rules == ["deadlock"] and "wait cycle" in seq.problems[0].message
    else:
        assert rules and "deadlock" not in rules
    if forked.can_fork() and mutant != "rule":
        assert here == []  # the proof ran in the child


@pytest.mark.parametrize("deadlock", [False, True])
def test_simulate_units_beside_the_rules(monkeypatch, tmp_path, deadlock):
    """checked_unit_costs (simulate --unit-costs): the figures made in the child are
    simulate_units(plan)'s, a deadlock is named as without a child, and only a plan that finishes
    is noted as proved."""
    monkeypatch.setattr(check_mod, "PARALLEL_MIN", 0)
    plan = _plan()
    if deadlock:
        ranks = [list(s) for s in plan.ranks]
        i = next(j for j, ins in enumerate(ranks[0]) if ins.kind == ir.Kind.SEND_ACT)
        k = next(j for j, ins in enumerate(ranks[0]) if ins.kind == ir.Kind.RECV_GRAD)
        ranks[0].insert(i, ranks[0].pop(k))
        plan = plan.with_ranks(tuple(map(tuple, ranks)))
    path = str(tmp_path / "plan.json")
    ir.save(plan, path)
    plan = ir.load(path)
    if deadlock:
        with pytest.raises(ir.PlanInvalidError, match="deadlock: wait cycle"):
            check_mod.checked_unit_costs(plan, "not simulated", path, parallel=True)
    else:
        here = []
        real = check_mod.replay
        monkeypatch.setattr(check_mod, "replay", lambda *a, **k: here.append(1) or real(*a, **k))
        got = check_mod.checked_unit_costs(plan, "not simulated", path, parallel=True)
        assert got == simulate_units(plan) and got["makespan"] > 0
        assert here == [] or not forked.can_fork()
    assert check_mod.proved(plan) == (not deadlock)
