"""IR: the text form round-trips, plans round-trip through JSON exactly, bad files fail cleanly."""
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

import ir
from compiler import build_spec, compile_plan, resolve_model
from ir import Instr, Kind, PlanFormatError

NUM = st.integers(0, 10**6)


@st.composite
def instrs(draw, num=NUM):
    """Any instruction of any kind in ir.KINDS, with exactly the fields its table row carries."""
    kind = draw(st.sampled_from(sorted(ir.ALL_KINDS)))
    fields = ir.KINDS[kind].fields
    val = {f: (draw(num) if f in fields else -1) for f in ("mb", "s", "c", "to", "t")}
    peer = draw(num) if ("to" in fields or "from" in fields) else -1
    lo, hi = (draw(num), draw(num)) if "lo" in fields else (0, 0)
    return Instr(kind, val["mb"], val["s"], val["c"], peer, val["t"], lo, hi)


@given(instrs())
def test_text_round_trip(ins):
    assert ir.parse(ir.to_text(ins)) == ins


def test_text_any_token_order():
    assert ir.parse("SEND_ACT t17 to2 c1 s2 mb3") == Instr(Kind.SEND_ACT, 3, 2, 1, 2, 17)


# what a hand-edited or hostile plan line may look like beside the canonical form
_EDITS = [lambda t: t, lambda t: t, lambda t: t.replace(" ", "  ", 1), lambda t: " ".join(t.split()[:1] + t.split()[:0:-1]),
          lambda t: t.replace("mb", "mb0", 1), lambda t: t.replace("c", "c\u00b2", 1), lambda t: t + "\nOPT",
          lambda t: t + " ", lambda t: "J" + t, lambda t: t.replace("s", "s99999999999999999999", 1), lambda t: 7,
          lambda t: t.replace("mb", "mb1234567", 1)]


def _outcome(fn, texts):
    try:
        return fn(texts)
    except PlanFormatError as e:
        return str(e)


@given(st.lists(st.tuples(instrs(st.integers(0, 40) | st.integers(2040, 2050) | NUM), st.integers(0, len(_EDITS) - 1)), max_size=12), st.booleans())
def test_parse_stream_is_parse_line_by_line(items, canonical):
    """ir.parse_stream (a plan file's rank at once) gives what parse gives line by line: the same
    instructions, or the same error, whatever the lines look like."""
    texts = [ir.to_text(i) if canonical else _EDITS[e](ir.to_text(i)) for i, e in items]
    assert _outcome(ir.parse_stream, texts) == _outcome(lambda ts: tuple(map(ir.parse, ts)), texts)


@pytest.mark.parametrize("text,needle", [
    ("X mb0 s0 c0", "unknown kind 'X'"),
    ("F mb0 s0", "missing c"),
    ("F mb0 s0 c0 to1", "takes no 'to'"),
    ("F mb0 s-1 c0", "bad token 's-1'"),
    ("F mb0 mb1 s0 c0", "given twice"),
    ("", "empty instruction"),
])
def test_text_errors_name_the_token(text, needle):
    with pytest.raises(PlanFormatError, match=needle):
        ir.parse(text)


@pytest.mark.parametrize("schedule,v,n", [("slimpipe", 2, 4), ("interleaved-1f1b", 2, 1), ("gpipe", 1, 2)])
def test_plan_json_round_trip_is_exact(tmp_path, schedule, v, n):
    plan = compile_plan(build_spec(schedule, resolve_model("tiny"), pp=2, microbatches=2, slices=n,
                                   virtual_stages=v, seq_len=64))
    path = tmp_path / "plan.json"
    ir.save(plan, str(path))
    back = ir.load(str(path))
    assert back == plan
    assert back.spec == plan.spec and back.ranks == plan.ranks and back.meta == plan.meta
    assert json.loads(path.read_text())["schema_version"] == ir.SCHEMA_VERSION


@pytest.mark.parametrize("schedule,v,n,extra", [("slimpipe", 2, 4, {"exchange": True}), ("seq1f1b", 1, 2, {"dp": 2}),
                                                 ("slimpipe", 1, 4, {"split_backward": True}), ("zb-v", 2, 1, {})])
def test_compact_form_round_trip_is_exact(tmp_path, schedule, v, n, extra):
    """The compact form (schema_version 2: kinds as one character each, the fields they carry as one
    base64 array per rank) loads back to the same plan; a plan below ir.COMPACT_MIN instructions is
    written as texts (schema_version 1), one at or above it compactly, and either loads."""
    plan = compile_plan(build_spec(schedule, resolve_model("tiny", {"layers": 8}), pp=2, microbatches=2, slices=n,
                                   virtual_stages=v, seq_len=64, **extra))
    text, compact = ir.dumps(plan), ir.dumps(plan, compact=True)
    assert json.loads(text)["schema_version"] == 1 and isinstance(json.loads(text)["ranks"][0], list)
    d = json.loads(compact)
    assert d["schema_version"] == ir.COMPACT_SCHEMA_VERSION and set(d["ranks"][0]) == {"codes", "kinds", "fields"}
    assert len(d["ranks"][0]["kinds"]) == len(plan.ranks[0])
    for back in (ir.loads(text), ir.loads(compact)):
        assert back.spec == plan.spec and back.ranks == plan.ranks and back.meta == plan.meta
    many = plan.with_ranks([r * (ir.COMPACT_MIN // plan.num_instructions() + 1) for r in plan.ranks])
    assert json.loads(ir.dumps(many))["schema_version"] == 2 and ir.loads(ir.dumps(many)).ranks == many.ranks
    ir.save(many, str(tmp_path / "text.json"), compact=False)  # a large plan as texts, to edit by hand
    assert json.loads((tmp_path / "text.json").read_text())["schema_version"] == 1
    assert ir.load(str(tmp_path / "text.json")).ranks == many.ranks


def test_compact_form_only_for_what_text_can_say():
    """A field the text form cannot write (negative, over 18 digits) keeps the plan in texts,
    where parse then refuses it as it always did."""
    plan = compile_plan(build_spec("1f1b", resolve_model("tiny"), pp=2, microbatches=2, seq_len=16))
    for bad in (Instr(Kind.F, -1, 0, 0), Instr(Kind.F, 10**18, 0, 0)):
        odd = plan.with_ranks([(bad,) + plan.ranks[0], plan.ranks[1]])
        d = json.loads(ir.dumps(odd, compact=True))
        assert d["schema_version"] == 1 and d["ranks"][0][0] == ir.to_text(bad)
        with pytest.raises(PlanFormatError):
            ir.loads(ir.dumps(odd, compact=True))


def test_golden_1f1b_plan():
    """1F1B p=2 m=2: the exact streams (warm-up 1 forward on rank 0, none on rank 1)."""
    plan = compile_plan(build_spec("1f1b", resolve_model("tiny"), pp=2, microbatches=2, seq_len=16))
    assert [ir.to_text(i) for i in plan.ranks[0]] == [
        "F mb0 s0 c0", "SEND_ACT mb0 s0 c0 to1 t0",
        "F mb1 s0 c0", "SEND_ACT mb1 s0 c0 to1 t4",
        "RECV_GRAD mb0 s0 c0 from1 t1", "B mb0 s0 c0",
        "RECV_GRAD mb1 s0 c0 from1 t5", "B mb1 s0 c0", "OPT"]
    assert [ir.to_text(i) for i in plan.ranks[1]] == [
        "RECV_ACT mb0 s0 c0 from0 t0", "F mb0 s0 c0", "B mb0 s0 c0", "SEND_GRAD mb0 s0 c0 to0 t1",
        "RECV_ACT mb1 s0 c0 from0 t4", "F mb1 s0 c0", "B mb1 s0 c0", "SEND_GRAD mb1 s0 c0 to0 t5", "OPT"]


def test_no_comm_between_stages_on_one_rank():
    """p=1 with v=2: both chunks on rank 0, no sends at all."""
    plan = compile_plan(build_spec("looped-bfs", resolve_model("tiny"), pp=1, microbatches=2, virtual_stages=2, seq_len=8))
    assert {i.kind for i in plan.ranks[0]} == {Kind.F, Kind.B, Kind.OPT}


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d.update(schema_version=99), "schema_version 99 is not supported"),
    (lambda d: d["spec"].update(pp="two"), "spec.pp"),
    (lambda d: d.update(extra=1), "unknown field"),
    (lambda d: d["ranks"][0].append("F mb0 s0"), "rank 0"),
    (lambda d: d["ranks"].pop(), "list of 2 instruction lists"),
    (lambda d: d["spec"].update(slice_lens=[[1, 2]] * 2), "slice_lens"),
])
def test_bad_plans_raise_one_line(mutate, needle):
    plan = compile_plan(build_spec("1f1b", resolve_model("tiny"), pp=2, microbatches=2, seq_len=16))
    d = ir.to_dict(plan)
    mutate(d)
    with pytest.raises(PlanFormatError, match=needle) as e:
        ir.from_dict(d)
    assert "\n" not in str(e.value)


def test_layer_split_rule():
    """Uneven layers: the first (layers mod stages) stages take one layer more."""
    spec = build_spec("1f1b", resolve_model("tiny", {"layers": 10}), pp=4, microbatches=1, seq_len=8)
    assert spec.stage_layers == (3, 3, 2, 2)
    assert spec.stage_first_layer() == [0, 3, 6, 8]


def test_written_files_get_the_umask_mode_and_long_paths_stay_short(tmp_path):
    """atomic_write's temporary file (mkstemp: 0600) ends with the mode open() would give it;
    an unreadable plan's one line names a huge path once, cut short."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        ir.atomic_write(str(tmp_path / "a.json"), "{}")
        assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == 0o644
        os.umask(0o077)
        ir.atomic_write(str(tmp_path / "b.json"), b"{}")
        assert stat.S_IMODE(os.stat(tmp_path / "b.json").st_mode) == 0o600
    finally:
        os.umask(old)
    deep = str(tmp_path / ("d" * 250) / ("e" * 250) / "plan.json")
    with pytest.raises(ir.PlanFormatError) as e:
        ir.load(deep)
    assert len(str(e.value)) < 300 and "not found" in str(e.value)
    with pytest.raises(ir.PlanFormatError) as e:
        ir.load(str(tmp_path) + "/" + "x" * 300 + "/")  # a directory-like path: unreadable, not "not found"
    assert len(str(e.value)) < 300


def test_atomic_write_keeps_links_and_special_files(tmp_path):
    """A symbolic link at the output is followed (its target replaced, the link kept); an output
    that is not a regular file (a FIFO here; /dev/stdout, /dev/null) is written to directly, not
    replaced by a file (found by an audit helper: `-o /dev/stdout` turned /dev/stdout into a file)."""
    import os
    import threading

    target, link = tmp_path / "target.json", tmp_path / "link.json"
    link.symlink_to("target.json")
    ir.atomic_write(str(link), "{}")
    assert link.is_symlink() and target.read_text() == "{}"
    ir.atomic_write(str(link), "[1]")
    assert link.is_symlink() and target.read_text() == "[1]"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo).read()))
    reader.start()
    ir.atomic_write(str(fifo), "through the pipe")
    reader.join(10)
    assert got == ["through the pipe"] and fifo.is_fifo()
