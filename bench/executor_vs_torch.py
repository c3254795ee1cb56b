"""Executor vs torch.distributed.pipelining: same model, sequence, p and m on CPU/gloo.

For each comparison, runs ours and theirs alternately (ours, theirs, ours, theirs, ...), each a fresh
torchrun job, collects the JSON line each prints, and writes a summary with ratios (ours / theirs for
step time and peak RSS). Ours = `python -m compiler.cli compile ...` then `torchrun -m executor plan.json`;
theirs = bench/torch_baseline.py. When our executor is unavailable, "ours" is null with the reason.

    PYTHONPATH=$PWD python bench/executor_vs_torch.py --quick
    PYTHONPATH=$PWD python bench/executor_vs_torch.py --groups p2,rss8192 --ours-path /tmp/benchtry
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BASELINE = HERE / "torch_baseline.py"
sys.path.insert(0, str(ROOT))

from bench.machine import commit_of, machine  # noqa: E402

# our schedule name -> torch's class name (for the four schedules both have)
PAIRS = [("1f1b", "1F1B"), ("gpipe", "GPipe"), ("interleaved-1f1b", "Interleaved1F1B"), ("looped-bfs", "LoopedBFS")]
MULTI = {"interleaved-1f1b", "looped-bfs"}

MODEL_SMALL = dict(layers=8, hidden=256, heads=8, kv_heads=4, ffn=704, vocab=4096)
# seq 8192: small hidden (attention dominates time), wide ffn (activations dominate the RSS floor)
MODEL_LONG = dict(layers=8, hidden=128, heads=4, kv_heads=2, ffn=1024, vocab=2048)


def config(name, model, seq, pp, m, *, v=2, slices=4, pairs=True, extras=("seq1f1b", "slimpipe"),
           against="best", repeats=2, steps=3, warmup=1, reuse_theirs=False):
    """One benchmark setting. pairs: the four same-schedule pairs; extras: our sliced schedules,
    each compared with torch's `against` schedule ("best" = fastest torch schedule of the pairs)."""
    return dict(name=name, model=model, seq_len=seq, pp=pp, microbatches=m, virtual_stages=v,
                slices=slices, pairs=pairs, extras=list(extras), against=against,
                repeats=repeats, steps=steps, warmup=warmup, reuse_theirs=reuse_theirs)


GROUPS = {
    "quick": [config("quick-p2", dict(layers=4, hidden=128, heads=4, kv_heads=2, ffn=352, vocab=2048),
                     512, 2, 4, repeats=1, steps=2, extras=("slimpipe",))],
    "p2": [config("p2-s1024", MODEL_SMALL, 1024, 2, 4)],
    "p4": [config("p4-s1024", MODEL_SMALL, 1024, 4, 4, repeats=1)],
    # the RSS target: SlimPipe's peak RSS per rank <= 0.6x torch Schedule1F1B at seq 8192, p=4
    # one step each (memory is the point; a step here takes about a minute on 2 cores), and the torch
    # run is shared by both of our schedules
    "rss8192": [config("p4-s8192-rss", MODEL_LONG, 8192, 4, 4, slices=8, pairs=False,
                       extras=("slimpipe", "1f1b"), against="1F1B", repeats=1, steps=1, warmup=0,
                       reuse_theirs=True)],
}
DEFAULT_GROUPS = "p2,p4,rss8192"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_json(stdout: str) -> dict | None:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def _env(pythonpath: Path, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=str(pythonpath))
    env.pop("TORCHELASTIC_RUN_ID", None)
    return env


def _why(p: subprocess.CompletedProcess) -> str:
    """The informative part of a failed job's output (not torchrun's closing banner)."""
    lines = [ln.strip() for ln in (p.stderr + "\n" + p.stdout).splitlines() if ln.strip()]
    hits = [ln for ln in lines if ("Error" in ln or "error:" in ln) and "elastic" not in ln and "ChildFailed" not in ln]
    return " | ".join((hits or lines or ["<no output>"])[-4:])[-800:]


def _run(cmd: list[str], env: dict, timeout: int, cwd: Path = ROOT) -> tuple[dict | None, str | None, float]:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired:
        return None, f"timeout after {timeout}s: {' '.join(cmd)}", time.perf_counter() - t0
    wall = time.perf_counter() - t0
    rec = last_json(p.stdout)
    if rec is not None and p.returncode != 0:
        # the job measured and printed its summary, then a rank died on the way out: keep the figures,
        # flag the exit (seen with the executor: SIGABRT at teardown after the JSON line)
        rec["exit_code"], rec["exit_note"] = p.returncode, _why(p)
    if rec is None:
        return None, f"exit {p.returncode}: {' '.join(cmd[3:])}: {_why(p)}", wall
    return rec, None, wall


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port())]


def dims_args(model: dict) -> list[str]:
    return ["--layers", str(model["layers"]), "--hidden", str(model["hidden"]), "--heads", str(model["heads"]),
            "--kv-heads", str(model["kv_heads"]), "--ffn", str(model["ffn"]), "--vocab", str(model["vocab"])]


def run_theirs(cfg: dict, schedule: str, v: int, a) -> tuple[dict | None, str | None, float]:
    cmd = torchrun(cfg["pp"]) + [str(BASELINE), "--schedule", schedule, "--pp", str(cfg["pp"]),
                                 "--microbatches", str(cfg["microbatches"]), "--virtual-stages", str(v),
                                 "--seq-len", str(cfg["seq_len"]), "--steps", str(cfg["steps"]),
                                 "--warmup", str(cfg["warmup"]), "--json"] + dims_args(cfg["model"])
    return _run(cmd, _env(ROOT, a.threads), a.timeout)


def ours_unavailable(ours_path: Path) -> str | None:
    if not (ours_path / "executor" / "__main__.py").exists():
        return f"no runnable executor: {ours_path}/executor/__main__.py does not exist (`python -m executor` unavailable)"
    return None


def run_ours(cfg: dict, schedule: str, v: int, n: int, a) -> tuple[dict | None, str | None, float]:
    why = ours_unavailable(a.ours_path)
    if why:
        return None, why, 0.0
    env = _env(a.ours_path, a.threads)
    with tempfile.TemporaryDirectory(prefix="slimpipe-bench-") as tmp:
        plan = str(Path(tmp) / "plan.json")
        comp = [sys.executable, "-m", "compiler.cli", "compile", "--schedule", schedule, "--pp", str(cfg["pp"]),
                "--microbatches", str(cfg["microbatches"]), "--model", "tiny", "--seq-len", str(cfg["seq_len"]),
                "-o", plan] + dims_args(cfg["model"])
        if n > 1:
            comp += ["--slices", str(n)]
        if v > 1:
            comp += ["--virtual-stages", str(v)]
        # cwd = ours_path: `python -m` puts the cwd first on sys.path, so this tree's packages
        # would shadow the checkout's
        p = subprocess.run(comp, env=env, capture_output=True, text=True, timeout=a.timeout, cwd=a.ours_path)
        if p.returncode != 0:
            return None, f"compile failed (exit {p.returncode}): {_why(p)}", 0.0
        # same total number of steps as the torch side (its warm-up steps included)
        cmd = torchrun(cfg["pp"]) + ["-m", "executor", plan, "--steps", str(cfg["steps"] + cfg["warmup"]), "--json"]
        return _run(cmd, env, a.timeout, cwd=a.ours_path)


def summarise(samples: list[dict]) -> dict | None:
    """Median over runs of each run's median step time; per-rank max RSS over runs (and each run's
    peak RSS per rank, run_peak_rss_mib: a single run can peak far above its siblings)."""
    if not samples:
        return None
    step = statistics.median(s["step_s"] for s in samples)
    rss = [max(col) for col in zip(*(s["peak_rss_mib"] for s in samples))]
    out = {"step_s": step, "run_step_s": [s["step_s"] for s in samples],
           "run_peak_rss_mib": [s["peak_rss_mib"] for s in samples],
           "tokens_per_s": statistics.median(s["tokens_per_s"] for s in samples),
           "loss": samples[-1].get("loss"), "peak_rss_mib": rss, "max_peak_rss_mib": max(rss)}
    for key in ("peak_activation_bytes", "attention_backend", "init_rss_mib"):
        if key in samples[-1]:
            out[key] = samples[-1][key]
    return out


def ratios(ours: dict | None, theirs: dict | None) -> dict | None:
    if not ours or not theirs:
        return None
    return {"step_time": ours["step_s"] / theirs["step_s"],
            "tokens_per_s": ours["tokens_per_s"] / theirs["tokens_per_s"],
            "peak_rss_per_rank": [o / t for o, t in zip(ours["peak_rss_mib"], theirs["peak_rss_mib"])],
            "max_peak_rss": ours["max_peak_rss_mib"] / theirs["max_peak_rss_mib"]}


def compare(cfg, ours_sched, v_ours, n, theirs_sched, v_theirs, a, log, cache: dict) -> dict:
    """Alternate ours/theirs for cfg['repeats'] rounds. With cfg['reuse_theirs'], torch runs already
    made for this config and schedule are reused instead of run again."""
    key = (theirs_sched, v_theirs)
    reuse = cfg.get("reuse_theirs") and len(cache.get(key, [])) >= cfg["repeats"]
    got = {"ours": [], "theirs": list(cache[key]) if reuse else []}
    errors = {"ours": None, "theirs": None}
    for r in range(cfg["repeats"]):
        for side in ("ours", "theirs"):
            if side == "ours" and errors["ours"] and not got["ours"] and r > 0:
                continue  # it failed already; do not pay for it again
            if side == "theirs" and reuse:
                continue
            if side == "ours":
                rec, err, wall = run_ours(cfg, ours_sched, v_ours, n, a)
            else:
                rec, err, wall = run_theirs(cfg, theirs_sched, v_theirs, a)
            name = f"ours {ours_sched}" if side == "ours" else f"torch {theirs_sched}"
            if rec:
                got[side].append(rec)
                log(f"  [{cfg['name']}] {name} run {r}: step {rec['step_s']:.3f} s, "
                    f"RSS {rec['peak_rss_mib']} MiB ({wall:.0f} s wall)")
            else:
                errors[side] = err
                log(f"  [{cfg['name']}] {name} run {r}: skipped/failed: {err}")
    if not reuse:
        cache.setdefault(key, []).extend(got["theirs"])
    ours, theirs = summarise(got["ours"]), summarise(got["theirs"])
    return {"ours_schedule": ours_sched, "theirs_schedule": theirs_sched, "slices": n,
            "virtual_stages": v_ours, "theirs_reused": bool(reuse), "ours": ours, "ours_reason": None if ours else errors["ours"],
            "theirs": theirs, "theirs_reason": None if theirs else errors["theirs"],
            "ratio": ratios(ours, theirs)}


def run_config(cfg: dict, a, log) -> dict:
    log(f"== {cfg['name']}: p={cfg['pp']} m={cfg['microbatches']} S={cfg['seq_len']} model={cfg['model']}")
    out = {k: cfg[k] for k in ("name", "model", "seq_len", "pp", "microbatches", "repeats", "steps", "warmup")}
    out["pairs"], out["extras"] = [], []
    cache: dict = {}
    if cfg["pairs"]:
        for ours_s, theirs_s in PAIRS:
            if a.only and ours_s not in a.only:
                continue
            v = cfg["virtual_stages"] if ours_s in MULTI else 1
            out["pairs"].append(compare(cfg, ours_s, v, 1, theirs_s, v, a, log, cache))
    against = a.against or cfg["against"]
    if against == "best":
        done = [c for c in out["pairs"] if c["theirs"]]
        if not done:
            against = "1F1B"
        else:
            against = min(done, key=lambda c: c["theirs"]["step_s"])["theirs_schedule"]
    v_against = cfg["virtual_stages"] if against in ("Interleaved1F1B", "LoopedBFS") else 1
    out["torch_best" if cfg["against"] == "best" and not a.against else "torch_against"] = against
    extras = [x for x in cfg["extras"] if not a.only or x in a.only]
    if a.shared_rounds and extras:
        out["extras"] = compare_shared(cfg, extras, against, v_against, a, log)
        return out
    for ours_s in extras:
        out["extras"].append(compare(cfg, ours_s, 1, slices_of(cfg, ours_s), against, v_against, a, log, cache))
    return out


def slices_of(cfg: dict, schedule: str) -> int:
    """The sequence slices our `schedule` runs with in `cfg`: the config's for the sliced families, else 1."""
    return cfg["slices"] if schedule in ("seq1f1b", "slimpipe") else 1


def compare_shared(cfg, extras, theirs_sched, v_theirs, a, log) -> list[dict]:
    """--shared-rounds: per round one torch run of `theirs_sched`, then one run of each of our
    `extras` (their order rotated round by round, so none always runs right after torch), so every
    comparison of a round shares the torch run next to it in time. Each comparison's record is
    compare()'s, plus round_ratios (per round ours / theirs, None where either run failed: on this
    VM the machine's speed moves 10-30% over minutes, so a ratio taken inside a round is steadier
    than one of medians over the whole run) and their median. An extra that failed in every round
    so far is not run again."""
    got = {"theirs": [], **{x: [] for x in extras}}
    rounds = {x: [] for x in extras}
    errors = {k: None for k in got}
    for r in range(cfg["repeats"]):
        rec, err, wall = run_theirs(cfg, theirs_sched, v_theirs, a)
        if rec:
            got["theirs"].append(rec)
            log(f"  [{cfg['name']}] torch {theirs_sched} run {r}: step {rec['step_s']:.3f} s, RSS {rec['peak_rss_mib']} MiB ({wall:.0f} s wall)")
        else:
            errors["theirs"] = err
            log(f"  [{cfg['name']}] torch {theirs_sched} run {r}: failed: {err}")
        k = r % len(extras)
        for x in extras[k:] + extras[:k]:
            if errors[x] and not got[x]:
                rounds[x].append(None)
                continue  # it failed already; do not pay for it again
            mine, err, wall = run_ours(cfg, x, 1, slices_of(cfg, x), a)
            if mine:
                got[x].append(mine)
                log(f"  [{cfg['name']}] ours {x} run {r}: step {mine['step_s']:.3f} s, RSS {mine['peak_rss_mib']} MiB ({wall:.0f} s wall)")
            else:
                errors[x] = err
                log(f"  [{cfg['name']}] ours {x} run {r}: failed: {err}")
            rounds[x].append(round(mine["step_s"] / rec["step_s"], 4) if mine and rec else None)
    theirs = summarise(got["theirs"])
    out = []
    for x in extras:
        ours = summarise(got[x])
        done = [q for q in rounds[x] if q is not None]
        out.append({"ours_schedule": x, "theirs_schedule": theirs_sched,
                    "slices": slices_of(cfg, x), "virtual_stages": 1,
                    "theirs_reused": False, "theirs_shared": True, "ours": ours,
                    "ours_reason": None if ours else errors[x], "theirs": theirs,
                    "theirs_reason": None if theirs else errors["theirs"], "ratio": ratios(ours, theirs),
                    "round_ratios": rounds[x], "round_ratio_median": statistics.median(done) if done else None})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", default=DEFAULT_GROUPS, help=f"comma list of {', '.join(GROUPS)} (default {DEFAULT_GROUPS})")
    ap.add_argument("--quick", action="store_true", help="1-2 minute smoke run (same as --groups quick)")
    ap.add_argument("--ours-path", type=Path, default=ROOT,
                    help="checkout whose compiler/ and executor/ are used for our side (default: this tree)")
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per rank, both sides (default 1)")
    ap.add_argument("--repeats", type=int, help="override the alternation rounds of every config")
    ap.add_argument("--steps", type=int, help="override the timed steps of every config")
    ap.add_argument("--schedules", help="comma list of our schedules to run (default: every pair and extra of "
                    "each config); e.g. gpipe to repeat one comparison")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per launched job")
    ap.add_argument("--against", choices=[t for _, t in PAIRS],
                    help="torch schedule our sliced schedules (the extras) are compared with (default: each "
                         "config's; 'best' there is the fastest torch schedule of the pairs run, 1F1B when none ran)")
    ap.add_argument("--shared-rounds", action="store_true",
                    help="extras only: per round one torch run, then one run of each of our extras, ratios "
                         "taken within each round (round_ratios) as well as of the medians")
    ap.add_argument("-o", "--output", type=Path, help="results file (default bench/results/executor_vs_torch[_quick].json)")
    a = ap.parse_args(argv)
    a.ours_path = a.ours_path.resolve()
    names = ["quick"] if a.quick else [g for g in a.groups.split(",") if g]
    bad = [g for g in names if g not in GROUPS]
    if bad:
        ap.error(f"unknown group(s) {bad}; allowed: {', '.join(GROUPS)}")
    known = list(dict.fromkeys([o for o, _ in PAIRS] + [x for cs in GROUPS.values() for c in cs for x in c["extras"]]))
    a.only = [x for x in a.schedules.split(",") if x] if a.schedules else None
    if a.only is not None and (not a.only or any(x not in known for x in a.only)):
        ap.error(f"--schedules {a.schedules!r}: allowed a comma list of {', '.join(known)}")
    extras = {x for g in names for c in GROUPS[g] for x in c["extras"] if a.only is None or x in a.only}
    if a.shared_rounds and not extras:
        ap.error("--shared-rounds runs the groups' extras (our sliced schedules) and this selection has none; "
                 "add them to --schedules or drop --shared-rounds")
    out_path = a.output or HERE / "results" / ("executor_vs_torch_quick.json" if a.quick else "executor_vs_torch.json")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    load_start = os.getloadavg()
    results = []
    for g in names:
        for cfg in GROUPS[g]:
            cfg = dict(cfg)
            if a.repeats:
                cfg["repeats"] = a.repeats
            if a.steps:
                cfg["steps"] = a.steps
            results.append(run_config(cfg, a, log))
    doc = {
        "benchmark": "executor_vs_torch",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "threads_per_rank": a.threads,
        "bench_commit": commit_of(ROOT),
        "ours_path": str(a.ours_path), "ours_commit": commit_of(a.ours_path),
        "ours_available": ours_unavailable(a.ours_path) is None,
        "groups": names,
        "schedules": a.only,
        "against": a.against, "shared_rounds": a.shared_rounds,
        "method": ("each side is a fresh torchrun job per run; runs alternate ours/theirs; step_s = median over "
                   "runs of each run's median step time (torch side excludes its warm-up steps, ours runs the "
                   "same total number of steps); peak RSS = ru_maxrss per rank, max over runs; ratio = ours/theirs"
                   + ("; --shared-rounds: per round one torch run then one run of each extra (order rotated), "
                      "round_ratios = ours/theirs within each round" if a.shared_rounds else "")),
        "wall_s": round(time.perf_counter() - t0, 1),
        # the machine may be shared: other processes' load makes timings noisy (alternation spreads it)
        "loadavg_1_5_15": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
        "configs": results,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(doc, indent=1) + "\n")
    summary = {"results": str(out_path), "machine": doc["machine"], "wall_s": doc["wall_s"], "comparisons": []}
    for c in results:
        for comp in c["pairs"] + c["extras"]:
            summary["comparisons"].append({
                "config": c["name"], "ours": comp["ours_schedule"], "theirs": comp["theirs_schedule"],
                "ours_step_s": comp["ours"] and comp["ours"]["step_s"],
                "theirs_step_s": comp["theirs"] and comp["theirs"]["step_s"],
                "ours_peak_rss_mib": comp["ours"] and comp["ours"]["peak_rss_mib"],
                "theirs_peak_rss_mib": comp["theirs"] and comp["theirs"]["peak_rss_mib"],
                "ratio": comp["ratio"], "round_ratio_median": comp.get("round_ratio_median"),
                "ours_reason": comp["ours_reason"]})
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
