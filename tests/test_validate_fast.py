"""validate's fast paths (C-level proofs that a part of a plan breaks no rule) never change what
validate reports: on valid plans and on randomly mutated ones, with the fast paths on and with
every one of them forced off (then the per-instruction loops run everywhere), the problems are
the same, message for message."""
import random
import sys

import pytest

from compiler import build_spec, compile_plan, resolve_model
from ir import Instr
from passes import validate

V = sys.modules["passes.validate"]
TINY = resolve_model("tiny")


def _plans():
    out = []
    for fam, p, m, n, v, extra in [("1f1b", 3, 4, 1, 1, {}), ("interleaved-1f1b", 2, 4, 1, 2, {}),
                                   ("slimpipe", 4, 2, 4, 2, {"exchange": True}),
                                   ("seq1f1b", 3, 3, 2, 1, {"dp": 2}), ("zb-v", 2, 3, 1, 2, {})]:
        model = TINY.model_copy(update={"layers": max(p * v, 8)})
        spec = build_spec(fam, model, pp=p, microbatches=m, slices=n, virtual_stages=v, seq_len=16 * n, **extra)
        out.append(compile_plan(spec))
    return out


def _mutate(plan, rng):
    ranks = [list(s) for s in plan.ranks]
    r = rng.randrange(len(ranks))
    s = ranks[r]
    i = rng.randrange(len(s))
    what = rng.choice(["swap", "drop", "tag", "peer", "mb", "dup", "lo", "hi"])
    ins = s[i]
    if what == "swap" and i + 1 < len(s):
        s[i], s[i + 1] = s[i + 1], s[i]
    elif what == "drop":
        del s[i]
    elif what == "dup":
        s.insert(rng.randrange(len(s) + 1), ins)
    elif what == "tag" and ins.tag >= 0:
        s[i] = ins._replace(tag=ins.tag + rng.choice([1, -1, 7]))
    elif what == "peer" and ins.peer >= 0:
        s[i] = ins._replace(peer=rng.randrange(len(ranks)))
    elif what == "mb" and ins.mb >= 0:
        s[i] = ins._replace(mb=rng.choice([0, ins.mb + 1]))
    elif what == "lo" and ins.hi > 0:
        s[i] = ins._replace(lo=ins.hi)
    elif what == "hi" and ins.hi > 0:  # the whole prefix of the owner's unit: the largest range allowed
        s[i] = ins._replace(hi=plan.spec.slice_offsets(ins.mb)[ins.slice])
    else:
        s[i] = Instr(ins.kind, ins.mb, ins.slice, ins.chunk, ins.peer, ins.tag, ins.lo, ins.hi)
    return plan.with_ranks(ranks)


@pytest.fixture
def slow(monkeypatch):
    """A context where every fast path says 'not proven', so the loops decide everything."""
    def off():
        monkeypatch.setattr(V, "_pairs_match", lambda *a: False)
        monkeypatch.setattr(V, "_dependencies_hold", lambda *a: False)
        monkeypatch.setattr(V, "_order_holds", lambda *a: False)
        monkeypatch.setattr(V, "_reduces", lambda stream: True)
        monkeypatch.setattr(V, "_SHAPE", {})
        monkeypatch.setattr(V, "_FUSED", False)  # one loop per rule instead of validate's one pass per stream
    return off


def test_fast_paths_report_exactly_what_the_loops_report(slow):
    rng = random.Random(16)
    cases = []
    for plan in _plans():
        cases.append(plan)
        cases.extend(_mutate(plan, rng) for _ in range(60))
        kv = [(r, i) for r, stream in enumerate(plan.ranks) for i, ins in enumerate(stream) if ins.hi > 0]
        for r, i in rng.sample(kv, min(len(kv), 6)):  # an exchange that ships the owner's whole prefix
            ins = plan.ranks[r][i]
            s = list(plan.ranks[r])
            s[i] = ins._replace(hi=plan.spec.slice_offsets(ins.mb)[ins.slice])
            cases.append(plan.with_ranks([s if q == r else plan.ranks[q] for q in range(len(plan.ranks))]))
        for r, stream in enumerate(plan.ranks):  # a gradient reduction moved before the backwards
            at = [i for i, ins in enumerate(stream) if ins.kind == "REDUCE_GRAD"]
            if at:
                s = list(stream)
                s.insert(0, s.pop(at[0]))
                cases.append(plan.with_ranks([s if q == r else plan.ranks[q] for q in range(len(plan.ranks))]))
    fast = [[p.to_json() for p in validate(c)] for c in cases]
    assert not fast[0]  # a compiled plan is valid
    assert any(p["rule"] == "reduce-grad" for f in fast for p in f)
    assert sum(1 for f in fast if f) > 150  # most mutants break a rule: the loops ran on them
    slow()
    assert [[p.to_json() for p in validate(c)] for c in cases] == fast
