"""slimpipe simulate: replay a plan on virtual clocks (unit costs, or the cost + memory model)."""
from __future__ import annotations

from ir import SpecError
from passes import require_valid
from passes.check import checked_unit_costs, noted_unit_costs
from passes.costs import load_profile
from passes.simulate import simulate_timed

from .common import DTYPE_HELP, add_parser, chosen_dtype, dtype_bytes_arg, emit_json, exchanges_phrase, human_bytes, human_time, load_plan, plan_profile


def run(args) -> int:
    if args.unit_costs and (args.device_profile or args.dtype is not None or args.against):
        raise SpecError("--unit-costs takes no --device-profile/--dtype/--against (forward 1, backward 2, communication free)")
    if args.device_profile:
        load_profile(args.device_profile)  # a bad profile fails before the plan is read
    if args.dtype is not None:
        dtype_bytes_arg(args.dtype)
    if args.unit_costs:
        # a plan file proved before (check) has its figures noted with the proof: no instruction is read
        out = None if args.plan.lower().endswith(".csv") else noted_unit_costs(args.plan)
        if out is None:
            # the rules with the unit-cost replay beside them (figures of a plan that breaks a rule
            # would mislead); a deadlock raises PlanInvalidError naming the wait cycle
            out = checked_unit_costs(load_plan(args.plan), "not simulated", args.plan, parallel=True)
        if args.json:
            emit_json(out)
        else:
            print(f"makespan {out['makespan']:g} units, bubble {out['bubble_fraction']:.4%}")
            for r in out["ranks"]:
                print(f"  rank {r['rank']}: busy {r['busy']:g}, peak units in flight {r['peak_units']}")
            if out["kv_exchanges"]:
                print(f"note: {exchanges_phrase(out['kv_exchanges'])}; unit costs price no attention, so their rendezvous "
                      f"can only add waits here: simulate without --unit-costs times the attention they move (or "
                      f"compile with --no-exchange for the unit-cost figures without them)")
        return 0
    plan = load_plan(args.plan)
    # figures of a plan that breaks a rule (missing unit, unmatched send) would mislead; a deadlock
    # is named by the simulation itself
    require_valid(plan, "not simulated", args.plan, deadlock=False)
    profile = plan_profile(args.device_profile, plan)  # the device it was compiled for, unless told
    # default dtype: a measured profile's (what the executor ran when it was measured), fp32 against
    # a measured trace (the executor's default), else bf16 (a GPU training run)
    _, dtype = chosen_dtype(args.dtype, profile, "fp32" if args.against else "bf16")
    if args.against:
        return _against(args, plan, profile, dtype)
    out = simulate_timed(plan, profile, dtype)
    if args.json:
        emit_json(out)
    else:
        b = out["bubble_breakdown"]
        print(f"{plan.spec.schedule} on {out['device_profile']}: step {human_time(out['step_s'])}, bubble "
              f"{out['bubble_fraction']:.2%} (ideal {b['ideal']:.2%}, imbalance {b['imbalance']:.2%}, comm {b['comm']:.2%}), "
              f"MFU {out['mfu']:.1%}, {out['tokens_per_s']:.4g} tokens/s")
        for r in out["ranks"]:
            bd = r["memory_breakdown"]
            parts = ", ".join(f"{k} {human_bytes(v)}" for k, v in bd.items())
            print(f"  rank {r['rank']}: busy {human_time(r['busy_s'])}, peak {human_bytes(r['peak_memory_bytes'])} ({parts})")
    return 0


def _off(err: float, than: str = "measured") -> str:
    """A prediction's relative error as words: '26.4% below measured', '3.0% above measured'."""
    return f"{abs(err):.1%} {'below' if err < 0 else 'above'} {than}" if round(abs(err), 3) else f"as {than}"


def _against(args, plan, profile, dtype) -> int:
    from passes.against import against

    out = against(plan, args.against, profile, dtype)
    if args.json:
        emit_json(out)
        return 0
    p, m = out["predicted"], out["measured"]
    pb, mb = p["bubble_breakdown"], m["bubble_breakdown"]
    # out["step"] is the trace's 0-based step index; the executor prints steps from 1
    print(f"{plan.spec.schedule} on {out['device_profile']} vs {args.against} (step {out['step'] + 1} as the executor "
          f"numbers them, the median of the measured steps; step 1 is the warm-up):")
    print(f"  step      predicted {human_time(p['step_s'])}, measured {human_time(m['step_s'])} "
          f"(prediction {_off(out['step_error'])})")
    print(f"  bubble    predicted {p['bubble_fraction']:.1%} (ideal {pb['ideal']:.1%}, imbalance {pb['imbalance']:.1%}, "
          f"comm {pb['comm']:.1%}), measured {m['bubble_fraction']:.1%} (ideal {mb['ideal']:.1%}, imbalance "
          f"{mb['imbalance']:.1%}, comm {mb['comm']:.1%}) (prediction {out['bubble_points']:+.1f} points)")
    if "cpu_replay_step_s" in m:
        print(f"  units' CPU times replayed like the prediction (the profile's processors): "
              f"{human_time(m['cpu_replay_step_s'])} (prediction {_off(out['cpu_replay_error'], 'it')}; "
              f"measured time beyond it is not the units' own CPU work: other processes, scheduling, waits)")
    if "other_threads_cpu_s" in m:
        print(f"  CPU of the ranks' processes {human_time(sum(m['process_cpu_s']))}, of their compute threads "
              f"{human_time(sum(m['compute_thread_cpu_s']))}: {human_time(m['other_threads_cpu_s'])} in their other "
              f"threads (gloo, the watchers), which no unit's cost holds")
    if "kv_served_s" in m:
        print(f"  KV requests answered (attention block and reply, per rank; measured in wall time, predicted in "
              f"processor time): predicted "
              f"{', '.join(human_time(x) for x in p['kv_served_s'])}, measured "
              f"{', '.join(human_time(x) for x in m['kv_served_s'])}")
    if any(m.get("kv_served_outside_units_s", ())):
        print(f"  KV requests the ranks answered outside their units (in waits and other instructions), counted as "
              f"their next unit's work as the model prices them (in busy, the bubble and the F/B/I rows below): "
              f"{', '.join(human_time(x) for x in m['kv_served_outside_units_s'])} per rank")
    for r, (a, b) in enumerate(zip(p["busy_s"], m["busy_s"])):
        print(f"  rank {r}    busy predicted {human_time(a)}, measured {human_time(b)} "
              f"(prediction {_off((a - b) / b if b else 0)})")
    print("  residual (measured - predicted) per instruction kind, largest first:")
    for row in out["kinds"][:6]:
        cpu = (f"; the units' own CPU: predicted {human_time(row['predicted_cpu_s'])}, measured "
               f"{human_time(row['measured_cpu_s'])}" if "measured_cpu_s" in row and "predicted_cpu_s" in row else "")
        print(f"    {row['kind']:<10} x{row['count']:<4} {human_time(row['residual_s']):>10}  "
              f"(predicted {human_time(row['predicted_s'])}, measured {human_time(row['measured_s'])}{cpu})")
    print("  per unit kind and slice, largest first:")
    for row in out["slices"][:6]:
        name = f"{row['kind']} slice {row['slice']}"
        print(f"    {name:<10} x{row['count']:<4} {human_time(row['residual_s']):>10}  "
              f"(predicted {human_time(row['predicted_s'])}, measured {human_time(row['measured_s'])})")
    return 0


def register(sub) -> None:
    p = add_parser(sub, "simulate", "simulate a plan: step time, bubble, MFU and memory per rank (cost model), "
                   "or unit costs", "slimpipe simulate plan.json --device-profile h100 --json")
    p.add_argument("plan")
    p.add_argument("--unit-costs", action="store_true", help="forward 1, backward 2, communication free")
    p.add_argument("--device-profile", help="h100, a100, or a JSON file with measured figures (default: the built-in "
                   "profile the plan was compiled for, else h100)")
    p.add_argument("--against", metavar="MEASURED.json", help="compare with a measured trace (`python -m executor "
                   "plan.json --trace MEASURED.json`): step, bubble, busy per rank, residual per kind and slice")
    p.add_argument("--dtype", help=DTYPE_HELP + " (fp32 with --against)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)
