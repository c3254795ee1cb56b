"""Traces Perfetto can draw and pictures a person can read (issue 17): every trace a test writes is
parsed and checked for partly overlapping events on a track; every picture is rendered, its size
checked, and its title and legend must lie inside it. trace and plot price a plan on the device it
was compiled for."""
import json
import struct

import pytest

from compiler.cli import main


def png_size(path) -> tuple[int, int]:
    data = open(path, "rb").read(24)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def assert_no_partial_overlap(trace: dict) -> None:
    tracks: dict[tuple, list] = {}
    for e in trace["traceEvents"]:
        if e["ph"] == "X":
            tracks.setdefault((e["pid"], e["tid"]), []).append(
                (round(e["ts"] * 1000), round(e["ts"] * 1000) + round(e["dur"] * 1000), e["name"]))  # ns, as Perfetto
    assert tracks
    for key, evs in tracks.items():
        evs.sort()
        for (a0, a1, na), (b0, b1, nb) in zip(evs, evs[1:]):
            assert b0 >= a1 or b1 <= a1, f"track {key}: {na} {a0}-{a1} and {nb} {b0}-{b1} partly overlap"


def compile_(tmp_path, capsys, name, *args):
    path = str(tmp_path / f"{name}.json")
    assert main(["compile", *args, "-o", path]) == 0
    capsys.readouterr()
    return path


PLANS = {
    "1f1b": ["--schedule", "1f1b", "--pp", "2", "--microbatches", "4"],
    # --exchange: on this tiny model the default (the cost model's choice) keeps no exchange to draw
    "slimpipe": ["--schedule", "slimpipe", "--pp", "4", "--microbatches", "12", "--slices", "4", "--exchange"],
    "interleaved": ["--schedule", "interleaved-1f1b", "--pp", "4", "--microbatches", "8", "--virtual-stages", "2"],
}


@pytest.mark.parametrize("name", PLANS)
@pytest.mark.parametrize("unit_costs", [False, True])
def test_traces_have_no_partial_overlap(name, unit_costs, tmp_path, capsys):
    plan = compile_(tmp_path, capsys, name, *PLANS[name])
    out = tmp_path / "trace.json"
    assert main(["trace", plan, "-o", str(out)] + (["--unit-costs"] if unit_costs else [])) == 0
    tr = json.loads(out.read_text())
    assert_no_partial_overlap(tr)
    assert tr["otherData"]["time_unit"] == "us" and tr["otherData"]["unit_costs"] is unit_costs
    # every track that holds events is named
    named = {(e["pid"], e["tid"]) for e in tr["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {(e["pid"], e["tid"]) for e in tr["traceEvents"] if e["ph"] == "X"} <= named


def test_concurrent_messages_get_their_own_tracks(tmp_path, capsys):
    # small timed plans put two sends of one rank in flight at once (issue 17: rank 1's SEND_ACT
    # mb0 and mb1): they must land on two communication tracks
    plan = compile_(tmp_path, capsys, "s", *PLANS["slimpipe"])
    out = tmp_path / "trace.json"
    assert main(["trace", plan, "-o", str(out)]) == 0
    tr = json.loads(out.read_text())
    comm_tids = {e["tid"] for e in tr["traceEvents"] if e["ph"] == "X" and e["tid"] > 0}
    assert len(comm_tids) >= 2


def test_trace_and_plot_use_the_plans_device_profile(tmp_path, capsys):
    plan = compile_(tmp_path, capsys, "a100", "--schedule", "1f1b", "--pp", "2", "--microbatches", "2", "--model",
                    "llama-7b", "--seq-len", "8192", "--device-profile", "a100")
    assert main(["simulate", plan, "--json"]) == 0
    step = json.loads(capsys.readouterr().out)["step_s"]
    ends = {}
    for prof in (None, "h100"):
        out = tmp_path / f"t{prof}.json"
        assert main(["trace", plan, "-o", str(out)] + (["--device-profile", prof] if prof else [])) == 0
        tr = json.loads(out.read_text())
        ends[prof] = max(e["ts"] + e["dur"] for e in tr["traceEvents"] if e["ph"] == "X") / 1e6
    assert ends[None] == pytest.approx(step, rel=1e-6)      # a100, as compiled
    assert ends["h100"] < 0.5 * ends[None]                   # told otherwise: h100
    # a profile from a JSON file travels in the plan too
    mine = tmp_path / "mine.json"
    from passes.costs import load_profile
    mine.write_text(json.dumps({**load_profile("h100").to_json(), "name": "slow", "peak_flops": 1e13}))
    plan2 = compile_(tmp_path, capsys, "mine", "--schedule", "1f1b", "--pp", "2", "--microbatches", "2",
                     "--device-profile", str(mine))
    assert main(["simulate", plan2, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["device_profile"] == "slow"


def _fits(fig) -> None:
    """Title (suptitle) and every legend lie inside the figure; the legend does not cover the axes."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    box = fig.bbox
    parts = [fig._suptitle] + list(fig.legends)
    assert fig._suptitle is not None and fig.legends
    for a in parts:
        bb = a.get_window_extent(r)
        assert bb.x0 >= box.x0 - 1 and bb.x1 <= box.x1 + 1 and bb.y0 >= box.y0 - 1 and bb.y1 <= box.y1 + 1, a
    axbb = fig.axes[0].get_window_extent(r)
    for leg in fig.legends:
        assert not leg.get_window_extent(r).overlaps(axbb)


@pytest.mark.parametrize("name", PLANS)
def test_timeline_pictures_are_readable(name, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    import ir
    from passes.costs import load_profile
    from passes.trace import timeline_figure

    plan = compile_(tmp_path, capsys, name, *PLANS[name])
    png = tmp_path / f"{name}.png"
    assert main(["plot", plan, "-o", str(png)]) == 0
    w, h = png_size(png)
    assert 600 <= w <= 1700 and 250 <= h <= 1200 and w / h <= 5.5, (w, h)
    p = ir.load(plan)
    fig = timeline_figure(p, load_profile("h100"))
    _fits(fig)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    m = p.spec.microbatches
    assert [f"mb {i}" for i in range(m)] == labels[:m]  # every micro-batch, 12 too
    assert ("KV exchange" in labels) == (p.meta.get("exchanges", 0) > 0) == (name == "slimpipe")
    plt.close(fig)
    # stays readable with many ranks and many micro-batches (colours repeat: the title says so)
    big = compile_(tmp_path, capsys, "big", "--schedule", "interleaved-1f1b", "--pp", "8", "--microbatches", "24",
                   "--virtual-stages", "2", "--model", "llama-7b")
    png = tmp_path / "big.png"
    assert main(["plot", big, "-o", str(png)]) == 0
    w, h = png_size(png)
    assert w <= 1700 and w / h <= 5.5, (w, h)
    fig = timeline_figure(ir.load(big), load_profile("h100"))
    _fits(fig)
    assert "colours repeat every 20" in fig._suptitle.get_text()
    plt.close(fig)


def test_tune_front_is_readable(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from compiler.cli.cmd_tune import front_figure
    from compiler.search import Problem, search
    from compiler.models import resolve_model
    from passes.costs import GIB, load_profile

    png = tmp_path / "front.png"
    assert main(["tune", "--model", "tiny", "--gpus", "4", "--memory-budget", "1GiB", "--plot", str(png)]) == 0
    w, h = png_size(png)
    assert 600 <= w <= 1200 and 350 <= h <= 800, (w, h)
    res = search(Problem(resolve_model("tiny"), 128, 4, GIB, 4, load_profile("h100")))
    fig = front_figure(res)
    _fits(fig)
    plt.close(fig)
