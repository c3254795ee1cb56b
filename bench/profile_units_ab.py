"""The profile's own unit timings in two checkouts, alternated: did a change to the executor move
what `slimpipe profile` measures for a unit?

`slimpipe profile` prices a layer from whole units run through the executor's Stage
(executor.profile._stage_runner: a middle stage of 1 and of 3 layers, caches evicted before the
forward and the backward). This script runs that runner in a fresh process per checkout, the two
checkouts alternated round by round (this VM's speed moves 10-30% over minutes, so two profiles
taken at different times cannot tell a change from a spell), and records per token count the
median forward and backward seconds of the 1- and 3-layer units, cold (as the profile) and warm
(no eviction), and the layer the profile derives from them ((T3 - T1) / 2), for each checkout and
as new / base ratios.

    PYTHONPATH=$PWD python bench/profile_units_ab.py --base ../old-checkout [--rounds 3] [--runs 15]
Writes bench/results/profile_units_ab.json (or -o).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from bench.machine import commit_of, machine  # noqa: E402

# run inside each checkout (its executor.profile): prints one JSON line
CHILD = r"""
import json, statistics, sys, torch
torch.set_num_threads(1)
from executor import profile as P
from executor.attention import pick_backend
from compiler.models import PRESETS
from ir import ModelConfig
tokens, runs = [int(x) for x in sys.argv[1].split(",")], int(sys.argv[2])
cfg = ModelConfig(**PRESETS["tiny"])
dev, dt = torch.device("cpu"), torch.float32
be = pick_backend("auto", dev, dt)
g = torch.Generator().manual_seed(0)
rnd = lambda *s: torch.randn(s, generator=g) * 0.02
ev, ev2 = P.evict_caches(dev), P.evict_caches(dev, level=2)
out = {}
for s in tokens:
    for L in (1, 3):
        r = P._stage_runner(cfg, dev, dt, be, s, L, lambda: None, rnd, ev, False, ev2, {})
        r(cold=False)
        cold = [r() for _ in range(runs)]
        warm = [r(cold=False) for _ in range(runs)]
        out[f"{s}:{L}"] = {k: [statistics.median(c[i] for c in v) for i in (0, 1)] for k, v in (("cold", cold), ("warm", warm))}
print(json.dumps(out))
"""


def run_child(tree: Path, tokens: str, runs: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", CHILD, tokens, str(runs)], capture_output=True, text=True,
                       env=env, cwd=tree, timeout=1800)
    if p.returncode != 0:
        raise SystemExit(f"{tree}: the unit runner failed (exit {p.returncode}): {p.stderr.strip()[-600:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True, help="the checkout to compare this tree with")
    ap.add_argument("--tokens", default="1024,2048,4096", help="unit token counts (default 1024,2048,4096)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=15, help="timed runs per unit, mode and round (default 15)")
    ap.add_argument("-o", "--output", type=Path, default=HERE / "results" / "profile_units_ab.json")
    a = ap.parse_args(argv)
    trees = {"new": ROOT, "base": a.base.resolve()}
    got = {k: [] for k in trees}
    for r in range(a.rounds):
        for k, tree in trees.items():
            got[k].append(run_child(tree, a.tokens, a.runs))
            print(f"round {r + 1}/{a.rounds}: {k} done", file=sys.stderr, flush=True)
    summary = {}
    for key in got["new"][0]:
        s, L = key.split(":")
        row = summary.setdefault(s, {})
        for side in trees:
            for mode in ("cold", "warm"):
                for i, ph in enumerate(("fwd", "bwd")):
                    row.setdefault(side, {})[f"{mode}_{ph}_L{L}"] = statistics.median(x[key][mode][i] for x in got[side])
    for s, row in summary.items():
        for side in trees:
            d = row[side]
            for mode in ("cold", "warm"):
                for ph in ("fwd", "bwd"):
                    d[f"{mode}_{ph}_layer"] = (d[f"{mode}_{ph}_L3"] - d[f"{mode}_{ph}_L1"]) / 2
        row["new_over_base"] = {k: round(row["new"][k] / row["base"][k], 4) for k in row["new"] if row["base"][k] > 0}
    doc = {"benchmark": "profile_units_ab", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine(), "new": commit_of(ROOT), "base": commit_of(trees["base"]), "model": "tiny",
           "rounds": a.rounds, "runs": a.runs, "by_tokens": summary, "raw": got}
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(doc, indent=1) + "\n")
    for s, row in summary.items():
        r = row["new_over_base"]
        print(f"{s} tokens, new / base: layer cold fwd {r['cold_fwd_layer']:.3f} bwd {r['cold_bwd_layer']:.3f}, "
              f"warm fwd {r['warm_fwd_layer']:.3f} bwd {r['warm_bwd_layer']:.3f}; "
              f"1-layer unit cold fwd {r['cold_fwd_L1']:.3f} bwd {r['cold_bwd_L1']:.3f}")
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
