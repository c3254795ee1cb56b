"""Rule "optimizer" (issue 15.1): every rank holding parameters runs exactly one OPT, after every
instruction of the step that leaves a weight gradient. Moving rank 1's OPT of a 1f1b p=2 m=2
plan up to just after its first SEND_GRAD used to pass check and run, silently updating without
micro-batch 1's gradient (step-2 loss 5.568 instead of 5.562)."""

import pytest

from compiler import build_spec, compile_plan, resolve_model
from executor.cli import main as executor_main
from executor.cli import options
from executor.runner import run_local
from ir import Instr, Kind
from passes import check

TINY = resolve_model("tiny", {"layers": 4})
SHAPES = [("gpipe", 2, 2, 1, 1), ("1f1b", 2, 2, 1, 1), ("interleaved-1f1b", 2, 2, 1, 2), ("looped-bfs", 2, 2, 1, 2),
          ("seq1f1b", 2, 2, 2, 1), ("slimpipe", 2, 2, 2, 2)]


def _issue_plan():
    plan = compile_plan(build_spec("1f1b", resolve_model("tiny"), pp=2, microbatches=2, seq_len=128))
    r1 = [i for i in plan.ranks[1] if i.kind != Kind.OPT]
    at = next(i for i, x in enumerate(r1) if x.kind == Kind.SEND_GRAD) + 1
    r1.insert(at, Instr(Kind.OPT))
    return plan, plan.with_ranks([plan.ranks[0], r1])


def test_the_issues_plan_is_refused_by_check_and_the_executor(tmp_path, capsys):
    good, bad = _issue_plan()
    assert check(good).ok
    probs = check(bad).problems
    assert [(p.rule, p.rank, p.index) for p in probs] == [("optimizer", 1, 4)]
    assert "rank 1 #4 'OPT' runs before rank 1 #7 'B mb1 s0 c0'" in probs[0].message
    path = tmp_path / "bad.json"
    import ir

    ir.save(bad, str(path))
    assert executor_main([str(path), "--local", "--quiet"]) == 1
    assert "[optimizer] rank 1 #4 'OPT' runs before" in capsys.readouterr().err
    # with --no-check the run stops at the first unit after the early OPT instead of updating without it
    code, _ = run_local(bad, options(no_check=True, quiet=True, device="cpu", steps=2, timeout=30))
    err = capsys.readouterr().err
    assert code == 1 and "rank 1 #6 'F mb1 s0 c0': runs after this step's OPT" in err, err


def test_the_correct_plan_keeps_its_step_two_loss():
    good, _ = _issue_plan()
    code, s = run_local(good, options(quiet=True, device="cpu", steps=2, timeout=60))
    assert code == 0 and round(s["loss"], 3) == 5.546  # step 2 of the correct plan (the issue's run: 5.562)


@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_every_misplaced_missing_or_repeated_opt_is_caught(shape):
    fam, p, m, n, v = shape
    plan = compile_plan(build_spec(fam, TINY, pp=p, microbatches=m, slices=n, virtual_stages=v, seq_len=16 * n))
    assert check(plan).ok
    tried = 0
    for r, stream in enumerate(plan.ranks):
        body = [i for i in stream if i.kind != Kind.OPT]
        last_b = max(i for i, x in enumerate(body) if x.kind == Kind.B)
        for at in range(last_b + 1):  # every position before (or at) the last backward
            moved = body[:at] + [Instr(Kind.OPT)] + body[at:]
            probs = check(plan.with_ranks([moved if q == r else s for q, s in enumerate(plan.ranks)])).problems
            assert [(pr.rule, pr.rank, pr.index) for pr in probs] == [("optimizer", r, at)], (r, at, probs[:2])
            tried += 1
        for mutant in (body, body + [Instr(Kind.OPT), Instr(Kind.OPT)]):
            probs = check(plan.with_ranks([mutant if q == r else s for q, s in enumerate(plan.ranks)])).problems
            assert {pr.rule for pr in probs} == {"optimizer"} and probs[0].rank == r, probs[:2]
    assert tried >= 2 * len(plan.ranks)


def test_split_backward_opt_follows_every_weight_gradient():
    """With B split into I and W, the optimizer step must follow the W (the weight gradient)."""
    plan = compile_plan(build_spec("1f1b", TINY, pp=2, microbatches=2, seq_len=16))
    split = [[x for i in s for x in ([Instr(Kind.I, *i[1:4]), Instr(Kind.W, *i[1:4])] if i.kind == Kind.B else [i])]
             for s in plan.ranks]
    assert check(plan.with_ranks(split)).ok
    r0 = [i for i in split[0] if i.kind != Kind.OPT]
    last_w = max(i for i, x in enumerate(r0) if x.kind == Kind.W)
    early = r0[:last_w] + [Instr(Kind.OPT)] + r0[last_w:]
    probs = check(plan.with_ranks([early, split[1]])).problems
    assert [(p.rule, p.rank, p.index) for p in probs] == [("optimizer", 0, last_w)]
    assert "'W mb1 s0 c0'" in probs[0].message


def test_a_bare_schedule_is_a_step_only_when_asked():
    """The generators' output has no OPT (compile appends it): validate takes it as a schedule,
    while `slimpipe check` and everything acting on a plan file hold it to a whole step."""
    from compiler import schedule_plan
    from passes import validate
    from passes.lower import lower_comm

    bare = lower_comm(schedule_plan(build_spec("1f1b", TINY, pp=2, microbatches=2, seq_len=16)))
    assert validate(bare) == [] and check(bare).ok
    probs = check(bare, step=True).problems
    assert [(p.rule, p.rank) for p in probs] == [("optimizer", 0), ("optimizer", 1)]
    assert "rank 0 has no optimizer step (OPT)" in probs[0].message
