"""KV exchange vs none: simulated bubble of SlimPipe for llama-70b at 512K context, p=8, n=32,
beside the uniform-cost bound (p-1)/(v*m*n+p-1), for both pairing rules of passes.exchange:
`exchange_unit_cost` (redistribute(plan, profile=None): units that start together in unit-cost
replays) and `exchange` (the cost-aware pairing compile uses, with the bench's profile), with the
time the pass took. Prints JSON; records bench/results/exchange.json.

    PYTHONPATH=. python bench/exchange.py [--device-profile h100]
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from compiler import build_spec, compile_plan, resolve_model, schedules  # noqa: E402
from ir import Instr, Kind, Plan, atomic_write  # noqa: E402
from passes import check, lower_comm  # noqa: E402
from passes.costs import load_profile  # noqa: E402
from passes.exchange import redistribute  # noqa: E402
from passes.simulate import simulate_timed  # noqa: E402

CASES = [dict(m=1, v=1, tp=8), dict(m=4, v=1, tp=8), dict(m=1, v=2, tp=8), dict(m=4, v=2, tp=8)]


def exchanged(spec, profile):
    """compile_plan's pipeline with the exchange pass run under `profile` (None: unit cost)."""
    family = schedules.get(spec.schedule)
    plan = lower_comm(Plan(spec, tuple(tuple(o) for o in family.generate(spec)), {}))
    t0 = time.perf_counter()
    plan = redistribute(plan, profile)
    dt = time.perf_counter() - t0
    return plan.with_ranks([r + (Instr(Kind.OPT),) for r in plan.ranks]), dt


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
        for key in ("no_exchange", "exchange_unit_cost", "exchange"):
            spec = build_spec("slimpipe", model, pp=p, microbatches=c["m"], slices=n, virtual_stages=c["v"],
                              seq_len=S, tp=c["tp"], exchange=key != "no_exchange")
            if key == "no_exchange":
                plan, dt = compile_plan(spec), 0.0
            else:
                plan, dt = exchanged(spec, None if key == "exchange_unit_cost" else prof)
                assert check(plan).ok
            out = simulate_timed(plan, prof)
            row[key] = {"bubble_fraction": out["bubble_fraction"], "bubble_breakdown": out["bubble_breakdown"],
                        "step_s": out["step_s"], "mfu": out["mfu"], "exchanges": plan.meta.get("exchanges", 0),
                        "pass_s": round(dt, 3)}
        rows.append(row)
        print(f"m={c['m']} v={c['v']}: bound {100 * row['bound']:.2f}%  none {100 * row['no_exchange']['bubble_fraction']:.2f}%  "
              f"unit-cost pairing {100 * row['exchange_unit_cost']['bubble_fraction']:.2f}%  "
              f"cost-aware {100 * row['exchange']['bubble_fraction']:.2f}% ({row['exchange']['pass_s']:.2f} s)",
              file=sys.stderr)
    res = {"bench": "exchange", "device_profile": prof.name, "rows": rows}
    text = json.dumps(res, indent=1)
    print(text)
    atomic_write(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "exchange.json"), text + "\n")


if __name__ == "__main__":
    main()
