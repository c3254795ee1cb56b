"""KV exchange vs none: simulated bubble of SlimPipe for llama-70b at 512K context, p=8, n=32,
beside the uniform-cost bound (p-1)/(v*m*n+p-1), for both rules of passes.exchange:
`exchange_unit_cost` (redistribute(plan, profile=None): mirror pairs of units that start together
in unit-cost replays, whole slices) and `exchange` (what compile uses, with the bench's profile:
every lockstep step levelled toward its mean, several partners per unit, token ranges, idle ranks
as helpers), with the time the pass took; and Seq1F1B with the flops partition for the same p, n,
v and tp (step time, bubble, peak memory), the family slimpipe competes with at long context.
`scale`: CPU seconds of the exchange pass beside the schedule + communication lowering before it,
on issue 16's plan (slimpipe p=32 n=64 v=4, tiny model, m = 8, 16, 32; 1.6M instructions at m=32):
the pass should grow like the plan. Prints JSON; records bench/results/exchange.json.

    PYTHONPATH=. python bench/exchange.py [--device-profile h100] [--no-scale]
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
from passes.costs import GIB, load_profile  # noqa: E402
from passes.partition import flops_partition  # noqa: E402
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


def scale(prof) -> list[dict]:
    """The pass's CPU time beside schedule + lowering, as the plan grows (process time: the
    machine is shared, and wall time would measure the neighbours)."""
    from compiler import schedule_plan

    out = []
    p, n, v = 32, 64, 4
    model = resolve_model("tiny", {"layers": p * v})
    for m in (8, 16, 32):
        spec = build_spec("slimpipe", model, pp=p, microbatches=m, slices=n, virtual_stages=v, seq_len=n * 4,
                          exchange=True)
        t0 = time.process_time()
        plan = lower_comm(schedule_plan(spec))
        t1 = time.process_time()
        ex = redistribute(plan, prof)
        t2 = time.process_time()
        out.append({"pp": p, "microbatches": m, "slices": n, "virtual_stages": v,
                    "instructions": ex.num_instructions(), "exchanges": ex.meta["exchanges"],
                    "schedule_and_lowering_cpu_s": round(t1 - t0, 3), "exchange_pass_cpu_s": round(t2 - t1, 3),
                    "pass_us_per_instruction": round(1e6 * (t2 - t1) / ex.num_instructions(), 3)})
        print(f"scale m={m}: {out[-1]['instructions']} instructions, schedule+lowering {t1 - t0:.2f} s, "
              f"exchange pass {t2 - t1:.2f} s CPU", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device-profile", default="h100")
    ap.add_argument("--no-scale", action="store_true", help="skip the pass-scaling measurement")
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
                        "helpers": plan.meta.get("exchange_helpers", 0),
                        "peak_memory_gib": max(r["peak_memory_bytes"] for r in out["ranks"]) / GIB,
                        "pass_s": round(dt, 3)}
        row["bubble_over_bound"] = row["exchange"]["bubble_fraction"] / row["bound"]
        spec = build_spec("seq1f1b", model, pp=p, microbatches=c["m"], slices=n, virtual_stages=c["v"], seq_len=S,
                          tp=c["tp"], partition="flops", slice_lens=tuple(flops_partition(model, S, n)))
        out = simulate_timed(compile_plan(spec), prof)
        row["seq1f1b_flops"] = {"bubble_fraction": out["bubble_fraction"], "step_s": out["step_s"], "mfu": out["mfu"],
                                "peak_memory_gib": max(r["peak_memory_bytes"] for r in out["ranks"]) / GIB}
        rows.append(row)
        ex, sq = row["exchange"], row["seq1f1b_flops"]
        print(f"m={c['m']} v={c['v']}: bound {100 * row['bound']:.2f}%  none {100 * row['no_exchange']['bubble_fraction']:.2f}%  "
              f"unit-cost pairing {100 * row['exchange_unit_cost']['bubble_fraction']:.2f}%  "
              f"levelled {100 * ex['bubble_fraction']:.2f}% = {row['bubble_over_bound']:.2f}x bound, "
              f"step {ex['step_s']:.1f} s, {ex['peak_memory_gib']:.1f} GiB ({ex['pass_s']:.2f} s)  |  "
              f"seq1f1b flops: step {sq['step_s']:.1f} s, {sq['peak_memory_gib']:.1f} GiB", file=sys.stderr)
    res = {"bench": "exchange", "device_profile": prof.name, "rows": rows}
    if not args.no_scale:
        res["scale"] = scale(prof)
    text = json.dumps(res, indent=1)
    print(text)
    atomic_write(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "exchange.json"), text + "\n")


if __name__ == "__main__":
    main()
