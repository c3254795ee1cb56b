"""How far ahead a rank posts its gloo receives: executor --post-ahead 1 (the old rule) against all (the
default: every receive when its run of compute units starts), on
the cases of bench/fidelity.py (tiny model, fp32, gloo, 2 cores; every family) at p=2 and p=4.
A receive posted after its send makes the receiver's irecv call block while the busy sender's gloo
thread pushes the data (a timeslice, 2-5 ms); posted earlier, the data arrives while the receiver
computes. Runs alternate the settings (the order reversed every other round); each run is
bench/fidelity.py's run_case (4 steps, the median of the last 3, the trace compared with the
prediction of the same profile). Also records each run's peak RSS per rank and the time between a
rank's instructions (the posting stalls show there).

    PYTHONPATH=$PWD python bench/post_ahead.py [--rounds 3] [--pp 2,4] [--values 1,all]
Writes bench/results/post_ahead.json and prints one line per family and p.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fidelity import CASES, RESULTS, alternated_runs, load, reported, write_record  # noqa: E402


def gaps_ms(trace: str) -> list[float]:
    """Per rank: the mean over the measured steps (all but the first) of the time between one
    instruction's end and the next one's start (ms)."""
    ev = [e for e in json.loads(Path(trace).read_text())["traceEvents"] if e.get("ph") == "X"]
    steps = sorted({e["args"]["step"] for e in ev})[1:]
    out = []
    for r in sorted({e["pid"] for e in ev}):
        tot = 0.0
        for s in steps:
            xs = sorted((e for e in ev if e["pid"] == r and e["args"]["step"] == s), key=lambda e: e["ts"])
            tot += sum(max(0.0, b["ts"] - a["ts"] - a["dur"]) for a, b in zip(xs, xs[1:])) / 1e3
        out.append(round(tot / len(steps), 2))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pp", default="2,4")
    ap.add_argument("--values", default="1,all")
    ap.add_argument("--families", default=",".join(CASES))
    ap.add_argument("--profile", default=str(RESULTS / "cpu_profile.json"))
    ap.add_argument("--out", default=str(RESULTS / "post_ahead.json"))
    return reported(measure, ap.parse_args())


def measure(a) -> int:
    values = a.values.split(",")  # each an integer or all
    runs = {}
    l0 = load()
    with tempfile.TemporaryDirectory() as d:
        for p in map(int, a.pp.split(",")):
            for name in a.families.split(","):
                got = {v: [] for v in values}
                for v, row in alternated_runs(name, p, a.profile, d, "--post-ahead", values, a.rounds):
                    x = {k: row[k] for k in ("measured_step_s", "measured_bubble", "predicted_step_s",
                                             "predicted_bubble", "step_error", "bubble_points", "peak_rss_mib",
                                             "load_before", "load_after")}
                    x["gap_ms"] = gaps_ms(f"{d}/{name}-p{p}-measured.json")
                    got[v].append(x)
                med = {v: {"step_s": statistics.median(x["measured_step_s"] for x in got[v]),
                           "bubble": statistics.median(x["measured_bubble"] for x in got[v]),
                           "step_error": statistics.median(x["step_error"] for x in got[v]),
                           "bubble_points": statistics.median(x["bubble_points"] for x in got[v]),
                           "gap_ms": [statistics.median(g) for g in zip(*(x["gap_ms"] for x in got[v]))],
                           "peak_rss_mib": [max(g) for g in zip(*(x["peak_rss_mib"] for x in got[v]))]}
                       for v in values}
                base = med[values[0]]["step_s"]
                runs[f"{name}-p{p}"] = {"family": name, "p": p, "runs": got, "median": med}
                print(f"{name:<17} p={p}  " + "  ".join(
                    f"{v}: {med[v]['step_s'] * 1e3:.0f} ms ({med[v]['step_s'] / base - 1:+.1%}) err "
                    f"{med[v]['step_error']:+.1%} bubble {med[v]['bubble_points']:+.1f} pts gaps "
                    f"{max(med[v]['gap_ms']):.1f} ms rss {max(med[v]['peak_rss_mib']):.0f}" for v in values),
                    file=sys.stderr, flush=True)
    write_record(a.out, "post_ahead", __doc__, a.profile, l0, rounds=a.rounds, values=values, cases=runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
