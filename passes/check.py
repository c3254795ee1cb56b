"""The plan checker: structural rules, then a replay that proves no rank can deadlock."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import stat
import sys
from dataclasses import dataclass, field

from ir import Plan, PlanInvalidError, proofs

from . import forked
from .replay import Replay, replay
from .simulate import simulate_units
from .validate import Problem, validate, validate_kv


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    # the deadlock proof's replay (unit costs, buffered sends), when the rules let it run
    unit_replay: Replay | None = field(default=None, repr=False, compare=False)
    # simulate_units' figures from it, when a forked child made them beside the rules
    unit_figures: dict | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {"valid": self.ok, "usable": True, "problems": [p.to_json() for p in self.problems]}


P2P_MODES = ("buffered", "rendezvous")


# plans from this many instructions on get check(parallel=True)'s forked replay: below it the fork
# (a few milliseconds, and the child's copy-on-write faults) costs about what it saves
PARALLEL_MIN = 100_000


def check(plan: Plan, p2p: str = "buffered", step: bool | None = None, parallel: bool = False) -> Report:
    """Structural rules, then the deadlock proof with buffered sends (the executor over gloo) and,
    with p2p="rendezvous", again with sends that block until their receive is posted (NCCL).
    Order problems alone (rule p2p-order) do not stop the proof: it matches by tag, as gloo does.
    How runs of consecutive sends/receives are posted comes from plan.meta["p2p_batching"]:
    "runs" (default, our executor: one batch per run) or "single" (torch's runtime: one per action).
    `step=True` holds the plan to a whole training step (every rank's OPT, rule "optimizer"), as
    `slimpipe check` and everything acting on a plan file do; None applies that rule only when some
    rank has an OPT (a bare schedule from the generators has none).
    `parallel`: on a plan of PARALLEL_MIN instructions or more, check the KV exchanges' pairing
    rule and prove deadlock freedom in a forked child process while the other rules run here
    (passes.forked, _beside_the_rules; the same report, about 1 s sooner on the 1.6M-instruction
    plan of bench/scale_1m.py with two processors)."""
    if p2p not in P2P_MODES:
        raise ValueError(f"p2p={p2p!r}; allowed: {', '.join(P2P_MODES)}")
    problems, proof = _rules(plan, step, parallel)
    res = figures = None
    if all(pr.rule == "p2p-order" for pr in problems):
        res, figures = (replay(plan), None) if proof is None else proof.result()[1:]
        if res.deadlocked:
            problems.append(_deadlock(res, res.deadlock_message()))
        elif p2p == "rendezvous":
            problem = rendezvous_problem(plan)
            if problem is not None:
                problems.append(problem)
    return Report(problems, res, figures)


def _beside_the_rules(plan: Plan):
    """Start, in a forked child (ir.forked), what can run while validate(plan, kv=False) runs
    here: the KV exchanges' pairing rule (validate_kv), the deadlock replay and the unit-cost
    figures from it. Its result: (validate_kv's problems, replay, figures)."""
    return forked.start(lambda: (validate_kv(plan), *_unit_figures(plan)))


def _rules(plan: Plan, step, parallel: bool):
    """validate(plan, step=step) and what was made beside it: (problems, a forked.Done holding
    _beside_the_rules' (KV problems, replay, figures), or None). With `parallel` on a plan of
    PARALLEL_MIN instructions or more, the child makes the KV rule, the replay and the figures
    while validate(kv=False) runs here; where the rules leave no replay wanted, or the child's KV
    rule finds a problem, the whole validate runs here (its list and order are validate's own) and
    None is returned. The child never outlives this call unless its result is returned."""
    if not (parallel and plan.num_instructions() >= PARALLEL_MIN):
        return validate(plan, step=step), None
    job = _beside_the_rules(plan)
    try:
        problems = validate(plan, step=step, kv=False)
        if all(pr.rule == "p2p-order" for pr in problems):  # the replay is wanted: the child's KV verdict decides
            done = job.result()
            if not done[0]:  # no KV problem: validate's whole list is this one
                return problems, forked.Done(done)
    finally:
        job.cancel()  # a no-op once its result was taken
    return validate(plan, step=step), None


def _unit_figures(plan: Plan) -> tuple[Replay, dict | None]:
    """replay(plan) and, where it finishes, simulate_units' figures from it (what check's forked
    child computes while the rules run: the figures then cost nothing)."""
    res = replay(plan)
    return res, (None if res.deadlocked else simulate_units(plan, res))


def _deadlock(res, msg: str) -> Problem:
    """The deadlock of a replay that stopped, at the first rank of its wait cycle."""
    first = next(s for s in res.stuck if s.rank == res.cycle[0]) if res.cycle else res.stuck[0]
    return Problem("deadlock", msg, first.rank, first.index)


def rendezvous_problem(plan: Plan) -> Problem | None:
    """The deadlock of the replay with sends that block until their receive is posted, or None
    (runs of sends/receives posted as plan.meta["p2p_batching"] says, see check)."""
    res = replay(plan, p2p="rendezvous", batch_runs=plan.meta.get("p2p_batching", "runs") != "single")
    if not res.deadlocked:
        return None
    return _deadlock(res, res.deadlock_message().replace(
        "deadlock:", "deadlock when sends block until their receive is posted:", 1))


def rendezvous_cycle(plan: Plan) -> str | None:
    """The wait cycle a plan already proved valid and deadlock-free (check) has when sends block
    until their receive is posted (NCCL for large messages; check(p2p="rendezvous")), as one line,
    or None when it has none. Only the rendezvous replay runs: the rules and the buffered proof
    are not made again."""
    problem = rendezvous_problem(plan)
    return None if problem is None else str(problem)


def proof_key(plan: Plan) -> str | None:
    """The key ir.proofs remembers a proof of `plan` under: SHA-256 (hex) of its file's digest
    (plan.source) and of the checker's code (every source file of the ir and passes packages),
    or None for a plan that was not read from a file, when the cache is off, or when the
    checker's sources cannot be read (slimpipe imported from a zip, or installed without .py
    files: no fingerprint, no memory)."""
    return None if plan.source is None else _key(plan.source)


def _key(source: str) -> str | None:
    """proof_key for a file of digest `source` (ir.proofs.digest of its bytes)."""
    if proofs.cache_dir() is None:
        return None
    code = _code_fingerprint()
    if code is None:
        return None
    return hashlib.sha256(f"{source}:{code}".encode()).hexdigest()


@functools.lru_cache(maxsize=None)
def _code_fingerprint() -> str | None:
    """SHA-256 over the names and bytes of the .py files of ir/ and passes/ (what validate,
    replay and check run), read once per process: a changed checker proves every plan again.
    None when a package has no readable .py file."""
    import ir

    h = hashlib.sha256()
    for pkg in (ir, sys.modules[__package__]):
        folder = os.path.dirname(os.path.abspath(pkg.__file__))
        try:
            names = sorted(n for n in os.listdir(folder) if n.endswith(".py"))
            if not names:
                return None
            for name in names:
                with open(os.path.join(folder, name), "rb") as f:
                    h.update(f"{pkg.__name__}/{name}:".encode() + hashlib.sha256(f.read()).digest())
        except OSError:
            return None
    return h.hexdigest()


def note_proof(plan: Plan, report: Report | None = None) -> None:
    """Remember (ir.proofs) that `plan`, read from a file, passed check(plan, step=True): the
    commands that then act on the same file bytes skip require_valid's second proof. With the
    passing `report`, the plan's unit-cost figures (simulate_units, from the proof's replay) are
    kept too: `simulate --unit-costs` then prints them without reading the instructions
    (noted_unit_costs)."""
    key = proof_key(plan)
    if key is None:
        return
    content = b""
    if report is not None and report.unit_replay is not None and not report.unit_replay.deadlocked:
        figures = report.unit_figures if report.unit_figures is not None else simulate_units(plan, report.unit_replay)
        content = json.dumps({"unit_costs": figures}).encode()
    proofs.note(key, content)


def proved(plan: Plan) -> bool:
    """Whether check(plan, step=True) was noted as passed for these file bytes and this code."""
    key = proof_key(plan)
    return key is not None and proofs.known(key)


def noted_unit_costs(path: str) -> dict | None:
    """simulate_units' figures noted with the proof of the plan file at `path` (check, or an
    earlier simulate --unit-costs), or None: no proof for these bytes and this checker, a proof
    noted without them (an older slimpipe's empty file), the cache off, a file that cannot be
    read. Reads the file's bytes for their digest and builds no instruction."""
    store = proofs.cache_dir()
    if store is None or not os.path.isdir(store):
        return None
    try:
        with open(path, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # a FIFO or device: ir.load's affair
                return None
            data = f.read()
    except OSError:
        return None
    key = _key(proofs.digest(data))
    return _figures_in(proofs.read(key)) if key is not None else None


def _figures_in(content: bytes | None) -> dict | None:
    """The figures of a proof's content, when they have simulate_units' shape."""
    if not content:
        return None
    try:
        d = json.loads(content)["unit_costs"]
        ok = (isinstance(d, dict) and set(d) == {"makespan", "bubble_fraction", "ranks", "kv_exchanges"}
              and all(type(d[k]) in (int, float) for k in ("makespan", "bubble_fraction"))
              and type(d["kv_exchanges"]) is int and isinstance(d["ranks"], list) and d["ranks"]
              and all(isinstance(r, dict) and set(r) == {"rank", "busy", "peak_units"} and r["rank"] == i
                      and type(r["busy"]) in (int, float) and type(r["peak_units"]) is int
                      for i, r in enumerate(d["ranks"])))
    except (ValueError, KeyError, TypeError, RecursionError):  # whatever the file holds, the cache never fails a command
        return None
    return d if ok else None


def _refuse(problems: list[Problem], doing: str, path: str) -> None:
    if problems:
        first = str(problems[0])
        if len(first) > 700:
            first = first[:700] + "..."
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise PlanInvalidError(f"plan breaks a rule, {doing}: {first}{more}; `slimpipe check {path}` lists all")


def require_valid(plan: Plan, doing: str, path: str = "plan.json", deadlock: bool = True, parallel: bool = False) -> None:
    """Refuse a plan that breaks a rule (and, with `deadlock`, one that cannot finish) before
    acting on it: PlanInvalidError with one line, e.g. 'plan breaks a rule, not run: [order] ...'.
    `doing` says what was not done ('not run', 'not simulated'). The plan must be a whole training
    step (rule "optimizer"). A plan read from a file that `slimpipe check` (note_proof) or an
    earlier require_valid with `deadlock` proved, unchanged and with the same checker code, is
    not proved again (ir.proofs; with SLIMPIPE_NO_CACHE=1 every call proves). `parallel`: as check's
    (the command line's single-threaded commands; the executor has threads and would not fork)."""
    if proved(plan):
        return
    if deadlock:
        report = check(plan, step=True, parallel=parallel)
        if report.ok:
            note_proof(plan, report)
        problems = report.problems
    else:
        problems = validate(plan, step=True)
    _refuse(problems, doing, path)


def checked_unit_costs(plan: Plan, doing: str, path: str = "plan.json", parallel: bool = False) -> dict:
    """require_valid(plan, doing, path, deadlock=False), then simulate_units(plan): the unit-cost
    figures (forward 1, backward 2, communication free); PlanInvalidError naming the wait cycle
    on a deadlock. Of a proved plan, the figures noted with its proof; otherwise the replay runs
    beside the rules (forked where `parallel`, as in check) and a plan that passes both, which is
    check's whole proof, is noted as proved with its figures."""
    if proved(plan):
        figures = _figures_in(proofs.read(proof_key(plan)))
        return simulate_units(plan) if figures is None else figures
    problems, job = _rules(plan, True, parallel)
    _refuse(problems, doing, path)
    res, figures = _unit_figures(plan) if job is None else job.result()[1:]
    if res.deadlocked:
        raise PlanInvalidError(res.deadlock_message())
    note_proof(plan, Report([], res, figures))
    return figures
