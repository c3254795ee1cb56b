"""A new user's first hour (issue 17): units that fit, names that agree, honest `show`, parse
errors that say where, --version, and the notes the executor owes a user."""
import json
import os

import pytest

import ir
from compiler.cli import main
from compiler.search import rule_reason


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def plan_1f1b(tmp_path, capsys):
    path = str(tmp_path / "plan.json")
    assert run(capsys, "compile", "--schedule", "1f1b", "--pp", "2", "--microbatches", "2", "-o", path)[0] == 0
    return path


@pytest.mark.parametrize("cmd", [["compare", "--pp", "2"], ["tune", "--gpus", "2"]])
def test_memory_budget_without_unit_is_refused(cmd, capsys):
    code, out, err = run(capsys, *cmd, "--memory-budget", "80")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "'80' has no unit" in err and "80GiB" in err


def test_rule_reasons_keep_digits_inside_names():
    err = ir.SpecError("--slices 4: interleaved-1f1b does not slice the sequence (allowed: 1); use seq1f1b")
    assert rule_reason("interleaved-1f1b", err) == \
        "interleaved-1f1b: --slices N: interleaved-1f1b does not slice the sequence (allowed: N)"


def test_tiny_model_tables_use_units_that_fit(capsys):
    code, out, _ = run(capsys, "compare", "--model", "tiny", "--pp", "2", "--memory-budget", "1GiB")
    assert code == 0
    lines = out.splitlines()
    at = next(i for i, x in enumerate(lines) if x.strip().startswith("schedule"))
    assert "step us" in lines[at] and "peak MiB" in lines[at], lines[at]
    rows = [x for x in lines[at + 1:] if x.startswith("   ")]
    assert rows and all(float(r.split()[10]) >= 1.0 for r in rows)  # 40.2 us, never 0.000 s
    code, out, _ = run(capsys, "tune", "--model", "tiny", "--gpus", "2", "--memory-budget", "1GiB", "--top", "2")
    assert code == 0 and "budget 1.00 GiB" in out
    head = next(line for line in out.splitlines() if line.lstrip().startswith("#"))
    assert "step us" in head and "peak MiB" in head, head


def test_simulate_json_says_step_s(plan_1f1b, capsys):
    code, out, _ = run(capsys, "simulate", plan_1f1b, "--json")
    sim = json.loads(out)
    assert code == 0 and "step_s" in sim and "makespan_s" not in sim
    code, out, _ = run(capsys, "simulate", plan_1f1b)
    assert code == 0 and " us," in out.splitlines()[0]  # a tiny step reads in microseconds


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("slimpipe 0.")


def test_show_marks_a_deadlock_and_exits_1(plan_1f1b, tmp_path, capsys):
    plan = ir.load(plan_1f1b)
    r0 = list(plan.ranks[0])
    send = next(i for i, x in enumerate(r0) if x.kind == ir.Kind.SEND_ACT)
    recv = next(i for i, x in enumerate(r0) if x.kind == ir.Kind.RECV_GRAD)
    r0.insert(send, r0.pop(recv))  # rank 0 waits for a gradient before sending the activation
    bad = str(tmp_path / "dead.json")
    ir.save(plan.with_ranks([r0, plan.ranks[1]]), bad)
    code, out, err = run(capsys, "show", bad)
    lines = out.splitlines()
    assert code == 1
    assert lines[2].split()[2:4] == ["F0", "X"] and lines[3].split()[2] == "X"
    assert "deadlock: wait cycle rank 0 -> rank 1 -> rank 0" in out
    assert "invalid plan" in err


def test_show_lists_a_broken_dependency_and_exits_1(plan_1f1b, tmp_path, capsys):
    plan = ir.load(plan_1f1b)
    r1 = list(plan.ranks[1])
    f = next(i for i, x in enumerate(r1) if x.kind == ir.Kind.F)
    b = next(i for i, x in enumerate(r1) if x.kind == ir.Kind.B)
    r1[f], r1[b] = r1[b], r1[f]
    bad = str(tmp_path / "dep.json")
    ir.save(plan.with_ranks([plan.ranks[0], r1]), bad)
    code, out, _ = run(capsys, "show", bad)
    assert code == 1 and "[order] rank 1 #" in out and "runs before its forward" in out
    assert "B0!" in out.splitlines()[3]  # rank 1's misplaced backward is marked in the grid
    assert run(capsys, "show", plan_1f1b)[0] == 0


def test_parse_error_names_file_rank_and_index(plan_1f1b, tmp_path, capsys):
    d = json.loads(open(plan_1f1b).read())
    d["ranks"][1][3] = "F mbX s0 c0"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))
    code, out, err = run(capsys, "check", str(bad))
    assert code == 2 and out == ""
    assert f"{bad}: rank 1 #3: instruction 'F mbX s0 c0'" in err and err.count("\n") == 1
    # --json: scripts get the reason on stdout too
    code, out, err = run(capsys, "check", str(bad), "--json")
    rep = json.loads(out)
    assert code == 2 and rep["valid"] is False and rep["usable"] is False
    assert rep["problems"][0]["rule"] == "unreadable" and "rank 1 #3" in rep["problems"][0]["message"]
    code, out, _ = run(capsys, "check", str(tmp_path / "missing.json"), "--json")
    assert code == 2 and "not found" in json.loads(out)["problems"][0]["message"]


def test_executor_says_what_it_ignores_and_its_dtype(capsys):
    from executor.cli import build_parser, ignored_parallelism
    from compiler import build_spec, compile_plan, resolve_model

    plan = compile_plan(build_spec("1f1b", resolve_model("tiny"), pp=2, microbatches=2, seq_len=128, tp=2, cp=4))
    note = ignored_parallelism(plan)
    assert "tp=2 cp=4" in note and "pp=2 processes" in note and "ignored" in note
    assert ignored_parallelism(compile_plan(build_spec("1f1b", resolve_model("tiny"), pp=2, microbatches=2, seq_len=128))) == ""
    helptext = build_parser().format_help()
    assert "default fp32" in helptext and "--version" in helptext


def test_a_trace_or_a_profile_given_as_a_plan_is_named(tmp_path, capsys):
    """A new user passed the executor's trace and the device profile where a plan goes: the one
    line says what the file is and where it belongs, not only which fields are unknown."""
    import json as _json

    from compiler.cli import main as cli

    trace, prof = tmp_path / "measured.json", tmp_path / "cpu.json"
    trace.write_text(_json.dumps({"traceEvents": [], "displayTimeUnit": "ms"}))
    prof.write_text(_json.dumps({"name": "x", "peak_flops": 1.0, "p2p_bandwidth": 1.0, "measured": {}}))
    assert cli(["check", str(trace)]) == 2
    assert "this is a trace (Chrome trace events, as the executor's --trace writes), not a plan" in capsys.readouterr().err
    assert cli(["simulate", str(prof)]) == 2
    assert "this is a device profile (as `slimpipe profile` writes), not a plan" in capsys.readouterr().err


def test_a_reader_that_leaves_never_turns_a_verdict_into_exit_0(tmp_path):
    """`slimpipe check bad.json | head -1` with the reader gone before the verdict is written:
    exit 141 (as SIGPIPE would end the process), not 0, so `set -o pipefail` cannot pass a broken
    plan; no traceback. A new user measured exit 0 in 3 of 5 such runs."""
    import os
    import subprocess
    import sys

    from compiler import build_spec, compile_plan, resolve_model

    plan = compile_plan(build_spec("gpipe", resolve_model("tiny"), pp=2, microbatches=2, seq_len=64))
    ranks = [tuple(s) for s in plan.ranks]
    ranks[1] = tuple(i for i in ranks[1] if str(i.kind) != "RECV_ACT")  # its receives dropped: invalid
    bad = tmp_path / "bad.json"
    ir.save(plan.with_ranks(ranks), str(bad))
    r, w = os.pipe()
    os.close(r)  # the reader is gone before anything is written
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-m", "compiler.cli", "check", str(bad)], stdout=w, stderr=subprocess.PIPE,
                         text=True, env=dict(os.environ, PYTHONPATH=root), timeout=120)
    os.close(w)
    assert res.returncode == 141 and "Traceback" not in res.stderr, (res.returncode, res.stderr)


def test_tune_and_the_executor_say_when_nccl_can_hang(tmp_path, capsys):
    """The README's torchtitan recipe: tune's pick (looped-bfs p=4 v=8 m=32) has a four-rank wait
    cycle when sends block until their receive is posted; tune says so beside the file it writes,
    and the executor would say it before a CUDA run. A plan without one gets no note."""
    from compiler import build_spec, compile_plan, resolve_model
    from executor.cli import nccl_note

    out = tmp_path / "best.json"
    code, text, _ = run(capsys, "tune", "--model", "llama-7b", "--seq-len", "8192", "--gpus", "32", "--memory-budget",
                     "80GiB", "--schedules", "1f1b,interleaved-1f1b,gpipe,looped-bfs", "--time-limit", "60",
                     "-o", str(out))
    assert code == 0
    note = [ln for ln in text.splitlines() if ln.startswith("note: #1")]
    assert len(note) == 1 and "wait cycle rank 0 -> rank 1 -> rank 2 -> rank 3 -> rank 0" in note[0], text
    assert "wait cycle rank 0 -> rank 1 -> rank 2 -> rank 3 -> rank 0" in nccl_note(ir.load(str(out)))
    plain = compile_plan(build_spec("1f1b", resolve_model("tiny"), pp=4, microbatches=8, seq_len=64))
    assert nccl_note(plain) is None


def test_executor_with_stdout_closed(tmp_path):
    """`python -m executor plan.json --local >&-` (stdout closed: Python's sys.stdout is None)
    runs and exits 0 instead of failing on its first line (found by a review helper)."""
    import os
    import subprocess
    import sys

    from compiler import build_spec, compile_plan, resolve_model

    plan = tmp_path / "p.json"
    ir.save(compile_plan(build_spec("1f1b", resolve_model("tiny"), pp=2, microbatches=2, seq_len=32)), str(plan))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "executor", str(plan), "--local", "--steps", "1"], stderr=subprocess.PIPE,
                       text=True, cwd=root, env={**os.environ, "PYTHONPATH": root}, preexec_fn=lambda: os.close(1))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_a_device_given_as_a_file_is_refused_at_once(plan_1f1b, capsys):
    """/dev/zero as the plan, a profile or a model used to be read forever; a pipe still reads
    (`slimpipe check <(cat plan.json)`)."""
    for argv, want in [(["check", "/dev/zero"], "plan file '/dev/zero' is not a file (a device or socket)"),
                       (["simulate", "/dev/zero", "--unit-costs"], "plan file '/dev/zero' is not a file"),
                       (["compile", "--schedule", "1f1b", "--pp", "2", "--microbatches", "2", "--model", "/dev/urandom",
                         "-o", plan_1f1b + ".x"], "--model '/dev/urandom': not a file (a device or socket)")]:
        code, _, err = run(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and want in err, (argv, err)
    r, w = os.pipe()
    os.write(w, open(plan_1f1b, "rb").read())
    os.close(w)
    try:
        code, out, _ = run(capsys, "check", f"/dev/fd/{r}")
    finally:
        os.close(r)
    assert code == 0 and "valid, deadlock-free" in out


def test_a_bad_spec_value_is_named(plan_1f1b, tmp_path, capsys):
    d = json.load(open(plan_1f1b))
    d["spec"]["pp"] = -2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))
    code, _, err = run(capsys, "check", str(bad))
    assert code == 2 and "spec.pp: Input should be greater than or equal to 1 (got -2)" in err
    d["spec"]["pp"], d["spec"]["model"]["hidden"] = 2, "64"
    bad.write_text(json.dumps(d))
    code, _, err = run(capsys, "check", str(bad))
    assert code == 2 and "spec.model.hidden: Input should be a valid integer (got '64')" in err


CP_WHY = "context parallelism splits every slice over the cp GPUs; allowed: a --cp that divides"
COMPILE_SEQ1F1B = ("compile", "--schedule", "seq1f1b", "--pp", "2", "--microbatches", "2")


@pytest.mark.parametrize("args,line", [
    (COMPILE_SEQ1F1B + ("--slices", "2", "--cp", "3"),
     f"slimpipe compile: error: --cp 3 does not divide the 64-token slices of --seq-len 128 / --slices 2: {CP_WHY} "
     "64, or a --seq-len divisible by 6"),
    (COMPILE_SEQ1F1B + ("--slices", "4", "--partition", "flops", "--cp", "3"),
     f"slimpipe compile: error: --cp 3 does not divide --seq-len 128: {CP_WHY} 128, or a --seq-len divisible by 3"),
    (("compare", "--pp", "2", "--cp", "3", "--memory-budget", "1GiB"),
     f"slimpipe compare: error: --cp 3 does not divide --seq-len 128: {CP_WHY} 128, or a --seq-len divisible by 3"),
])
def test_cp_that_splits_a_token_is_refused(tmp_path, capsys, args, line):
    """Context parallelism gives each of its GPUs an equal share of every slice: a --cp that does not
    divide the slices (the cost model priced 64/3 tokens per GPU) is one line, exit 2, nothing written."""
    out = tmp_path / "p.json"
    code, stdout, err = run(capsys, *args, *(("-o", str(out)) if args[0] == "compile" else ()))
    assert (code, stdout, err) == (2, "", line + "\n")
    assert not out.exists()


def test_cp_slices_whole_tokens(tmp_path, capsys):
    """A --cp that divides the slices compiles (flops slices cut in multiples of lcm(2, cp)); a plan
    edited to a cp that does not is refused by simulate; tune skips such candidates, naming why."""
    out = tmp_path / "p.json"
    assert run(capsys, *COMPILE_SEQ1F1B, "--slices", "2", "--cp", "3", "--seq-len", "132", "-o", str(out))[0] == 0
    assert ir.load(str(out)).spec.slice_lens == ((66, 66), (66, 66))
    assert run(capsys, *COMPILE_SEQ1F1B, "--slices", "4", "--cp", "4", "--partition", "flops", "-o", str(out))[0] == 0
    assert ir.load(str(out)).spec.slice_lens[0] == (40, 32, 28, 28)  # [38, 32, 30, 28] without cp
    d = json.load(open(out))
    d["spec"]["cp"] = 8
    out.write_text(json.dumps(d))
    code, _, err = run(capsys, "simulate", str(out))
    assert (code, err) == (2, f"slimpipe simulate: error: {out}: plan spec: slice_lens[0]=[40, 32, 28, 28] must each "
                              "be divisible by cp=8 (context parallelism splits every slice over the cp GPUs)\n")
    code, stdout, _ = run(capsys, "tune", "--model", "tiny", "--gpus", "6", "--cp", "3", "--memory-budget", "1GiB")
    assert code == 1 and stdout.splitlines()[1] == (
        "no plan fits: 708 of 708 candidates break a rule (seq_len not divisible by n*cp (uniform slicing): 450; "
        "p*v exceeds the model's layers: 168; seq_len not divisible by cp (flops slicing): 90)")


TP_WHY = "each GPU of a tensor-parallel group holds whole KV heads; allowed: a --tp that divides"


@pytest.mark.parametrize("args,line", [
    (COMPILE_SEQ1F1B + ("--tp", "4"),
     f"slimpipe compile: error: --tp 4 must divide the model's 4 attention heads and 2 KV heads: {TP_WHY} 2"),
    (COMPILE_SEQ1F1B + ("--tp", "3", "--kv-heads", "4"),
     f"slimpipe compile: error: --tp 3 must divide the model's 4 attention heads: {TP_WHY} 4"),
    (("compare", "--pp", "2", "--tp", "4", "--memory-budget", "1GiB"),
     f"slimpipe compare: error: --tp 4 must divide the model's 4 attention heads and 2 KV heads: {TP_WHY} 2"),
])
def test_tp_that_splits_a_kv_head_is_refused(tmp_path, capsys, args, line):
    """tiny has 4 heads in 2 KV groups: --tp 4 divided the heads, so compile wrote a plan whose cost
    model priced half a KV head per GPU, and compare listed every candidate as breaking the search's
    rule (tp must divide heads and kv_heads). One line, exit 2, nothing written."""
    out = tmp_path / "p.json"
    code, stdout, err = run(capsys, *args, *(("-o", str(out)) if args[0] == "compile" else ()))
    assert (code, stdout, err) == (2, "", line + "\n")
    assert not out.exists()
    assert run(capsys, *COMPILE_SEQ1F1B, "--tp", "2", "-o", str(out))[0] == 0
    assert ir.load(str(out)).spec.tp == 2


def test_a_plan_edited_to_split_a_head_is_refused(tmp_path, capsys):
    """A plan file whose spec says tp=3 for tiny's 4 heads (2 KV heads) was simulated with a
    fraction of a head per GPU; the plan's own spec rule refuses it, as for cp."""
    out = tmp_path / "p.json"
    assert run(capsys, *COMPILE_SEQ1F1B, "-o", str(out))[0] == 0
    d = json.load(open(out))
    for tp in (3, 4):
        d["spec"]["tp"] = tp
        out.write_text(json.dumps(d))
        code, _, err = run(capsys, "simulate", str(out))
        assert (code, err) == (2, f"slimpipe simulate: error: {out}: plan spec: tp={tp} must divide the model's 4 attention "
                                  "heads and 2 KV heads (each GPU of a tensor-parallel group holds whole heads)\n")


def test_a_corrupt_or_odd_proof_store_never_fails_a_command(plan_1f1b, capsys):
    """A proof file that nests too deep for json (RecursionError) or a FIFO at the proof's path:
    simulate --unit-costs replays (it crashed with a traceback, and hung on the FIFO)."""
    from passes.check import proof_key

    key = proof_key(ir.load(plan_1f1b))
    store = ir.proofs.cache_dir()
    os.makedirs(store, exist_ok=True)
    for make in (lambda p: open(p, "w").write("[" * 100000 + "]" * 100000), os.mkfifo):
        path = os.path.join(store, key)
        if os.path.lexists(path):
            os.remove(path)
        make(path)
        code, out, err = run(capsys, "simulate", plan_1f1b, "--unit-costs", "--json")
        assert code == 0 and json.loads(out)["makespan"] == 9.0, err


def test_a_device_behind_a_csv_name_is_refused(tmp_path, capsys):
    link = tmp_path / "z.csv"
    link.symlink_to("/dev/zero")
    code, _, err = run(capsys, "check", str(link))
    assert code == 2 and err.count("\n") == 1 and "is not a file (a device or socket)" in err
