"""The command line: the main job works, bad input is one line with exit 2 and writes nothing,
and check names both ranks of a broken dependency."""
import json
import os
import subprocess
import sys

import pytest

import ir
from compiler.cli import main
from passes.grid import listing

HF_CONFIG = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 128, "vocab_size": 100}


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_compile_check_simulate_show(tmp_path, capsys):
    plan = str(tmp_path / "plan.json")
    code, out, _ = run(capsys, "compile", "--schedule", "slimpipe", "--pp", "4", "--microbatches", "2",
                       "--slices", "4", "-o", plan)
    assert code == 0 and "wrote" in out
    assert run(capsys, "check", plan)[0] == 0
    code, out, _ = run(capsys, "check", plan, "--json")
    assert json.loads(out) == {"valid": True, "usable": True, "problems": []}
    code, out, _ = run(capsys, "simulate", plan, "--unit-costs", "--json")
    sim = json.loads(out)
    assert sim["makespan"] == 33 and abs(sim["bubble_fraction"] - 3 / 11) < 1e-12
    assert [r["peak_units"] for r in sim["ranks"]] == [8, 8, 6, 4]
    code, out, _ = run(capsys, "show", plan)
    assert code == 0 and out.splitlines()[2].startswith("rank 0 F0.0 F0.1 F0.2 F0.3 F1.0")


@pytest.mark.parametrize("fmt, version", [("text", 1), ("compact", 2), ("auto", 1)])
def test_plan_format_chooses_the_schema(tmp_path, capsys, fmt, version):
    """--plan-format: texts (schema_version 1) or the compact form (2) whatever the plan's size (auto:
    compact from ir.COMPACT_MIN instructions); both load as the same plan."""
    out = {}
    for name in ("default", fmt):
        path = str(tmp_path / f"{name}.json")
        extra = [] if name == "default" else ["--plan-format", fmt]
        assert run(capsys, "compile", "--schedule", "interleaved-1f1b", "--pp", "2", "--virtual-stages", "2",
                   "--microbatches", "4", "-o", path, *extra)[0] == 0
        out[name] = path
    assert json.load(open(out[fmt]))["schema_version"] == version
    assert ir.load(out[fmt]) == ir.load(out["default"])
    csv = str(tmp_path / "plan.csv")
    assert run(capsys, "export", out[fmt], "-o", csv)[0] == 0
    assert run(capsys, "import", csv, "-o", str(tmp_path / "back.json"), "--plan-format", fmt)[0] == 0
    assert json.load(open(tmp_path / "back.json"))["schema_version"] == version


def test_interleaved_microbatches_not_a_multiple_of_pp(tmp_path, capsys):
    # issue 15.6: m = 10 on p = 4 (a fixed global batch) runs in rounds of 5 micro-batches: the
    # interleaved closed form 3(v m + p - 1) = 69 unit steps, bubble 3/23, rank r warms up 5 + 2(p-r-1)
    plan = str(tmp_path / "plan.json")
    code, out, err = run(capsys, "compile", "--schedule", "interleaved-1f1b", "--pp", "4", "--virtual-stages", "2",
                         "--microbatches", "10", "-o", plan)
    assert code == 0 and "m=10" in out, err
    assert run(capsys, "check", plan)[0] == 0
    code, out, _ = run(capsys, "simulate", plan, "--unit-costs", "--json")
    sim = json.loads(out)
    assert sim["makespan"] == 69 and abs(sim["bubble_fraction"] - 3 / 23) < 1e-12
    assert [r["peak_units"] for r in sim["ranks"]] == [12, 10, 8, 6]


def test_config_json_and_overrides(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(HF_CONFIG))
    plan = str(tmp_path / "p.json")
    code, _, err = run(capsys, "compile", "--schedule", "1f1b", "--pp", "2", "--microbatches", "2",
                       "--model", str(cfg), "--layers", "6", "--seq-len", "32", "-o", plan)
    assert code == 0, err
    spec = ir.load(plan).spec
    assert (spec.model.layers, spec.model.hidden, spec.model.kv_heads, spec.model.vocab) == (6, 64, 2, 100)
    assert spec.stage_layers == (3, 3)


BAD = [
    (["--schedule", "zigzag"], "--schedule 'zigzag' is unknown; allowed: gpipe, 1f1b"),
    (["--pp", "0"], "argument --pp: 0 is not allowed; give an integer >= 1"),
    (["--slices", "200", "--seq-len", "128"], "--slices 200 is larger than --seq-len 128"),
    (["--slices", "3", "--seq-len", "128"], "--seq-len 128 is not divisible by --slices 3"),
    (["--pp", "8", "--virtual-stages", "2"], "fewer than pp*virtual_stages=16"),
    (["--slices", "2", "--pp", "4", "--virtual-stages", "2"], "interleaved slimpipe (--virtual-stages 2) needs slices >= --pp 4"),
    (["--model", "/nonexistent/config.json"], "no such file"),
    (["--model", "gpt5"], "--model 'gpt5' is unknown"),
    (["--schedule", "1f1b", "--slices", "4"], "1f1b does not slice the sequence"),
]


@pytest.mark.parametrize("args,needle", BAD)
def test_bad_input_exit_2_one_line_nothing_written(tmp_path, capsys, args, needle):
    plan = tmp_path / "plan.json"
    base = {"--schedule": "slimpipe", "--pp": "2", "--microbatches": "4"}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    argv = ["compile"] + [x for kv in base.items() for x in kv] + ["-o", str(plan)]
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert needle in err and err.count("\n") == 1, err
    assert not plan.exists() and os.listdir(tmp_path) == []


def test_malformed_config_json(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text("{not json")
    code, _, err = run(capsys, "compile", "--schedule", "1f1b", "--pp", "2", "--microbatches", "2",
                       "--model", str(cfg), "-o", str(tmp_path / "p.json"))
    assert code == 2 and "not a readable JSON file" in err and err.count("\n") == 1
    cfg.write_text(json.dumps({k: v for k, v in HF_CONFIG.items() if k != "hidden_size"}))
    code, _, err = run(capsys, "compile", "--schedule", "1f1b", "--pp", "2", "--microbatches", "2",
                       "--model", str(cfg), "-o", str(tmp_path / "p.json"))
    assert code == 2 and "lacks hidden_size" in err


def test_output_in_missing_directory(tmp_path, capsys):
    code, _, err = run(capsys, "compile", "--schedule", "1f1b", "--pp", "2", "--microbatches", "2",
                       "-o", str(tmp_path / "nope" / "plan.json"))
    assert code == 2 and "does not exist" in err and not (tmp_path / "nope").exists()


def test_output_through_a_link_to_a_missing_directory_names_both(tmp_path, capsys):
    """-o a link whose target's directory is missing passes the CLI's own check (the link's directory
    exists), and atomic_write said "output directory '<the link's directory>' does not exist" (a
    PlanFormatError, as if a plan file were malformed). It is the input error it is, naming the
    path given and where it leads; nothing is written."""
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "gone" / "plan.json")
    code, out, err = run(capsys, "compile", "--schedule", "1f1b", "--pp", "2", "--microbatches", "2", "-o", str(link))
    assert (code, out, err) == (2, "", f"slimpipe compile: error: cannot write {str(link)!r}: directory "
                                       f"{str(tmp_path / 'gone')!r} (where {str(link)!r} leads) does not exist; "
                                       f"create it or choose another path\n")
    with pytest.raises(ir.SpecError) as e:
        ir.atomic_write(str(tmp_path / "nope" / "x.json"), "{}")
    assert str(e.value) == (f"cannot write {str(tmp_path / 'nope' / 'x.json')!r}: directory {str(tmp_path / 'nope')!r} "
                            f"does not exist; create it or choose another path")
    assert sorted(os.listdir(tmp_path)) == ["link.json"]


def test_a_full_disk_names_the_output_and_leaves_no_file(tmp_path, capsys, monkeypatch):
    """ENOSPC while the plan goes out said "error: No space left on device" (exit 120), naming no
    file. It names the path given (still exit 120: the output failed, not an input), the
    temporary file is removed and a file already at the path is kept as it was."""
    import errno
    import types

    import ir.plan

    out = tmp_path / "plan.json"
    out.write_text("old")

    def full_fdopen(fd, *a, **k):  # the file atomic_write writes (and no other: the proof store, forked checks)
        f = os.fdopen(fd, *a, **k)

        def write(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        f.write = write
        return f
    monkeypatch.setattr(ir.plan, "os", types.SimpleNamespace(**{**vars(os), "fdopen": full_fdopen}))
    code, stdout, err = run(capsys, "compile", "--schedule", "1f1b", "--pp", "2", "--microbatches", "2", "-o", str(out))
    monkeypatch.undo()
    assert (code, stdout, err) == (120, "", f"slimpipe compile: error: cannot write {str(out)!r}: No space left on "
                                            f"device; nothing was written (a file already there is kept)\n")
    assert os.listdir(tmp_path) == ["plan.json"] and out.read_text() == "old"
    if os.path.exists("/dev/full"):  # a device that is always full, written to directly (as /dev/stdout)
        assert run(capsys, "compile", "--schedule", "1f1b", "--pp", "2", "--microbatches", "2", "-o", str(out))[0] == 0
        code, _, err = run(capsys, "trace", str(out), "-o", "/dev/full")
        assert (code, err) == (120, "slimpipe trace: error: cannot write '/dev/full': No space left on device; the "
                                    "output may be cut short\n")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc (no file can be created in it)")
def test_output_where_no_file_can_be_made_names_the_path(tmp_path, capsys):
    """-o in a directory that refuses new files (/proc here; a read-only one alike, which root, as
    tests may run, could still write) names the path given, not atomic_write's .tmp-XXXX file,
    and is said before the compile; ir.atomic_write says the same, and a path that is a directory
    (no CLI check before it) is named too, with no temporary file left behind."""
    for path in ("/proc/x.json", "/proc/version"):
        code, out, err = run(capsys, "compile", "--schedule", "1f1b", "--pp", "2", "--microbatches", "2", "-o", path)
        assert (code, out) == (2, "")
        assert err == (f"slimpipe compile: error: cannot write {path!r}: no file can be created in '/proc' (No such "
                       f"file or directory); choose a path in a directory you can write to\n")
    with pytest.raises(ir.SpecError, match=r"^cannot write '/proc/x.json': no file can be created in '/proc' "):
        ir.atomic_write("/proc/x.json", "{}")
    (tmp_path / "d").mkdir()
    with pytest.raises(ir.SpecError) as e:
        ir.atomic_write(str(tmp_path / "d"), "{}")
    assert str(e.value) == f"cannot write {str(tmp_path / 'd')!r}: Is a directory; choose another path"
    assert sorted(os.listdir(tmp_path)) == ["d"] and os.listdir(tmp_path / "d") == []


def test_argparse_errors_are_one_line(capsys):
    assert main(["compile", "--pp", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--pp" in err


def test_hand_edited_backward_before_its_receive(tmp_path, capsys):
    """Move a backward ahead of the RECV_GRAD it needs: check exits 1 naming both ranks."""
    src = str(tmp_path / "plan.json")
    run(capsys, "compile", "--schedule", "1f1b", "--pp", "2", "--microbatches", "2", "-o", src)
    d = json.loads(open(src).read())
    r0 = d["ranks"][0]
    i = r0.index("RECV_GRAD mb0 s0 c0 from1 t1")
    assert r0[i + 1] == "B mb0 s0 c0"
    r0[i], r0[i + 1] = r0[i + 1], r0[i]
    bad = tmp_path / "edited.json"
    bad.write_text(json.dumps(d))
    code, out, _ = run(capsys, "check", str(bad))
    assert code == 1
    assert "rank 0 #4 'B mb0 s0 c0' runs before rank 0 #5 'RECV_GRAD mb0 s0 c0 from1 t1'" in out
    assert "rank 1 #3 'SEND_GRAD mb0 s0 c0 to0 t1'" in out
    # --json: scripts get the rule, rank and instruction index as fields, not only in the message
    code, out, _ = run(capsys, "check", str(bad), "--json")
    probs = json.loads(out)["problems"]
    assert code == 1 and [(p["rule"], p["rank"], p["index"]) for p in probs] == [("dependency", 0, 4)]
    d = json.loads(open(src).read())
    d["ranks"][1][3] = "F mbX s0 c0"
    bad.write_text(json.dumps(d))
    code, out, _ = run(capsys, "check", str(bad), "--json")
    assert code == 2 and [(p["rule"], p["rank"], p["index"]) for p in json.loads(out)["problems"]] == [("unreadable", 1, 3)]


def test_deadlock_names_the_cycle(tmp_path, capsys):
    """Both ranks receive before they send: the wait cycle is reported."""
    src = str(tmp_path / "plan.json")
    run(capsys, "compile", "--schedule", "1f1b", "--pp", "2", "--microbatches", "1", "-o", src)
    plan = ir.load(src)
    r0 = list(plan.ranks[0])
    # rank 0 waits for the gradient before sending the activation rank 1 needs
    send = next(i for i, x in enumerate(r0) if x.kind == ir.Kind.SEND_ACT)
    recv = next(i for i, x in enumerate(r0) if x.kind == ir.Kind.RECV_GRAD)
    r0.insert(send, r0.pop(recv))
    edited = plan.with_ranks([r0, plan.ranks[1]])
    from passes import replay
    res = replay(edited)
    assert res.cycle == [0, 1]
    msg = res.deadlock_message()
    assert "wait cycle rank 0 -> rank 1 -> rank 0" in msg
    assert "rank 0 waits at #1 'RECV_GRAD mb0 s0 c0 from1 t1'" in msg
    assert "rank 1 waits at #0 'RECV_ACT mb0 s0 c0 from0 t0'" in msg


def test_check_unusable_input_exit_2(tmp_path, capsys):
    p = tmp_path / "x.json"
    p.write_text('{"schema_version": 1, "spec": ')
    code, _, err = run(capsys, "check", str(p))
    assert code == 2 and "not valid JSON" in err
    assert run(capsys, "check", str(tmp_path / "missing.json"))[0] == 2


def test_console_script_subprocess(tmp_path):
    """Through a real interpreter: a user error prints one line and no traceback."""
    r = subprocess.run([sys.executable, "-m", "compiler.cli", "compile", "--schedule", "nope", "--pp", "2",
                        "--microbatches", "2", "-o", str(tmp_path / "p.json")], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def test_console_script_ends_with_mains_code_and_whole_output(tmp_path):
    """`python -m compiler.cli` (and the slimpipe script, compiler.cli:entry) end with os._exit once
    stdout and stderr are flushed: the file written whole, every line out, main's exit code."""
    plan = str(tmp_path / "p.json")
    cli = lambda *a: subprocess.run([sys.executable, "-m", "compiler.cli", *a], capture_output=True, text=True)
    r = cli("compile", "--schedule", "1f1b", "--pp", "2", "--microbatches", "4", "-o", plan)
    assert r.returncode == 0 and r.stdout.startswith("wrote ")
    r = cli("show", plan, "--list")
    assert r.returncode == 0 and r.stdout == listing(ir.load(plan)) + "\n"
    r = cli("simulate", plan, "--unit-costs", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["makespan"] == 15.0  # (m + p - 1)(F + B)
    r = cli("check", plan + ".missing")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not found" in r.stderr


def test_simulate_defaults_to_the_profile_the_plan_was_compiled_for(tmp_path, capsys):
    plan = str(tmp_path / "p.json")
    run(capsys, "compile", "--schedule", "slimpipe", "--pp", "2", "--microbatches", "2", "--slices", "4",
        "--device-profile", "a100", "-o", plan)
    assert json.loads(run(capsys, "simulate", plan, "--json")[1])["device_profile"] == "a100"
    assert json.loads(run(capsys, "simulate", plan, "--json", "--device-profile", "h100")[1])["device_profile"] == "h100"


def test_sizes_too_large_for_the_machine_are_one_line(tmp_path, capsys):
    """A size Python cannot hold (OverflowError) or the machine cannot (MemoryError): one line,
    exit 2, nothing written (found by an audit helper: tracebacks). Options now stop at a C int
    and plans at ir.limits.MAX_UNITS units; below those, main's MemoryError line is the net."""
    out = tmp_path / "x.json"
    code, _, err = run(capsys, "compile", "--schedule", "slimpipe", "--pp", "2", "--microbatches", str(10 ** 20), "-o", str(out))
    assert code == 2 and err.count("\n") == 1 and "is too large; give an integer from 1 to 2147483647" in err
    assert not out.exists()
    code, _, err = run(capsys, "compile", "--schedule", "slimpipe", "--pp", "2", "--microbatches", "262144", "--slices", "64",
                       "-o", str(out))
    assert code == 2 and err.count("\n") == 1 and "would hold 16,777,216 compute units" not in err and not out.exists()
    assert "the plan would hold 33,554,432 compute units (pp 2 x microbatches 262144 x slices 64" in err


@pytest.mark.parametrize("command", [["trace"], ["export"], ["plot"]])
def test_an_output_never_replaces_its_own_input(tmp_path, capsys, command):
    """`slimpipe trace plan.json -o plan.json` (and export, plot, import) refuse in one line, exit
    2, the input untouched (found by an audit helper: the plan was replaced by its trace)."""
    plan = str(tmp_path / "p.json")
    assert run(capsys, "compile", "--schedule", "1f1b", "--pp", "2", "--microbatches", "2", "-o", plan)[0] == 0
    before = open(plan).read()
    code, _, err = run(capsys, *command, plan, "-o", plan)
    assert code == 2 and err.count("\n") == 1 and "is the file this command reads" in err
    assert open(plan).read() == before
    link = tmp_path / "link.json"
    link.symlink_to(plan)  # the same file under another name
    assert run(capsys, *command, plan, "-o", str(link))[0] == 2


@pytest.mark.parametrize("command,out", [("trace", "t.json"), ("plot", "t.png")])
def test_trace_and_plot_refuse_a_plan_that_breaks_a_rule(tmp_path, capsys, command, out):
    """As simulate does: a drawing of a plan with a missing unit would mislead (found by an audit
    helper: exit 0 and a file). One line, exit 1, nothing written."""
    plan = tmp_path / "p.json"
    assert run(capsys, "compile", "--schedule", "1f1b", "--pp", "2", "--microbatches", "2", "-o", str(plan))[0] == 0
    doc = json.loads(plan.read_text())
    doc["ranks"][0] = [t for t in doc["ranks"][0] if t != "F mb1 s0 c0"]
    plan.write_text(json.dumps(doc))
    code, _, err = run(capsys, command, str(plan), "-o", str(tmp_path / out))
    assert code == 1 and err.count("\n") == 1 and "plan breaks a rule, not " in err
    assert not (tmp_path / out).exists()


def test_output_paths_that_cannot_be_files_are_named(tmp_path, capsys):
    """-o '' and -o FILE/x: one line naming what is wrong with the path the user gave (an audit
    helper saw a temporary file's name, and 'does not exist' for a file that exists)."""
    plan = tmp_path / "p.json"
    plan.write_text("{}")
    for out, says in (("", "-o '': give a file path"), (str(plan / "x.json"), "is a file, not a directory")):
        code, _, err = run(capsys, "compile", "--schedule", "1f1b", "--pp", "2", "--microbatches", "2", "-o", out)
        assert code == 2 and err.count("\n") == 1 and says in err, err
