"""Scale: issue 16's plan, slimpipe p=32 m=32 n=64 v=4 with the KV exchange (tiny model with 128
layers, 256 tokens: 1.6M instructions), through the command line as a user runs it:

    slimpipe compile --schedule slimpipe --pp 32 --microbatches 32 --slices 64 --virtual-stages 4
                     --model tiny --layers 128 --seq-len 256 --exchange -o plan.json
    slimpipe check plan.json
    slimpipe simulate plan.json --unit-costs

Each command is a fresh process (`python -m compiler.cli`, what the `slimpipe` script runs), with
slimpipe's bytecode cached as an installed package has it (this machine's sessions set
PYTHONDONTWRITEBYTECODE, which would recompile every module of ours in every process: the runs here
drop it and cache in a temporary PYTHONPYCACHEPREFIX, filled by one `--version` run first); the
three are run --repeats times, each repeat with an empty store of remembered proofs (ir.proofs:
`check` notes its proof with the plan's unit-cost figures, and `simulate --unit-costs` then prints
those without reading the instructions; a fourth run, simulate with SLIMPIPE_NO_CACHE=1, times it
proving the plan again: the rules, with the replay and figures made beside them in a forked
child), and each one's fastest wall time, its CPU time (user + sys, the forked child's included)
and its peak resident memory (per process and its children, from os.wait4) are recorded with the
load average, since this machine is shared. Then the same phases in-process (compile, check in
one process and with its forked child, unit simulation, ir.save, ir.load). Prints JSON, writes
bench/results/scale_1m.json (or -o).

    PYTHONPATH=. python bench/scale_1m.py [--repeats 3] [--against ../old-checkout] [-o out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import ir  # noqa: E402
from bench.machine import commit_of, machine  # noqa: E402
from compiler import build_spec, compile_plan, resolve_model  # noqa: E402
from passes import check, simulate_units  # noqa: E402

OUT = os.path.join(ROOT, "bench", "results", "scale_1m.json")
P, M, N, V = 32, 32, 64, 4
SEQ = N * 4


def cli_commands(plan: str) -> list[tuple[str, list[str]]]:
    shape = ["--schedule", "slimpipe", "--pp", str(P), "--microbatches", str(M), "--slices", str(N),
             "--virtual-stages", str(V), "--model", "tiny", "--layers", str(P * V), "--seq-len", str(SEQ)]
    # --exchange: the pairing kept whatever the cost model says (since bfc7970 the default keeps only
    # exchanges that make the plan faster on its profile, and on h100 none of a toy model's does)
    return [("compile", ["compile", *shape, "--exchange", "-o", plan]), ("check", ["check", plan]),
            ("simulate_unit", ["simulate", plan, "--unit-costs", "--json"])]


# not part of the three: simulate proving the plan again, as without `check` before it (or with
# SLIMPIPE_NO_CACHE=1); since ir.proofs, simulate after check skips that second proof
COLD = ("simulate_unit_proving_again", "simulate_unit")


def communicate_no_reap(proc: subprocess.Popen) -> tuple[bytes, bytes]:
    """Read both pipes to the end without waiting for the process (os.wait4 reaps it)."""
    import threading

    chunks = {"out": b"", "err": b""}

    def pump(name, stream):
        chunks[name] = stream.read()

    ts = [threading.Thread(target=pump, args=("out", proc.stdout)), threading.Thread(target=pump, args=("err", proc.stderr))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return chunks["out"], chunks["err"]


PYCACHE = tempfile.mkdtemp(prefix="slimpipe-pycache-")


def run_cli(args: list[str], cache: str | None = None, root: str = ROOT) -> dict:
    """One `slimpipe ARGS` process of the checkout `root`: wall seconds, CPU seconds, peak RSS
    bytes, its stdout. `cache`: the folder of remembered proofs (ir.proofs), None = off
    (SLIMPIPE_NO_CACHE=1)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "SLIMPIPE_CACHE_DIR", "SLIMPIPE_NO_CACHE")}
    env.update(PYTHONPATH=root, PYTHONPYCACHEPREFIX=os.path.join(PYCACHE, str(abs(hash(root)))))
    env.update({"SLIMPIPE_CACHE_DIR": cache} if cache else {"SLIMPIPE_NO_CACHE": "1"})
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "compiler.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=root)
    out, err = communicate_no_reap(proc)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"slimpipe {' '.join(args)} exited {proc.returncode}: {err.decode()[-500:]}")
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "max_rss_bytes": ru.ru_maxrss * 1024,
            "stdout": out.decode()}


def cli_path(repeats: int, against: str | None = None) -> dict:
    """The three commands --repeats times (and, with `against`, the same commands of that
    checkout in every repeat too, the two in alternating order): this checkout's record, with
    the other's under "against"."""
    roots = [ROOT] + ([os.path.abspath(against)] if against else [])
    for root in roots:
        run_cli(["--version"], root=root)  # fills the bytecode cache
    runs: dict[str, list] = {root: [] for root in roots}
    with tempfile.TemporaryDirectory() as d:
        plan = os.path.join(d, "plan.json")
        for k in range(repeats):
            for root in (roots if k % 2 == 0 else roots[::-1]):
                rep = {"load_avg_before": os.getloadavg()}
                with tempfile.TemporaryDirectory() as cache:  # each repeat starts with no proof remembered
                    for name, args in cli_commands(plan):
                        rep[name] = run_cli(args, cache, root)
                rep[COLD[0]] = run_cli(dict(cli_commands(plan))[COLD[1]], None, root)
                rep["load_avg_after"] = os.getloadavg()
                runs[root].append(rep)
        size = os.path.getsize(plan)
        doc = json.loads(open(plan).read())
        # a rank is a list of texts, or (schema_version 2) a compact object with one kind character per instruction
        instructions = sum(len(r["kinds"]) if isinstance(r, dict) else len(r) for r in doc["ranks"])
        schema_version = doc["schema_version"]
        exchanges = (doc.get("meta") or {}).get("exchanges", 0)
    out = summary(runs[ROOT], repeats)
    out.update({"commands": [" ".join(["slimpipe", *a]).replace(plan, "plan.json") for _, a in cli_commands(plan)],
                "instructions": instructions, "plan_bytes": size, "plan_schema_version": schema_version,
                "exchanges_in_plan": exchanges})  # the CLI's own plan (the last one written)
    out["commit"] = commit_of(ROOT)
    if against:
        out["against"] = {"checkout": roots[1], "commit": commit_of(roots[1]), **summary(runs[roots[1]], repeats),
                          "order": "alternating: this checkout first in even repeats, the other first in odd ones"}
    return out


def summary(runs: list[dict], repeats: int) -> dict:
    """One checkout's repeats: each command's best wall and CPU time, the totals, every run."""
    names = [n for n, _ in cli_commands("x")]
    sim = json.loads(runs[-1]["simulate_unit"]["stdout"])
    assert json.loads(runs[-1][COLD[0]]["stdout"]) == sim
    best = {n: {"wall_s": round(min(r[n]["wall_s"] for r in runs), 3),
                "cpu_s": round(min(r[n]["cpu_s"] for r in runs), 3),
                "max_rss_bytes": max(r[n]["max_rss_bytes"] for r in runs)} for n in [*names, COLD[0]]}
    totals = [sum(r[n]["wall_s"] for n in names) for r in runs]
    return {
        "repeats": repeats, "bytecode": "cached (PYTHONPYCACHEPREFIX, filled by one run first), as for an installed package",
        "best": best,
        "total_wall_s_min_run": round(min(totals), 3),
        "total_wall_s_median_run": round(sorted(totals)[(len(totals) - 1) // 2], 3),
        "total_wall_s_sum_of_min": round(sum(best[n]["wall_s"] for n in names), 3),
        "total_cpu_s_sum_of_min": round(sum(best[n]["cpu_s"] for n in names), 3),
        # the three with simulate proving the plan again (no proof remembered)
        "total_wall_s_proving_again_sum_of_min": round(sum(best[n]["wall_s"] for n in names if n != COLD[1])
                                                       + best[COLD[0]]["wall_s"], 3),
        "max_rss_bytes": max(b["max_rss_bytes"] for b in best.values()),
        "runs": [{n: {k: round(v, 3) for k, v in r[n].items() if k != "stdout"} for n in [*names, COLD[0]]}
                 | {"total_wall_s": round(sum(r[n]["wall_s"] for n in names), 3),
                    "load_avg_before": r["load_avg_before"], "load_avg_after": r["load_avg_after"]} for r in runs],
        "bubble_fraction": sim["bubble_fraction"],
    }


def in_process() -> dict:
    model = resolve_model("tiny", {"layers": P * V})
    phases = {}
    t = time.perf_counter()
    spec = build_spec("slimpipe", model, pp=P, microbatches=M, slices=N, virtual_stages=V, seq_len=SEQ, exchange=True)
    plan = compile_plan(spec)
    phases["compile_s"] = time.perf_counter() - t
    count = plan.num_instructions()
    t = time.perf_counter()
    rep = check(plan)
    phases["check_s"] = time.perf_counter() - t
    assert rep.ok, rep.problems[:3]
    t = time.perf_counter()
    rep = check(plan, parallel=True)  # what `slimpipe check` runs: the replay and the KV rule in a forked child
    phases["check_forked_s"] = time.perf_counter() - t
    assert rep.ok, rep.problems[:3]
    t = time.perf_counter()
    sim = simulate_units(plan)
    phases["simulate_s"] = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "plan.json")
        t = time.perf_counter()
        ir.save(plan, path)
        phases["save_s"] = time.perf_counter() - t
        t = time.perf_counter()
        back = ir.load(path)
        phases["load_s"] = time.perf_counter() - t
    assert back.ranks == plan.ranks
    return {"instructions": count, "exchanges": plan.meta.get("exchanges", 0),
            **{k: round(x, 3) for k, x in phases.items()},
            "bubble_fraction": sim["bubble_fraction"], "rank0_peak_units": sim["ranks"][0]["peak_units"],
            "rank0_peak_closed_form": min(N * V + 2 * (P - 1), M * N * V)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="runs of the three commands (default 3)")
    ap.add_argument("--against", metavar="CHECKOUT", help="also run another checkout's commands (a git worktree of an "
                    "older commit, say) in every repeat, alternating which goes first: the machine's speed moves by a "
                    "third within minutes here, so only runs side by side compare two versions")
    ap.add_argument("-o", "--out", default=OUT, help=f"where to write the record (default {os.path.relpath(OUT, ROOT)})")
    args = ap.parse_args()
    try:
        cli = cli_path(args.repeats, args.against)
    finally:
        shutil.rmtree(PYCACHE, ignore_errors=True)
    inproc = in_process()
    res = {"benchmark": "scale_1m", "schedule": "slimpipe", "pp": P, "microbatches": M, "slices": N, "virtual_stages": V,
           "model": "tiny, 128 layers", "seq_len": SEQ, "exchange": True,
           "targets": {"total_wall_s": 10.0, "max_rss_bytes": 4 * 2 ** 30},
           "cli": cli, "in_process_s": inproc, "machine": machine(), "load_avg_at_end": os.getloadavg()}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    ir.atomic_write(args.out, json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
