"""`slimpipe profile` run twice: how far apart are the figures? For every measured point (matmul,
attention, layer, elementwise, unit, weight, head, embedding, p2p, p2p_cpu) the ratio second / first, the headline figures
and the measured timeslice; with more than two, each consecutive pair; and each profile's round speeds (how far
its rounds ran from its median: a machine that moved while it was measured).

    PYTHONPATH=$PWD python bench/profile_repeat.py            # profiles twice (two minutes)
    PYTHONPATH=$PWD python bench/profile_repeat.py --count 4  # four back to back: each pair in turn
    PYTHONPATH=$PWD python bench/profile_repeat.py --files a.json b.json [c.json ...]
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
sys.path.insert(0, str(ROOT))

from bench.machine import commit_of  # noqa: E402

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
    ap.add_argument("--files", nargs="+", help="compare these profiles instead of measuring (two or more)")
    ap.add_argument("--count", type=int, default=2, help="profiles to measure back to back (default 2)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "profile_repeat.json"))
    a = ap.parse_args()
    if a.count < 2 or (a.files is not None and len(a.files) < 2):
        ap.error("two profiles or more: --count N >= 2, or --files A B [...]")
    runs = []
    if a.files:
        files = a.files
    else:
        d = tempfile.mkdtemp()
        files = [f"{d}/p{i}.json" for i in range(1, a.count + 1)]
        runs = [profile(f) for f in files]
    profs = [json.loads(Path(f).read_text()) for f in files]
    commit = commit_of()
    pairs = [{"between": [i + 1, i + 2], "spread": ratios(profs[i], profs[i + 1])} for i in range(len(profs) - 1)]
    out = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": commit, "runs": runs,
           "seconds": [p["measured"]["seconds"] for p in profs],
           "rounds": [p["measured"].get("rounds", 1) for p in profs],
           # per profile and round: that round's seconds over the profile's median (executor.profile.round_speed)
           "round_speed": [p["measured"].get("round_speed") for p in profs],
           "spread": pairs[0]["spread"], "pairs": pairs}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"profiles: {len(profs)}, seconds {out['seconds']}")
    for pr in pairs:
        sp = pr["spread"]
        print(f"{pr['between'][0]} -> {pr['between'][1]}: " + ", ".join(
            f"{k} {v['median_abs_dev']:.1%}" for k, v in sp.items() if k != "headline")
            + "; headline " + ", ".join(f"{k} {v:+.1%}" for k, v in sp["headline"].items()))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
