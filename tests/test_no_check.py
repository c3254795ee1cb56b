"""A hand-edited plan run with --no-check fails with one line per rank that names the rank, the
instruction and what was missing, in words (issue 15.7: swapping two forward slices used to end
in "TypeError: cannot unpack non-iterable NoneType object")."""
import re

import pytest

from compiler import build_spec, compile_plan, resolve_model
from executor.cli import options
from executor.runner import run_local
from ir import Instr, Kind, parse

TINY = resolve_model("tiny", {"layers": 2})
PY_ERRORS = re.compile(r"\b\w+(Error|Exception)\b|Traceback")


def _plans():
    sl = compile_plan(build_spec("slimpipe", TINY, pp=2, microbatches=2, slices=4, seq_len=64, exchange=True))
    # one rank holding two neighbouring stages: activations and gradients are handed over in memory
    v2 = compile_plan(build_spec("interleaved-1f1b", TINY, pp=1, microbatches=2, virtual_stages=2, seq_len=16))
    return {"slimpipe": sl, "v2": v2}


PLANS = _plans()


def _find(stream, text):
    return next(i for i, ins in enumerate(stream) if ins == parse(text))


def _swap(r, a, b):
    def f(ranks):
        i, j = _find(ranks[r], a), _find(ranks[r], b)
        ranks[r][i], ranks[r][j] = ranks[r][j], ranks[r][i]
    return f


def _drop(r, text):
    return lambda ranks: ranks[r].pop(_find(ranks[r], text))


def _dup(r, text):
    return lambda ranks: ranks[r].insert(_find(ranks[r], text) + 1, parse(text))


def _first_kind(r, kind):
    def f(ranks):
        ranks[r].pop(next(i for i, ins in enumerate(ranks[r]) if ins.kind == kind))
    return f


# (plan, mutation, the failing rank's line must contain)
CASES = {
    "forward-slices-swapped": ("slimpipe", _swap(0, "F mb0 s0 c0", "F mb0 s1 c0"),
                               "rank 0 #0 'F mb0 s1 c0': needs the K/V of the earlier slice 'F mb0 s0 c0' of this "
                               "micro-batch, but its forward has not run"),
    "backward-slices-swapped": ("slimpipe", _swap(1, "B mb0 s3 c0", "B mb0 s2 c0"),
                                "'B mb0 s2 c0': the later slice's backward 'B mb0 s3 c0' has not run"),
    "receive-dropped": ("slimpipe", _drop(1, "RECV_ACT mb0 s0 c0 from0 t0"),
                        "rank 1 #0 'F mb0 s0 c0': no input activation: it has not been received "
                        "(a 'RECV_ACT mb0 s0 c0' must come first)"),
    "forward-dropped": ("slimpipe", _drop(0, "F mb0 s0 c0"),
                        "rank 0 #0 'SEND_ACT mb0 s0 c0 to1 t0': nothing to send: the unit's forward has not run"),
    "backward-first": ("slimpipe", lambda ranks: ranks[1].insert(0, ranks[1].pop(_find(ranks[1], "B mb0 s3 c0"))),
                       "rank 1 #0 'B mb0 s3 c0': its forward 'F mb0 s3 c0' has not run"),
    "forward-twice": ("slimpipe", _dup(0, "F mb0 s0 c0"),
                      "rank 0 #1 'F mb0 s0 c0': this unit's forward already ran in this step"),
    "opt-dropped": ("slimpipe", lambda ranks: ranks[0].pop(),
                    "the step ended without an OPT instruction, so this rank's parameters were never updated"),
    "opt-twice": ("slimpipe", lambda ranks: ranks[0].append(Instr(Kind.OPT)),
                  "'OPT': a second OPT in one step"),
    # both ranks then wait on each other: whichever times out first names what it waited for
    "exchange-partner-dropped": ("slimpipe", _first_kind(0, Kind.KVF_RECV),
                                 ("timed out after 1 s waiting on rank 0 for its KV-exchange forward reply",
                                  "timed out after 1 s waiting on rank 1 for its gradient")),
    "local-stages-out-of-order": ("v2", _swap(0, "F mb0 s0 c0", "F mb0 s0 c1"),
                                  "rank 0 #0 'F mb0 s0 c1': no input activation: the previous stage's forward "
                                  "'F mb0 s0 c0' has not run on this rank"),
    "local-backward-out-of-order": ("v2", _swap(0, "B mb0 s0 c1", "B mb0 s0 c0"),
                                    "'B mb0 s0 c0': no output gradient: the next stage's backward 'B mb0 s0 c1' "
                                    "has not run on this rank"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_no_check_runtime_errors_say_what_is_missing(name, capsys):
    plan_name, mutate, needle = CASES[name]
    plan = PLANS[plan_name]
    ranks = [list(s) for s in plan.ranks]
    mutate(ranks)
    code, _ = run_local(plan.with_ranks(ranks), options(no_check=True, quiet=True, device="cpu", timeout=1.0))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("executor: rank")]
    assert code == 1 and lines and len(lines) == len(err.splitlines()), err
    needles = needle if isinstance(needle, tuple) else (needle,)
    assert any(nd in ln for ln in lines for nd in needles), err
    for ln in lines:  # every rank's line: where it stood, in words, no Python exception names
        assert re.match(r"executor: rank \d: error: rank \d( #\d+ '[^']+'| \(end of step, after #\d+\)): ", ln), ln
        assert not PY_ERRORS.search(ln), ln
