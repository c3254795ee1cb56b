"""Our executor against itself: two checkouts (A, the base; B, the change) on the same plans, fresh
torchrun jobs alternated A, B, A, B, ... per schedule. On this VM one side's runs spread by 10-25%
from job to job, so a change to the executor is judged by runs paired in time, not by two
recordings against torch made hours apart. Uses bench/executor_vs_torch.py's setting (group p2's
model, seq 1024, p=2, m=4, v=2 for interleaved-1f1b / looped-bfs, n=4 for seq1f1b / slimpipe) and
its launcher (each side compiles the plan with its own compiler).

    PYTHONPATH=$PWD python bench/executor_ab.py --base /path/to/main-checkout [--repeats 4]
        [--schedules interleaved-1f1b,seq1f1b] [-o bench/results/executor_ab.json]
Writes per schedule each side's run step times (s) and peak RSS per rank (MiB), the medians, and
ratio = B / A (step time: median of B's runs over median of A's; wins: rounds where B was faster).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from bench import executor_vs_torch as EV  # noqa: E402
from bench.machine import commit_of, machine  # noqa: E402

SLICED = {"seq1f1b", "slimpipe"}
ALL = ["1f1b", "gpipe", "interleaved-1f1b", "looped-bfs", "seq1f1b", "slimpipe"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True, help="checkout A (the base), e.g. a worktree of main")
    ap.add_argument("--change", type=Path, default=ROOT, help="checkout B (default: this tree)")
    ap.add_argument("--schedules", default="interleaved-1f1b,seq1f1b",
                    help=f"comma list of {', '.join(ALL)} (default interleaved-1f1b,seq1f1b)")
    ap.add_argument("--repeats", type=int, default=4, help="rounds of A then B per schedule (default 4)")
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per rank (default 1)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per launched job")
    ap.add_argument("-o", "--output", type=Path, default=HERE / "results" / "executor_ab.json")
    a = ap.parse_args(argv)
    scheds = [s for s in a.schedules.split(",") if s]
    bad = [s for s in scheds if s not in ALL]
    if not scheds or bad:
        ap.error(f"--schedules {a.schedules!r}: allowed a comma list of {', '.join(ALL)}")
    sides = {"A": a.base.resolve(), "B": a.change.resolve()}
    for name, path in sides.items():
        why = EV.ours_unavailable(path)
        if why:
            ap.error(f"checkout {name}: {why}")
    cfg = dict(EV.GROUPS["p2"][0], steps=3, warmup=1)
    t0 = time.perf_counter()
    load_start = os.getloadavg()
    rows = []
    for sched in scheds:
        v = cfg["virtual_stages"] if sched in EV.MULTI else 1
        n = cfg["slices"] if sched in SLICED else 1
        got = {"A": [], "B": []}
        for r in range(a.repeats):
            for side, path in sides.items():
                ns = SimpleNamespace(ours_path=path, threads=a.threads, timeout=a.timeout)
                rec, err, wall = EV.run_ours(cfg, sched, v, n, ns)
                if rec is None:
                    print(f"{sched} {side} run {r}: failed: {err}", file=sys.stderr)
                    return 1
                got[side].append(rec)
                print(f"{sched} {side} run {r}: step {rec['step_s']:.3f} s, RSS {rec['peak_rss_mib']} MiB "
                      f"({wall:.0f} s wall)", file=sys.stderr, flush=True)
        side = {s: EV.summarise(got[s]) for s in got}  # median step, per-rank max RSS, each run's figures
        med = {s: side[s]["step_s"] for s in side}
        rows.append({
            "schedule": sched, "virtual_stages": v, "slices": n,
            "A": {k: side["A"][k] for k in ("run_step_s", "run_peak_rss_mib", "step_s", "peak_rss_mib", "loss")},
            "B": {k: side["B"][k] for k in ("run_step_s", "run_peak_rss_mib", "step_s", "peak_rss_mib", "loss")},
            "ratio_step_time": med["B"] / med["A"],
            "ratio_peak_rss_per_rank": [b / x for b, x in zip(side["B"]["peak_rss_mib"], side["A"]["peak_rss_mib"])],
            "rounds_b_faster": sum(b["step_s"] < x["step_s"] for x, b in zip(got["A"], got["B"])),
        })
        r = rows[-1]
        print(f"{sched}: A {med['A']:.3f} s, B {med['B']:.3f} s, B/A {r['ratio_step_time']:.3f} "
              f"(B faster in {r['rounds_b_faster']} of {a.repeats} rounds), RSS B/A "
              f"{', '.join(f'{x:.3f}' for x in r['ratio_peak_rss_per_rank'])}")
    doc = {"benchmark": "executor_ab", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine(), "threads_per_rank": a.threads,
           "A": {"path": str(sides["A"]), "commit": commit_of(sides["A"])},
           "B": {"path": str(sides["B"]), "commit": commit_of(sides["B"])},
           "setting": {k: cfg[k] for k in ("model", "seq_len", "pp", "microbatches", "steps", "warmup")},
           "method": "fresh torchrun jobs alternated A, B per round; step_s = median over runs of each run's median "
                     "step time; peak RSS = ru_maxrss per rank, max over runs; ratio = B / A",
           "wall_s": round(time.perf_counter() - t0, 1),
           "loadavg_1_5_15": {"start": list(load_start), "end": list(os.getloadavg())},
           "rows": rows}
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
