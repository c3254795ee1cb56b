"""Hostile plans: malformed, mistyped, out-of-range and wrongly scheduled plans given to every
plan-loading command. Each must end with exit 1 (a rule or a deadlock, named) or 2 (unusable
input, one line), never a traceback and never a hang. Most run in-process through
compiler.cli.main (fast); a sample runs through a real subprocess to prove no traceback reaches
the terminal. The number of plans tried is printed in pytest's terminal summary.

Adding a consumer (the executor's plan loading, say): append a Target to TARGETS. Its `call`
takes the plan path and returns (exit code, stdout, stderr); its `argv` (for the subprocess
sample) returns the command line, or None to skip that part.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from io import StringIO
from typing import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ir
from compiler import build_spec, compile_plan, resolve_model
from compiler.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALL_TIMEOUT_S = 20  # one in-process call; a hang becomes a failure, not a stuck CI job


def _cli_in_process(argv: list[str], entry=None) -> tuple[int, str, str]:
    out, err = StringIO(), StringIO()

    def _alarm(*_):
        raise TimeoutError(f"slimpipe {' '.join(argv)} ran past {CALL_TIMEOUT_S}s")

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CALL_TIMEOUT_S)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = (entry or main)(argv)
            except SystemExit as e:  # argparse
                code = e.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return code, out.getvalue(), err.getvalue()


@dataclass(frozen=True)
class Target:
    name: str
    call: Callable[[str], tuple[int, str, str]]
    argv: Callable[[str], list[str]] | None


TARGETS = [
    Target("check", lambda path: _cli_in_process(["check", path]),
           lambda path: [sys.executable, "-m", "compiler.cli", "check", path]),
    Target("simulate", lambda path: _cli_in_process(["simulate", path, "--unit-costs"]),
           lambda path: [sys.executable, "-m", "compiler.cli", "simulate", path, "--unit-costs"]),
    Target("simulate-timed", lambda path: _cli_in_process(["simulate", path, "--json"]), None),
    # the executor's plan loading (the same check `slimpipe check` runs, then SLIMPIPE_FAULT); the
    # subprocess sample runs the real command line, which must stop before starting any rank
    Target("executor", lambda path: _cli_in_process([path, "--check-only"], _executor_main),
           lambda path: [sys.executable, "-m", "executor", path, "--local"]),
]


def _executor_main(argv):
    from executor.cli import main as executor_main

    return executor_main(argv)

TRIED = {"plans": 0, "calls": 0, "subprocess": 0, "exit1": 0, "exit2": 0}
TRACEBACK = re.compile(r"Traceback \(most recent call last\)|^\s+File \"", re.M)


# ---------------------------------------------------------------- base plans (valid, small)
def _base_plans() -> list[dict]:
    model = resolve_model("tiny", {"layers": 8})
    shapes = [("1f1b", 2, 2, 1, 1), ("gpipe", 3, 2, 1, 1), ("interleaved-1f1b", 2, 2, 1, 2),
              ("seq1f1b", 2, 2, 2, 1), ("slimpipe", 2, 2, 2, 2), ("looped-bfs", 2, 2, 1, 2),
              ("1f1b", 1, 2, 1, 1), ("slimpipe", 4, 2, 4, 1)]
    out = []
    for s, p, m, n, v in shapes:
        plan = compile_plan(build_spec(s, model, pp=p, microbatches=m, slices=n, virtual_stages=v, seq_len=8 * n))
        out.append(json.loads(ir.dumps(plan)))
    return out


BASES = _base_plans()
base_st = st.sampled_from(range(len(BASES))).map(lambda i: copy.deepcopy(BASES[i]))
_TMP = tempfile.mkdtemp(prefix="slimpipe-hostile-")


def _write(text: str | bytes) -> str:
    path = os.path.join(_TMP, "plan.json")
    with open(path, "wb") as f:
        f.write(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    return path


def _dump(d) -> str:
    return json.dumps(d)  # NaN / Infinity come out as JSON's usual extension literals


def _assert_clean(target: str, case: str, code, out: str, err: str, expect: str | None) -> None:
    both = out + err
    assert not TRACEBACK.search(both), f"{target} [{case}]: traceback\n{both[-2000:]}"
    assert code in (1, 2), f"{target} [{case}]: exit {code!r}, want 1 or 2\n{both[-2000:]}"
    if code == 2 or target != "check":
        # one line on stderr, nothing on stdout
        assert out == "" and err.endswith("\n") and err.count("\n") == 1 and "error:" in err, \
            f"{target} [{case}]: want one error line on stderr, got stdout={out[:500]!r} stderr={err[:500]!r}"
        line = err
    else:
        # check's human output: one '[rule] message' line per problem (at most 20), nothing on stderr
        lines = out.splitlines()
        assert err == "" and 1 <= len(lines) <= 20 and all(re.match(r"^\S.*: \[[a-z][a-z0-9-]*\] \S", ln) for ln in lines), \
            f"{target} [{case}]: want '[rule] message' lines, got stdout={out[:500]!r} stderr={err[:500]!r}"
        line = out
    assert max(map(len, line.splitlines())) < 1000, f"{target} [{case}]: an error line of over 1000 chars"
    if expect is not None:
        assert re.search(expect, line), f"{target} [{case}]: {line.strip()!r} does not name the problem ({expect})"
    TRIED["exit1" if code == 1 else "exit2"] += 1


def run_hostile(text: str | bytes, case: str, expect: dict | str | None = None) -> None:
    """Every target gets the plan; `expect` is a regex the message must match (or {target: regex})."""
    path = _write(text)
    TRIED["plans"] += 1
    for t in TARGETS:
        code, out, err = t.call(path)
        TRIED["calls"] += 1
        want = expect.get(t.name) if isinstance(expect, dict) else expect
        _assert_clean(t.name, case, code, out, err, want)


# derandomized: the same plans on every CI run; SLIMPIPE_HOSTILE_RANDOM=1 explores fresh ones
HOSTILE = settings(max_examples=200, deadline=None, derandomize=not os.environ.get("SLIMPIPE_HOSTILE_RANDOM"), database=None,
                   suppress_health_check=list(HealthCheck))

# wrong-typed JSON values for a slot holding an int, a string, a bool or a list
NOT_INT = st.sampled_from([None, True, False, 4.0, 2.5, -0.0, math.nan, math.inf, -math.inf, "4", "", [], [4], {}, {"a": 1},
                           [None], [[None]]])
NOT_STR = st.sampled_from([None, 0, 1, 2.5, True, [], ["tiny"], {}, math.nan])
NOT_BOOL = st.sampled_from([None, 0, 1, "true", "false", [], {}, 0.0])
NOT_LIST = st.sampled_from([None, 0, 3, 1.5, True, "x", "[]", {}, {"0": [1]}, math.nan])
BAD_NESTED = st.sampled_from([[None], [[None]], [[]], [{}], [["1"]], [[1.0]], [[True]], [[math.nan]], [1, [2]]])


def _paths(node, prefix=()):
    """(path, value) of every node below `node` (dicts and lists), depth first."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield prefix + (k,), v
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield prefix + (i,), v
            yield from _paths(v, prefix + (i,))


def _set(d, path, value):
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value


def _get(d, path):
    for k in path:
        d = d[k]
    return d


# ---------------------------------------------------------------- the hostile families
@HOSTILE
@given(base=base_st, data=st.data())
def test_truncated_and_garbled_json(base, data):
    text = ir.dumps(ir.from_dict(base)).rstrip()
    k = data.draw(st.integers(0, len(text) - 1), label="cut")
    run_hostile(text[:k], f"truncated at {k}", r"JSON|spec|ranks|schema_version|plan")


@pytest.mark.parametrize("text, expect", [
    (b"", r"JSON"), (b"\xff\xfe{", r"unreadable|JSON"), (b"null", r"JSON object"), (b"[]", r"JSON object"),
    (b"42", r"JSON object"), (b'"plan"', r"JSON object"), (b"[" * 100_000, r"nested|JSON"),
    (b'{"schema_version": ' + b"9" * 5000 + b"}", r"JSON|digits"), (b"NaN", r"JSON object"),
    (b'{"schema_version": 1, "spec": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", r"nested|JSON|spec"),
], ids=["empty", "not-utf8", "null", "list", "number", "string", "deep", "huge-int", "nan", "deep-spec"])
def test_unusable_files(text, expect):
    run_hostile(text, f"file {text[:30]!r}", expect)


REQUIRED = {(): ["schema_version", "spec", "ranks"],
            ("spec",): ["schedule", "model", "seq_len", "pp", "microbatches", "slices", "virtual_stages",
                        "slice_lens", "placement", "stage_layers"],
            ("spec", "model"): ["layers", "hidden", "heads", "kv_heads", "ffn", "vocab"]}


@HOSTILE
@given(base=base_st, where=st.sampled_from(sorted(REQUIRED)), data=st.data())
def test_missing_and_extra_fields(base, where, data):
    obj = _get(base, where)
    if data.draw(st.booleans(), label="drop"):
        key = data.draw(st.sampled_from(REQUIRED[where]), label="key")
        del obj[key]
        run_hostile(_dump(base), f"missing {where}+{key}", re.escape(key) + r"|Field required|missing")
    else:
        key = data.draw(st.text(min_size=1, max_size=30).filter(lambda k: k not in obj), label="key")
        obj[key] = data.draw(st.sampled_from([0, None, "x", [], {}]), label="value")
        run_hostile(_dump(base), f"extra {where}+{key!r}", r"unknown field|Extra inputs")


@HOSTILE
@given(base=base_st, data=st.data())
def test_wrong_types_anywhere(base, data):
    """Any node of spec or ranks replaced by a value of another JSON type (or a list of junk)."""
    paths = [(pth, v) for pth, v in _paths({"spec": base["spec"], "ranks": base["ranks"]})]
    path, old = data.draw(st.sampled_from(paths), label="path")
    if isinstance(old, bool):
        new = data.draw(NOT_BOOL, label="new")
    elif isinstance(old, int):
        new = data.draw(NOT_INT, label="new")
    elif isinstance(old, str):
        new = data.draw(NOT_STR, label="new")
    elif isinstance(old, list):
        new = data.draw(st.one_of(NOT_LIST, BAD_NESTED), label="new")
    else:
        new = data.draw(NOT_LIST, label="new")
    _set(base, path, new)
    run_hostile(_dump(base), f"{'.'.join(map(str, path))} = {new!r}", r"spec|ranks|rank \d+|instruction")


# int fields where any other value breaks the spec's consistency, and fields that must be positive
STRUCTURAL = ["seq_len", "pp", "microbatches", "slices", "virtual_stages"]
POSITIVE = ["micro_batch_size", "tp", "cp", "dp"]
MODEL_POSITIVE = ["hidden", "heads", "kv_heads", "ffn", "vocab"]
HUGE = st.sampled_from([2**31, 2**63, 2**64 + 1, 10**30, -(2**63), -1, 0])


@HOSTILE
@given(base=base_st, data=st.data())
def test_bad_numbers_in_spec(base, data):
    spec = base["spec"]
    kind = data.draw(st.sampled_from(["structural", "positive", "model", "layers", "list-entry", "threshold"]), label="kind")
    if kind == "structural":
        key = data.draw(st.sampled_from(STRUCTURAL), label="key")
        new = data.draw(st.one_of(HUGE, st.integers(-5, 50)).filter(lambda x: x != spec[key]), label="new")
        spec[key] = new
    elif kind == "positive":
        key = data.draw(st.sampled_from(POSITIVE), label="key")
        spec[key] = new = data.draw(st.integers(max_value=0) | HUGE.filter(lambda x: x <= 0), label="new")
    elif kind == "model":
        key = data.draw(st.sampled_from(MODEL_POSITIVE), label="key")
        spec["model"][key] = new = data.draw(st.integers(max_value=0), label="new")
    elif kind == "layers":
        key = "model.layers"
        spec["model"]["layers"] = new = data.draw(st.one_of(HUGE, st.integers(-3, 100)).filter(lambda x: x != spec["model"]["layers"]), label="new")
    elif kind == "threshold":
        key = "exchange_threshold"
        spec[key] = new = data.draw(st.integers(max_value=-1), label="new")
    else:
        field = data.draw(st.sampled_from(["slice_lens", "placement", "stage_layers"]), label="field")
        paths = [pth for pth, v in _paths(spec[field]) if isinstance(v, int)]
        pth = data.draw(st.sampled_from(paths), label="at")
        new = data.draw(st.one_of(HUGE, st.integers(-3, 40)).filter(lambda x: x != _get(spec[field], pth)), label="new")
        _set(spec[field], pth, new)
        key = f"{field}{list(pth)}"
    run_hostile(_dump(base), f"spec {key} = {new}", r"spec")


@HOSTILE
@given(base=base_st, data=st.data())
def test_schema_version_and_rank_count(base, data):
    p = base["spec"]["pp"]
    kind = data.draw(st.sampled_from(["version", "no-version", "empty", "fewer", "more", "pp"]), label="kind")
    if kind == "version":
        base["schema_version"] = v = data.draw(st.sampled_from([0, 3, -1, 10**20, "1", 1.0, 2.0, True, None, [1], {}, math.nan]), label="v")
        run_hostile(_dump(base), f"schema_version {v!r}", r"schema_version")
    elif kind == "no-version":
        del base["schema_version"]
        run_hostile(_dump(base), "no schema_version", r"schema_version")
    elif kind == "empty":
        base["ranks"] = data.draw(st.sampled_from([[], [[]] * p]), label="ranks")
        run_hostile(_dump(base), f"empty ranks {base['ranks']}", r"ranks|lacks|coverage|deadlock|rule")
    elif kind == "fewer":
        base["ranks"] = base["ranks"][:data.draw(st.integers(0, p - 1), label="keep")]
        run_hostile(_dump(base), "fewer ranks than pp", r"ranks.*pp=")
    elif kind == "more":
        base["ranks"] = base["ranks"] + [list(base["ranks"][-1])] * data.draw(st.integers(1, 3), label="extra")
        run_hostile(_dump(base), "more ranks than pp", r"ranks.*pp=")
    else:  # a spec for another pp (self-consistent), ranks of the original plan
        q = data.draw(st.integers(1, 6).filter(lambda q: q != p), label="pp")
        s = base["spec"]
        model = ir.ModelConfig(**s["model"]).model_copy(update={"layers": max(s["model"]["layers"], q * s["virtual_stages"])})
        other = build_spec(s["schedule"], model, pp=q, microbatches=s["microbatches"], slices=s["slices"],
                           virtual_stages=s["virtual_stages"], seq_len=s["seq_len"])
        base["spec"] = other.model_dump(mode="json")
        run_hostile(_dump(base), f"spec pp={q}, {p} rank streams", r"ranks.*pp=")


# ---------------------------------------------------------------- well-typed plans with a wrong schedule
def _instrs(base) -> list[tuple[int, int, str]]:
    return [(r, i, t) for r, s in enumerate(base["ranks"]) for i, t in enumerate(s) if t != "OPT"]


def _fields(text: str) -> dict:
    ins = ir.parse(text)
    return ins._asdict()


def _text(**f) -> str:
    return ir.to_text(ir.Instr(**f))


@HOSTILE
@given(base=base_st, data=st.data())
def test_wrong_schedules(base, data):
    """Every field validates; the schedule is wrong. check: exit 1 naming a rule; simulate: exit 1
    naming the deadlock or the broken rule."""
    spec = base["spec"]
    p, m, n, v = spec["pp"], spec["microbatches"], spec["slices"], spec["virtual_stages"]
    ranks = base["ranks"]
    r, i, t = data.draw(st.sampled_from(_instrs(base)), label="at")
    f = _fields(t)
    kinds = ["drop", "dup", "range", "b-first", "kv-unmatched"]
    if f["kind"] in ir.P2P:
        kinds += ["retag", "peer-self"]
    if p > 1:
        kinds.append("cycle")
    kind = data.draw(st.sampled_from(kinds), label="kind")
    if kind == "drop":
        del ranks[r][i]
    elif kind == "dup":
        ranks[r].insert(data.draw(st.integers(0, len(ranks[r])), label="to"), t)
    elif kind == "range":
        opts = {"mb": m, "slice": n, "chunk": v}
        if f["kind"] in ir.P2P:
            opts["peer"] = p
        key = data.draw(st.sampled_from(sorted(opts)), label="field")
        f[key] = opts[key] + data.draw(st.sampled_from([0, 1, 7, 10**17]), label="over")
        ranks[r][i] = _text(**f)
    elif kind == "b-first":  # a backward moved to the front of its stream runs before its forward
        j = next(k for k, x in enumerate(ranks[r]) if x.startswith("B "))
        ranks[r].insert(0, ranks[r].pop(j))
    elif kind == "kv-unmatched":  # an exchange whose partner never shows up
        peer = (r + 1) % p if p > 1 else 0
        j = next(k for k, x in enumerate(ranks[r]) if x.startswith("F "))
        g = _fields(ranks[r][j])
        ranks[r].insert(j, _text(kind=ir.Kind.KVF_SEND, mb=g["mb"], slice=g["slice"], chunk=g["chunk"], peer=peer,
                                 tag=10**6, lo=0, hi=1))
    elif kind == "retag":
        f["tag"] += 10**6
        ranks[r][i] = _text(**f)
    elif kind == "peer-self":
        f["peer"] = r
        ranks[r][i] = _text(**f)
    else:  # rank 0 waits for a gradient before sending anything: a wait cycle through every rank
        j = next(k for k, x in enumerate(ranks[0]) if x.startswith("RECV_GRAD"))
        ranks[0].insert(0, ranks[0].pop(j))
    sim = r"deadlock|breaks a rule"
    run_hostile(_dump(base), f"{kind} at rank {r} #{i} {t!r}",
                {"check": r"\[(deadlock|range|unique|coverage|order|match|dependency|kv|p2p-order)\]",
                 # the hoisted receive may also pass another from the same peer: refused by p2p-order first
                 "simulate": r"deadlock|\[p2p-order\]" if kind == "cycle" else sim})


BAD_TOKENS = ["", "   ", "f mb0 s0 c0", "F", "F mb0 s0", "F mb0 s0 c0 c1", "F mb0 s0 c0 to1", "F mb-1 s0 c0",
              "F mbx s0 c0", "F mb0 s0 c\u00b2", "F mb0 s0 c\u0661", "F mb" + "9" * 30 + " s0 c0", "F mb0 s0 c" + "1" * 5000,
              "SEND_ACT mb0 s0 c0 t1", "RECV_ACT mb0 s0 c0 to1 t1", "KVF_SEND mb0 s1 c0 to1 t3", "OPT mb0",
              "F mb0\x00 s0 c0", "F mb0 s0 c0\n", "F\u00a0mb0 s0 c0", "SEND_ACT mb0 s0 c0 to1 t1 t2", "B mb0 s0 c0 x1",
              "F mb0 s0 c+1", "F mb0 s0 c 0", "F mb0 s0 c0x", "\U0001F600", "F mb1e3 s0 c0"]


@HOSTILE
@given(base=base_st, data=st.data())
def test_bad_instruction_text(base, data):
    ranks = base["ranks"]
    r = data.draw(st.integers(0, len(ranks) - 1), label="rank")
    bad = data.draw(st.one_of(
        st.sampled_from(BAD_TOKENS),
        st.text(max_size=30).filter(lambda s: not s.split() or s.split()[0] not in ir.ALL_KINDS),  # unknown kind
        st.builds(lambda k, junk: f"{k} {junk}", st.sampled_from(sorted(ir.ALL_KINDS)),
                  st.text(alphabet="mbsctofrx0123456789-+ .\u0663\u00b2", min_size=1, max_size=12)),
    ), label="text")
    if bad.endswith("\n") and bad.strip() and bad.split()[0] in ir.ALL_KINDS:
        return  # trailing whitespace alone is legal
    try:
        ir.parse(bad)
    except ir.PlanFormatError:
        pass
    else:
        if data.draw(st.booleans(), label="skip-valid"):
            return
        # a well-formed instruction that lands somewhere random: must still be caught (exit 1)
    ranks[r].insert(data.draw(st.integers(0, len(ranks[r])), label="at"), bad)
    if bad.strip() == "OPT":
        return  # an extra optimizer step is legal
    run_hostile(_dump(base), f"instruction {bad!r}", r"instruction|rank \d+|\[\w+\]|deadlock|breaks a rule")


def _compact_mutants():
    """(name, mutate(plan dict with compact ranks), what the message must name): each one makes
    the plan unusable (exit 2) or invalid (exit 1)."""
    import array
    import base64

    def refields(c, fn, code="I"):
        arr = array.array(c["fields"][0], base64.b64decode(c["fields"][2:]))
        out = array.array(code, fn(list(arr)))
        c["fields"] = code + ":" + base64.b64encode(out.tobytes()).decode()

    def first_number(vals):
        vals[0] = 2**32 - 1
        return vals

    return [
        ("codes not an object", lambda c: c.update(codes=["F"]), r"codes"),
        ("code of two chars", lambda c: c["codes"].update(FF="F"), r"codes"),
        ("unknown kind", lambda c: c["codes"].update(Z="JUMP"), r"unknown kind 'JUMP'"),
        ("kind not a string", lambda c: c["codes"].update(Z=3), r"unknown kind 3"),
        ("kinds not a string", lambda c: c.update(kinds=list(c["kinds"])), r"kinds"),
        ("stray kind char", lambda c: c.update(kinds=c["kinds"] + "?"), r"kinds"),
        ("a kind char dropped", lambda c: c.update(kinds=c["kinds"][1:]), r"numbers|lacks|rule|optimizer"),
        ("fields not a string", lambda c: c.update(fields=[1, 2]), r"fields"),
        ("fields typecode", lambda c: c.update(fields="i:" + c["fields"][2:]), r"fields"),
        ("fields not base64", lambda c: c.update(fields="I:@@@@"), r"base64"),
        ("fields cut", lambda c: c.update(fields="I:" + base64.b64encode(base64.b64decode(c["fields"][2:])[:-2]).decode()),
         r"whole numbers"),
        ("one number more", lambda c: refields(c, lambda v: v + [0]), r"numbers"),
        ("a number past 18 digits", lambda c: refields(c, lambda v: [10**18] + v[1:], "Q"), r"18 digits"),
        ("a number out of range", lambda c: refields(c, first_number), r"range|needs|peer|tag"),
        ("extra key", lambda c: c.update(extra=1), r"exactly"),
        ("missing key", lambda c: c.pop("codes"), r"exactly"),
    ]


COMPACT_MUTANTS = _compact_mutants()


@HOSTILE
@given(base=base_st, data=st.data())
def test_compact_streams(base, data):
    """A plan in the compact form (schema_version 2) with one rank's codes, kinds or fields broken."""
    d = json.loads(ir.dumps(ir.from_dict(base), compact=True))
    assert d["schema_version"] == 2 and all(isinstance(r, dict) for r in d["ranks"])
    r = data.draw(st.integers(0, len(d["ranks"]) - 1), label="rank")
    name, mutate, expect = data.draw(st.sampled_from(COMPACT_MUTANTS), label="mutant")
    mutate(d["ranks"][r])
    run_hostile(_dump(d), f"compact rank {r}: {name}", expect)


def test_compact_rank_needs_schema_version_2():
    d = json.loads(ir.dumps(ir.from_dict(BASES[0]), compact=True))
    d["schema_version"] = 1
    run_hostile(_dump(d), "compact rank under schema_version 1", r"list of strings")


# ---------------------------------------------------------------- through a real process
def _subprocess_cases() -> list[tuple[str, bytes]]:
    b = BASES[0]
    cases = [("truncated", ir.dumps(ir.from_dict(b))[:200].encode()), ("empty", b""), ("deep", b"[" * 100_000),
             ("huge int", b'{"schema_version": ' + b"9" * 5000 + b"}"), ("not utf-8", b"\xff\xfe\x00{")]
    for name, mut in [
        ("schema", lambda d: d.update(schema_version=3)),
        ("pp float", lambda d: d["spec"].update(pp=2.0)),
        ("bool int", lambda d: d["spec"].update(slices=True)),
        ("nan", lambda d: d["spec"].update(seq_len=math.nan)),
        ("null nested", lambda d: d["spec"].update(slice_lens=[[None]])),
        ("extra newline key", lambda d: d["spec"].update({"a\nb": 1})),
        ("unknown kind", lambda d: d["ranks"][0].insert(0, "JUMP mb0")),
        ("unicode digit", lambda d: d["ranks"][0].insert(0, "F mb0 s0 c\u00b2")),
        ("drop unit", lambda d: d["ranks"][1].remove("F mb0 s0 c0")),
        ("cycle", lambda d: d["ranks"][0].insert(0, d["ranks"][0].pop(4))),
        ("unmatched send", lambda d: d["ranks"][0].insert(1, "SEND_ACT mb0 s0 c0 to1 t999")),
        ("empty ranks", lambda d: d.update(ranks=[])),
    ]:
        d = copy.deepcopy(b)
        mut(d)
        cases.append((name, _dump(d).encode()))
    return cases


def test_no_traceback_reaches_the_terminal():
    cases = _subprocess_cases()
    jobs = []
    tmp = tempfile.mkdtemp(prefix="slimpipe-hostile-sp-")
    for k, (name, data) in enumerate(cases):
        path = os.path.join(tmp, f"plan{k}.json")
        with open(path, "wb") as f:
            f.write(data)
        jobs += [(name, t, t.argv(path)) for t in TARGETS if t.argv is not None]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def run(job):
        name, t, argv = job
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
        return name, t, proc

    with ThreadPoolExecutor(max(2, os.cpu_count() or 2)) as pool:
        results = list(pool.map(run, jobs))
    for name, t, proc in results:
        TRIED["subprocess"] += 1
        _assert_clean(t.name, f"subprocess {name}", proc.returncode, proc.stdout, proc.stderr, None)
    assert len(results) >= 24


# ---------------------------------------------------------------- the count, in the test output
class _Summary:
    def pytest_terminal_summary(self, terminalreporter):
        terminalreporter.write_line(
            f"hostile plans: {TRIED['plans']} tried in-process ({TRIED['calls']} command runs: "
            f"{TRIED['exit1']} exit 1, {TRIED['exit2']} exit 2) + {TRIED['subprocess']} subprocess runs; "
            f"no traceback, no hang")


@pytest.fixture(autouse=True, scope="module")
def _report_count(request):
    summary = _Summary()
    request.config.pluginmanager.register(summary, "slimpipe-hostile-summary")
    yield
    print(f"\nhostile plans tried: {TRIED['plans']}")


def test_at_least_a_thousand_plans(request):
    """Runs last in this module: the families above together tried at least 1,000 plans."""
    names = {item.name.split("[")[0] for item in request.session.items if item.module is request.module}
    wanted = {n for n in globals() if n.startswith("test_") and n != "test_at_least_a_thousand_plans"}
    if not wanted <= names:
        pytest.skip("only part of the hostile suite was selected")
    assert TRIED["plans"] >= 1000, TRIED
