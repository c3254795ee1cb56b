"""`slimpipe profile` run twice: how far apart are the figures? For every measured point (matmul,
attention, layer, elementwise, unit, weight, head, embedding, p2p, p2p_cpu) the ratio second / first, the headline figures
and the measured timeslice.

    PYTHONPATH=$PWD python bench/profile_repeat.py            # profiles twice (a few minutes)
    PYTHONPATH=$PWD python bench/profile_repeat.py --files a.json b.json
Writes bench/results/profile_repeat.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAD = ("peak_flops", "attn_efficiency", "p2p_bandwidth", "p2p_latency")


def load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def profile(path: str) -> dict:
    t0, l0 = time.time(), load()
    r = subprocess.run([sys.executable, "-m", "compiler.cli", "profile", "--model", "tiny", "-o", path, "--json"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if r.returncode:
        sys.exit(r.stderr)
    return {"path": path, "wall_s": round(time.time() - t0, 1), "load_before": l0, "load_after": load()}


def ratios(a: dict, b: dict) -> dict:
    """Per curve: spread of b/a over its points (the time columns)."""
    out = {}
    ma, mb = a["measured"], b["measured"]
    for k in ("matmul", "attention", "layer", "elementwise", "unit", "weight", "head", "embedding", "p2p", "p2p_cpu"):
        if k not in ma or k not in mb:
            continue
        rs = []
        width = 4 if k == "attention" else 1
        first = {tuple(r[:width]): r for r in ma[k]}
        for rb in mb[k]:
            ra = first.get(tuple(rb[:width]))
            if ra is None:
                continue
            cols = [4] if k == "attention" else range(1, len(ra))
            rs += [rb[c] / ra[c] for c in cols if ra[c] > 0 and rb[c] > 0]
        dev = [abs(r - 1) for r in rs]
        out[k] = {"points": len(rs), "median_abs_dev": statistics.median(dev), "max_abs_dev": max(dev),
                  "within_10pct": sum(d <= 0.10 for d in dev) / len(dev)}
    out["headline"] = {k: b[k] / a[k] - 1 for k in HEAD}
    if ma.get("timeslice_s") and mb.get("timeslice_s"):
        out["headline"]["timeslice_s"] = mb["timeslice_s"] / ma["timeslice_s"] - 1
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", nargs=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "profile_repeat.json"))
    a = ap.parse_args()
    runs = []
    if a.files:
        files = a.files
    else:
        d = tempfile.mkdtemp()
        files = [f"{d}/p{i}.json" for i in (1, 2)]
        runs = [profile(f) for f in files]
    pa, pb = (json.loads(Path(f).read_text()) for f in files)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or None
    out = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": commit,
           "runs": runs, "seconds": [pa["measured"]["seconds"], pb["measured"]["seconds"]],
           "spread": ratios(pa, pb)}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
