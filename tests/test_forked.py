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
from passes.validate import validate_kv
from passes.check import check

check_mod = sys.modules["passes.check"]

needs_fork = pytest.mark.skipif(not forked.can_fork(), reason="forking needs Linux, two processors, one thread")


@pytest.fixture(autouse=True)
def alone():
    """forked.start computes in the caller while another thread runs (can_fork): a thread an earlier
    test left running would turn these tests' 'in a child' into 'here' (CI once failed that way on
    test_faults' timer thread). Say so by name instead."""
    others = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    assert not others, f"threads left running by an earlier test: {others}"


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


def _mutant(mutant):
    """A plan that is valid, deadlocks, breaks a rule, breaks only the p2p-order rule (which does
    not stop the deadlock proof), or breaks the KV exchanges' rule (checked in the child)."""
    if mutant in ("kv", "kv-valid"):
        spec = build_spec("slimpipe", resolve_model("tiny"), pp=4, microbatches=2, slices=4, seq_len=64, exchange=True)
        plan = compile_plan(spec)
        assert any(ins.kind in ir.KV for s in plan.ranks for ins in s)
    else:
        plan = _plan()
    ranks = [list(s) for s in plan.ranks]
    if mutant == "deadlock":  # rank 0 receives its first gradient before sending its first activation
        i = next(j for j, ins in enumerate(ranks[0]) if ins.kind == ir.Kind.SEND_ACT)
        k = next(j for j, ins in enumerate(ranks[0]) if ins.kind == ir.Kind.RECV_GRAD)
        ranks[0].insert(i, ranks[0].pop(k))
    elif mutant == "rule":
        del ranks[1][0]
    elif mutant == "p2p-order":  # rank 1 receives micro-batch 1's activation before micro-batch 0's
        s = ranks[1]
        a = next(j for j, ins in enumerate(s) if ins.kind == ir.Kind.RECV_ACT and ins.mb == 0)
        b = next(j for j, ins in enumerate(s) if ins.kind == ir.Kind.RECV_ACT and ins.mb == 1)
        s.insert(a, s.pop(b))
    elif mutant == "kv":  # an exchange's owner side dropped
        r = next(r for r, s in enumerate(ranks) if any(ins.kind in ir.KV_OWNER for ins in s))
        del ranks[r][next(j for j, ins in enumerate(ranks[r]) if ins.kind in ir.KV_OWNER)]
    return plan.with_ranks(tuple(map(tuple, ranks)))


RULES = {"valid": [], "kv-valid": [], "deadlock": ["deadlock"], "p2p-order": ["p2p-order"], "rule": None, "kv": None}


@pytest.mark.parametrize("mutant", list(RULES))
@pytest.mark.parametrize("p2p", ["buffered", "rendezvous"])
def test_parallel_check_reports_what_the_sequential_one_does(monkeypatch, mutant, p2p):
    monkeypatch.setattr(check_mod, "PARALLEL_MIN", 0)
    plan = _mutant(mutant)
    seq = check(plan, p2p, step=None)
    here = []  # replays run in this process (a forked child's calls land in its own copy)
    real = check_mod.replay
    monkeypatch.setattr(check_mod, "replay", lambda *a, **k: here.append(k.get("p2p", "buffered")) or real(*a, **k))
    par = check(plan, p2p, step=None, parallel=True)
    assert [p.to_json() for p in par.problems] == [p.to_json() for p in seq.problems]
    rules = [p.rule for p in seq.problems]
    if RULES[mutant] is not None:
        assert rules == RULES[mutant]
    else:
        assert rules and "deadlock" not in rules and ("kv" in rules) == (mutant == "kv")
    if mutant == "deadlock":
        assert "wait cycle" in seq.problems[0].message
    if mutant == "kv":  # validate_kv alone names the same problems, at the same instructions
        kv = [(p.rule, p.rank, p.index, p.message) for p in seq.problems if p.rule == "kv"]
        assert kv and [(p.rule, p.rank, p.index, p.message) for p in validate_kv(plan)] == kv
    if forked.can_fork() and RULES[mutant] is not None:
        assert "buffered" not in here  # the deadlock proof ran in the child
    assert (par.unit_figures is not None) == (forked.can_fork() and RULES[mutant] is not None and mutant != "deadlock")
    if par.unit_figures is not None:
        assert par.unit_figures == simulate_units(plan)


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


@needs_fork
def test_an_interrupt_while_waiting_stops_the_child(monkeypatch):
    """Ctrl-C while result() waits for the child: KeyboardInterrupt comes through (it used to turn
    into 'Bad file descriptor' from closing the pipe twice) and the child is reaped."""
    import signal
    import time

    job = forked.start(lambda: time.sleep(30))

    def interrupt(_signum, _frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        with pytest.raises(KeyboardInterrupt):
            job.result()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    with pytest.raises(ChildProcessError):
        os.waitpid(job._pid, os.WNOHANG)
    job.cancel()  # nothing left to do
