"""Memory model vs the executor: per rank, the executor's measured peak_activation_bytes (autograd
saved tensors deduplicated by storage, parameters excluded, + K/V caches + dK/dV accumulators;
CPU, fp32, in-process --local run) beside the memory model's prediction for the same plan:

    before  the fused-kernel model (saves="fused"): activations + kv_cache + kv_grads at its peak
    model   saves="executor": activations + kv_cache + kv_grads + logits (the fp32 log-sum-exp the
            loss head keeps per last-stage token) at its peak: passes.memory.activation_peak

Records bench/results/memory_vs_executor.json.

    PYTHONPATH=. python bench/memory_vs_executor.py [--seq-len 8192] [--microbatches 4]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from compiler import build_spec, compile_plan, resolve_model  # noqa: E402
from ir import atomic_write, save  # noqa: E402
from passes.memory import activation_peak, rank_memory  # noqa: E402

CASES = [("slimpipe", 16, True), ("1f1b", 1, False), ("seq1f1b", 16, False)]


def plan_for(schedule, slices, exchange, args):
    m = resolve_model("tiny")  # layers 8, hidden 64, heads 4, kv heads 2, ffn 128, vocab 256
    return compile_plan(build_spec(schedule, m, pp=args.pp, microbatches=args.microbatches, slices=slices,
                                   seq_len=args.seq_len, exchange=exchange))


def run_executor(plan, tmp):
    path = os.path.join(tmp, "plan.json")
    save(plan, path)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-m", "executor", path, "--local", "--json", "--quiet", "--device", "cpu"],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(plan, measured):
    rows = []
    for r, ex in enumerate(measured):
        bd = rank_memory(plan, r, 4, "fused")["breakdown"]
        before = bd["activations"] + bd["kv_cache"] + bd["kv_grads"]
        model = activation_peak(plan, r, 4, "executor")
        rows.append({"rank": r, "executor_bytes": ex, "model_bytes": model["bytes"],
                     "ratio": round(model["bytes"] / ex, 4),
                     "model_breakdown": {k: v for k, v in model.items() if k != "bytes"},
                     "before_model_bytes": before, "before_ratio": round(before / ex, 4)})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pp", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    res = {"config": f"tiny (8 layers, H 64, 4 heads, 2 kv heads, ffn 128, vocab 256), p={args.pp}, "
                     f"m={args.microbatches}, seq {args.seq_len}, fp32 (dtype_bytes 4), CPU executor --local, sdpa",
           "schedules": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for schedule, n, exchange in CASES:
            plan = plan_for(schedule, n, exchange, args)
            summ = run_executor(plan, tmp)
            rows = compare(plan, summ["peak_activation_bytes"])
            res["schedules"][schedule] = {"slices": n, "exchange": exchange, "exchanges": plan.meta.get("exchanges", 0),
                                          "attention_backend": summ["attention_backend"], "ranks": rows}
            print(f"{schedule:9s} " + "  ".join(f"r{x['rank']} {x['executor_bytes'] / 2**20:7.2f}MiB "
                                                 f"model {x['ratio']:.3f} (before {x['before_ratio']:.3f})" for x in rows),
                  flush=True)
    sp = [x["executor_bytes"] for x in res["schedules"]["slimpipe"]["ranks"]]
    ob = [x["executor_bytes"] for x in res["schedules"]["1f1b"]["ranks"]]
    res["slimpipe_over_1f1b_max_rank"] = round(max(sp) / max(ob), 4)
    res["worst_ratio_deviation"] = round(max(abs(x["ratio"] - 1) for s in res["schedules"].values() for x in s["ranks"]), 4)
    print(json.dumps({k: res[k] for k in ("slimpipe_over_1f1b_max_rank", "worst_ratio_deviation")}))
    if not args.no_write:
        atomic_write(os.path.join(ROOT, "bench", "results", "memory_vs_executor.json"), json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
