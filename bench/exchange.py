"""KV exchange vs none: simulated bubble of SlimPipe for llama-70b at 512K context, p=8, n=32,
beside the uniform-cost bound (p-1)/(v*m*n+p-1). Prints JSON; records bench/results/exchange.json.

    PYTHONPATH=. python bench/exchange.py [--device-profile h100]
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from compiler import build_spec, compile_plan, resolve_model  # noqa: E402
from ir import atomic_write  # noqa: E402
from passes.costs import load_profile  # noqa: E402
from passes.simulate import simulate_timed  # noqa: E402

CASES = [dict(m=1, v=1, tp=8), dict(m=4, v=1, tp=8), dict(m=1, v=2, tp=8), dict(m=4, v=2, tp=8)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device-profile", default="h100")
    args = ap.parse_args()
    prof = load_profile(args.device_profile)
    model = resolve_model("llama-70b")
    p, n, S = 8, 32, 524288
    rows = []
    for c in CASES:
        row = {"model": "llama-70b", "seq_len": S, "pp": p, "slices": n, "microbatches": c["m"],
               "virtual_stages": c["v"], "tp": c["tp"], "bound": (p - 1) / (c["v"] * c["m"] * n + p - 1)}
        for ex in (False, True):
            plan = compile_plan(build_spec("slimpipe", model, pp=p, microbatches=c["m"], slices=n,
                                           virtual_stages=c["v"], seq_len=S, tp=c["tp"], exchange=ex))
            out = simulate_timed(plan, prof)
            key = "exchange" if ex else "no_exchange"
            row[key] = {"bubble_fraction": out["bubble_fraction"], "bubble_breakdown": out["bubble_breakdown"],
                        "step_s": out["makespan_s"], "mfu": out["mfu"], "exchanges": plan.meta.get("exchanges", 0)}
        rows.append(row)
    res = {"bench": "exchange", "device_profile": prof.name, "rows": rows}
    text = json.dumps(res, indent=1)
    print(text)
    atomic_write(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "exchange.json"), text + "\n")


if __name__ == "__main__":
    main()
