"""How a rank waits its gloo messages: --p2p-wait direct (the rank's own thread blocks in the
message) against watcher (a thread per peer blocks in it and then wakes the rank), on the cases of
bench/fidelity.py (tiny model, fp32, gloo, 2 cores; every family without KV exchanges) at p=2 and
p=4. Runs alternate the two modes (ABBA order across rounds); each run is bench/fidelity.py's
run_case (4 steps, the median of the last 3, the trace compared with the prediction of the same
profile).

    PYTHONPATH=$PWD python bench/p2p_wait.py [--rounds 3] [--pp 2,4]
Writes bench/results/p2p_wait.json and prints one line per family and p.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fidelity import CASES, RESULTS, alternated_runs, load, reported, write_record  # noqa: E402

MODES = ("watcher", "direct")
FAMILIES = [f for f in CASES if f != "slimpipe"]  # slimpipe's exchanges need the watcher (direct is refused)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pp", default="2,4")
    ap.add_argument("--profile", default=str(RESULTS / "cpu_profile.json"))
    ap.add_argument("--out", default=str(RESULTS / "p2p_wait.json"))
    return reported(measure, ap.parse_args())


def measure(a) -> int:
    runs = {}
    l0 = load()
    with tempfile.TemporaryDirectory() as d:
        for p in map(int, a.pp.split(",")):
            for name in FAMILIES:
                got = {m: [] for m in MODES}
                for m, row in alternated_runs(name, p, a.profile, d, "--p2p-wait", MODES, a.rounds):
                    got[m].append({k: row[k] for k in ("measured_step_s", "measured_bubble", "predicted_step_s",
                                                       "predicted_bubble", "step_error", "bubble_points",
                                                       "load_before", "load_after")})
                med = {m: {"step_s": statistics.median(x["measured_step_s"] for x in got[m]),
                           "bubble": statistics.median(x["measured_bubble"] for x in got[m]),
                           "bubble_points": statistics.median(x["bubble_points"] for x in got[m]),
                           "step_error": statistics.median(x["step_error"] for x in got[m])} for m in MODES}
                ratio = med["direct"]["step_s"] / med["watcher"]["step_s"]
                runs[f"{name}-p{p}"] = {"family": name, "p": p, "runs": got, "median": med,
                                        "direct_over_watcher_step": ratio}
                print(f"{name:<17} p={p}  step watcher {med['watcher']['step_s']:.3f} s direct "
                      f"{med['direct']['step_s']:.3f} s ({ratio - 1:+.1%}); bubble watcher {med['watcher']['bubble']:.1%} "
                      f"direct {med['direct']['bubble']:.1%} (predicted {got['direct'][0]['predicted_bubble']:.1%}); "
                      f"error vs prediction watcher {med['watcher']['step_error']:+.1%} direct "
                      f"{med['direct']['step_error']:+.1%}", file=sys.stderr, flush=True)
    write_record(a.out, "p2p_wait", __doc__, a.profile, l0, rounds=a.rounds, cases=runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
