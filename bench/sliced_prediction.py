"""What the cost model says of executor_vs_torch's p2 setting: our sliced schedules against the
schedules torch runs too, on a CPU profile measured with that setting's model.

bench/executor_vs_torch.py compares our seq1f1b and slimpipe (n=4) with torch's fastest schedule of
the four both runtimes have (Interleaved1F1B in every recording): that ratio mixes two things, the
runtime (ours against torch on the same schedule: the pairs) and the schedule (slices against whole
micro-batches). This script prices the second alone: it profiles this machine with the p2 model
(`slimpipe profile`, hidden 256, 8 heads / 4 KV heads, ffn 704, seq 1024; or --profile FILE), then
compiles every schedule of the p2 group as executor_vs_torch does (plus the sliced variants a user
could pick instead: slimpipe with the exchanges this profile keeps, Seq1F1B's equal-FLOPs
partition, n=2, interleaved Seq1F1B)
and prints `slimpipe simulate --dtype fp32 --json`'s step time, bubble and per-rank busy time,
and each schedule's predicted step over the fastest predicted of the four shared ones. A sliced
schedule predicted above 1.0 there is slower than that schedule on this machine whatever runtime
runs it; the measured ratio against torch is about that times the runtime's own ratio on the
shared schedule.

    PYTHONPATH=$PWD python bench/sliced_prediction.py [--profile cpu.json] [-o out.json]
Writes bench/results/sliced_prediction.json (and the profile beside it, unless --profile).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from bench.executor_vs_torch import GROUPS, MULTI, PAIRS, dims_args  # noqa: E402
from bench.machine import commit_of, machine  # noqa: E402

CFG = GROUPS["p2"][0]
SHARED = [ours for ours, _ in PAIRS]
# (label, schedule, extra flags): the p2 group's extras as executor_vs_torch compiles them first
# (no --device-profile at compile: slimpipe's exchanges are chosen on the built-in h100 profile,
# which keeps none for this model), then variants a user could pick
SLICED = [("seq1f1b", "seq1f1b", ["--slices", str(CFG["slices"])]),
          ("slimpipe", "slimpipe", ["--slices", str(CFG["slices"])]),
          ("slimpipe, exchanges chosen on this profile", "slimpipe", ["--slices", str(CFG["slices"]), "@profile"]),
          ("seq1f1b --partition flops", "seq1f1b", ["--slices", str(CFG["slices"]), "--partition", "flops"]),
          ("seq1f1b n=2", "seq1f1b", ["--slices", "2"]),
          ("seq1f1b v=2", "seq1f1b", ["--slices", str(CFG["slices"]), "--virtual-stages", "2"])]


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "compiler.cli", *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"slimpipe {args[0]} failed (exit {p.returncode}): {p.stderr.strip()[-500:]}")
    return p


def predict(schedule: str, flags: list[str], profile: str, tmp: Path) -> dict:
    """Compile as executor_vs_torch does (a flag "@profile": with --device-profile, so the compile
    decides on this profile), then simulate on the profile."""
    plan = tmp / "plan.json"
    flags = [f for x in flags for f in (["--device-profile", profile] if x == "@profile" else [x])]
    c = json.loads(cli("compile", "--schedule", schedule, "--pp", str(CFG["pp"]), "--microbatches",
                       str(CFG["microbatches"]), "--model", "tiny", "--seq-len", str(CFG["seq_len"]),
                       *dims_args(CFG["model"]), *flags, "-o", str(plan), "--json").stdout)
    d = json.loads(cli("simulate", str(plan), "--device-profile", profile, "--dtype", "fp32", "--json").stdout)
    return {"step_s": d["step_s"], "bubble": d["bubble_fraction"], "bubble_breakdown": d["bubble_breakdown"],
            "busy_s": [r["busy_s"] for r in d["ranks"]], "exchanges": c.get("exchanges", 0)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", help="a device profile to use (default: measure one with the p2 model)")
    ap.add_argument("-o", "--output", type=Path, default=HERE / "results" / "sliced_prediction.json")
    a = ap.parse_args(argv)
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"slimpipe-sliced-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    profile = a.profile
    if profile is None:
        profile = str(a.output.with_name(a.output.stem + "_profile.json"))
        print(f"profiling this machine with the p2 model -> {profile}", file=sys.stderr, flush=True)
        cli("profile", "--model", "tiny", "--seq-len", str(CFG["seq_len"]), *dims_args(CFG["model"]),
            "--quiet", "-o", profile)
    rows = {}
    for ours in SHARED:
        v = CFG["virtual_stages"] if ours in MULTI else 1
        rows[ours] = predict(ours, ["--virtual-stages", str(v)] if v > 1 else [], profile, tmp)
    best = min(SHARED, key=lambda s: rows[s]["step_s"])
    for label, sched, flags in SLICED:
        rows[label] = predict(sched, flags, profile, tmp)
    for r in rows.values():
        r["over_best_shared"] = round(r["step_s"] / rows[best]["step_s"], 4)
    doc = {"benchmark": "sliced_prediction", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine(), "commit": commit_of(ROOT),
           "setting": {k: CFG[k] for k in ("model", "seq_len", "pp", "microbatches", "virtual_stages", "slices")},
           "profile": os.path.relpath(profile, ROOT) if profile.startswith(str(ROOT)) else profile,
           "best_shared": best, "rows": rows}
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(doc, indent=1) + "\n")
    for name, r in rows.items():
        print(f"{name:44s} step {r['step_s']:.3f} s  bubble {100 * r['bubble']:5.1f}%  busy "
              f"{'/'.join(f'{b:.3f}' for b in r['busy_s'])} s  x{r['over_best_shared']:.3f} of {best}"
              + (f"  ({r['exchanges']} KV exchanges)" if r["exchanges"] else ""))
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
