"""Trace and plot commands: event rows, atomic outputs, the optional-extra error."""
import json
import sys

import pytest

from compiler import build_spec, compile_plan, resolve_model
from compiler.cli import main
from ir import save
from passes.trace import chrome_trace


@pytest.fixture
def plan_file(tmp_path):
    plan = compile_plan(build_spec("slimpipe", resolve_model("tiny"), pp=4, microbatches=2, slices=4, seq_len=128,
                                   exchange=True))
    path = tmp_path / "plan.json"
    save(plan, str(path))
    return plan, str(path)


def test_trace_rows_and_events(plan_file):
    plan, _ = plan_file
    tr = chrome_trace(plan, unit_costs=True)
    xs = [e for e in tr["traceEvents"] if e["ph"] == "X"]
    compute = [e for e in xs if e["tid"] == 0]
    comm = [e for e in xs if e["tid"] == 1]
    assert len(compute) == sum(1 for s in plan.ranks for i in s if i.kind in ("F", "B"))
    assert {e["pid"] for e in compute} == set(range(4))
    assert len([e for e in comm if e["cat"] == "p2p"]) == sum(1 for s in plan.ranks for i in s if i.kind.startswith("SEND"))
    assert len([e for e in comm if e["cat"] == "kv_exchange"]) == sum(1 for s in plan.ranks for i in s if i.kind.startswith("KV"))
    # unit costs: a forward lasts 1 unit = 1000 us
    assert {e["dur"] for e in compute if e["cat"] == "forward"} == {1000.0}


def test_trace_cli(plan_file, tmp_path, capsys):
    _, path = plan_file
    out = tmp_path / "trace.json"
    assert main(["trace", path, "-o", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["events"] > 0
    assert "traceEvents" in json.loads(out.read_text())
    assert main(["trace", path, "-o", str(tmp_path / "no" / "t.json")]) == 2


def test_plot_without_matplotlib(plan_file, tmp_path, monkeypatch, capsys):
    _, path = plan_file
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["plot", path, "-o", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install slimpipe[plot]" in err
    assert main(["plot", path, "-o", str(tmp_path / "p.gif")]) == 2


def test_plot_png(plan_file, tmp_path):
    _, path = plan_file
    out = tmp_path / "p.png"
    assert main(["plot", path, "-o", str(out), "--unit-costs"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
