"""Predicted vs measured: a plan's simulation next to a measured trace of it (`python -m executor
plan.json --trace measured.json`, or any Chrome trace with one "X" event per instruction whose
args carry the rank's instruction `index` and the `step`; pid is the rank, ts/dur microseconds).

Compares the step time, the bubble (ideal / imbalance / comm, the measured split found by replaying
the plan with the measured unit durations), per-rank busy time, and per instruction kind and per
(kind, slice) the residual measured - predicted, largest first. KV-exchange requests a rank answered
outside its units (args.kv_served_s of other instructions, otherData.kv_served_after_s) count as its
units' work, where the cost model puts them (carry_served)."""
from __future__ import annotations

from ir import COMPUTE, KV_SERVER, Kind, Plan, SpecError, read_user_json

from .replay import replay
from .simulate import bubble_fraction, simulate_timed, strip_exchanges

_UNIT = COMPUTE  # F, B and the split backward's I and W (the kind table's compute role)


def load_measured(path: str, plan: Plan) -> tuple[int, dict, float, dict, list | None, dict]:
    """(step, {(rank, index): seconds}, step seconds, {(rank, index): CPU seconds where recorded},
    per rank [process CPU s, compute thread CPU s] of the step or None, {(rank, index): [forward s,
    backward s] of KV requests served inside the instruction}, with (rank, None) for what the rank
    served after its last instruction) of the trace's median step, checked against the plan."""
    d = read_user_json(path, "--against", "a trace written by `python -m executor plan.json --trace FILE`")
    evs = d.get("traceEvents") if isinstance(d, dict) else None
    if not isinstance(evs, list):
        raise SpecError(f"--against {path!r}: not a Chrome trace (no traceEvents list)")
    other = d.get("otherData") if isinstance(d.get("otherData"), dict) else {}
    pids = {e.get("pid") for e in evs if isinstance(e, dict) and e.get("ph") == "X" and isinstance(e.get("args"), dict)
            and "index" in e["args"]}
    if pids and all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in pids) \
            and max(pids) + 1 != len(plan.ranks):
        raise SpecError(f"--against {path!r}: the trace has {max(pids) + 1} ranks and the plan {len(plan.ranks)}: "
                        f"a trace of another plan? (run the executor on this plan with --trace)")
    per_step: dict[int, dict] = {}
    for e in evs:
        if not isinstance(e, dict) or e.get("ph") != "X" or not isinstance(e.get("args"), dict) or "index" not in e["args"]:
            continue
        r, i, st = e.get("pid"), e["args"]["index"], e["args"].get("step", 0)
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (r, i, st)) and \
            all(isinstance(e.get(k), (int, float)) and not isinstance(e.get(k), bool) for k in ("ts", "dur"))
        if not ok or not 0 <= r < len(plan.ranks) or not 0 <= i < len(plan.ranks[r]) or e["dur"] < 0:
            raise SpecError(f"--against {path!r}: event {e.get('name')!r} has pid {r!r} / args.index {i!r} / "
                            f"step / ts / dur outside the plan ({len(plan.ranks)} ranks) or not numbers")
        got = per_step.setdefault(st, {})
        if (r, i) in got:
            raise SpecError(f"--against {path!r}: step {st}: rank {r} instruction #{i} appears twice")
        cpu = e["args"].get("cpu_s")
        got[(r, i)] = (e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6,
                       cpu if isinstance(cpu, (int, float)) and not isinstance(cpu, bool) else None,
                       _pair(e["args"].get("kv_served_s"), path, f"step {st}: event {e.get('name')!r} (rank {r} #{i})'s "
                             f"args.kv_served_s"))
    if not per_step:
        raise SpecError(f"--against {path!r}: no instruction events (\"X\" events with args.index)")
    n = sum(len(s) for s in plan.ranks)
    spans = {}
    for st, got in per_step.items():
        if len(got) != n:
            missing = next((r, i) for r, s in enumerate(plan.ranks) for i in range(len(s)) if (r, i) not in got)
            raise SpecError(f"--against {path!r}: step {st} has {len(got)} events for the plan's {n} instructions "
                            f"(rank {missing[0]} #{missing[1]} is missing): a trace of another plan?")
        steps = other.get("steps")
        if isinstance(steps, list) and st < len(steps) and isinstance(steps[st], list) and len(steps[st]) == 2:
            spans[st] = (steps[st][1] - steps[st][0]) / 1e6
        else:
            spans[st] = max(v[1] for v in got.values()) - min(v[0] for v in got.values())
    measured = sorted(per_step) if len(per_step) == 1 else sorted(s for s in per_step if s != min(per_step))
    st = other.get("median_step")
    if st not in per_step:
        by_len = sorted(measured, key=lambda s: spans[s])
        st = by_len[(len(by_len) - 1) // 2]
    cpu = {k: v[2] for k, v in per_step[st].items() if v[2] is not None}
    served = {k: v[3] for k, v in per_step[st].items() if v[3] is not None}
    after = other.get("kv_served_after_s")
    if isinstance(after, list) and len(after) == len(plan.ranks):
        for r, pr in enumerate(after):
            pair = _pair(pr[st] if isinstance(pr, list) and st < len(pr) else None, path,
                         f"otherData.kv_served_after_s of rank {r}")
            if pair is not None:
                served[(r, None)] = pair
    return (st, {k: v[1] - v[0] for k, v in per_step[st].items()}, spans[st], cpu, _step_cpu(other, st, plan),
            served)


def _pair(v, path: str, what: str) -> list | None:
    """A [forward s, backward s] pair of a trace (None stays None); SpecError naming `what` otherwise."""
    if v is None:
        return None
    if not (isinstance(v, list) and len(v) == 2 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in v)):
        raise SpecError(f"--against {path!r}: {what} is {v!r}; a [forward s, backward s] pair of seconds >= 0")
    return [float(v[0]), float(v[1])]


def carry_served(plan: Plan, dur: dict, served: dict) -> tuple[dict, list[float]]:
    """The measured durations with the KV requests a rank served outside its compute units moved
    into them: the cost model prices what a partner serves in its own units (CostModel.kv_shift on
    the unit after its KV*_RECV), while the executor answers requests wherever the rank is, inside
    its units and inside its waits (executor/kv.py), so a receive's wait can hold the partner's
    attention work. Forward requests served outside units go to the rank's next F (else its last
    one), backward ones to its next B or I (else its last one): the unit they delayed. Returns
    (durations, per rank the seconds moved); `dur` itself is not changed. With no unit of that
    direction on the rank the time stays where it was."""
    if not served:
        return dur, [0.0] * len(plan.ranks)
    out = dict(dur)
    moved = [0.0] * len(plan.ranks)
    for r, s in enumerate(plan.ranks):
        fwd = [i for i, ins in enumerate(s) if ins.kind == Kind.F]
        bwd = [i for i, ins in enumerate(s) if ins.kind in (Kind.B, Kind.I)]
        for i in [*range(len(s)), None]:
            pair = served.get((r, i))
            if pair is None or (i is not None and s[i].kind in _UNIT):
                continue  # none, or served inside a unit: already its time
            for amount, units in zip(pair, (fwd, bwd)):
                if not amount or not units:
                    continue
                to = units[-1] if i is None else next((u for u in units if u > i), units[-1])
                out[(r, to)] += amount
                if i is not None:
                    out[(r, i)] = max(out[(r, i)] - amount, 0.0)
                moved[r] += amount
    return out, moved


def _step_cpu(other: dict, st: int, plan: Plan) -> list | None:
    """otherData.step_cpu_s of step `st`: per rank [process CPU s, compute thread CPU s], when every
    rank has the pair (ranks that were processes of their own); else None."""
    rows = other.get("step_cpu_s")
    if not isinstance(rows, list) or len(rows) != len(plan.ranks):
        return None
    out = []
    for pr in rows:
        pair = pr[st] if isinstance(pr, list) and st < len(pr) else None
        if not (isinstance(pair, list) and len(pair) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in pair)):
            return None
        out.append([float(pair[0]), float(pair[1])])
    return out


def _bubbles(plan: Plan, dur: dict, step_s: float, profile=None, cpu: dict | None = None) -> dict:
    """Measured bubble and its split: ideal (the mean of each compute kind, no communication), imbalance (the
    measured unit durations, no communication), comm (the rest), clamped like simulate_timed's.

    Where the profile has fewer processors than the plan has ranks (a measured CPU profile), the
    prediction's split replays on those processors, so its `ideal` holds the ranks taking turns
    (1f1b p=4 m=4 on 2 processors: 13/36, where a processor per rank gives the closed form 3/7). The
    measured split then does the same with the units' CPU times (`cpu`: every unit's, or None; their
    wall durations already hold the turns): both `ideal`s mean one thing. Otherwise (a processor per
    rank, or a trace without CPU times) the measured durations replay as they are."""
    busy = [sum(dur[(r, i)] for i, ins in enumerate(s) if ins.kind in _UNIT) for r, s in enumerate(plan.ranks)]
    b = bubble_fraction(busy, step_s)
    engine, costs = replay, dur
    if profile is not None and cpu:  # cpu: every unit's CPU time, or None
        from .costs import replay_engine, shared_processors

        if shared_processors(profile, len(plan.ranks)):
            engine, costs = replay_engine(plan, profile), cpu
    sums = {k: [0.0, 0] for k in _UNIT}
    for r, s in enumerate(plan.ranks):
        for i, ins in enumerate(s):
            if ins.kind in _UNIT:
                sums[ins.kind][0] += costs[(r, i)]
                sums[ins.kind][1] += 1
    mean = {k: (t / c if c else 0.0) for k, (t, c) in sums.items()}
    index = {(r, ins): i for r, s in enumerate(plan.ranks) for i, ins in enumerate(s)}
    ideal = engine(strip_exchanges(plan), lambda r, ins: mean[ins.kind])
    free = engine(plan, lambda r, ins: costs.get((r, index[(r, ins)]), 0.0) if ins.kind in _UNIT else 0.0)
    b_ideal = min(bubble_fraction(ideal.busy, ideal.makespan), b)
    b_free = max(min(bubble_fraction(free.busy, free.makespan), b), b_ideal)
    return {"step_s": step_s, "bubble_fraction": b,
            "bubble_breakdown": {"ideal": b_ideal, "imbalance": b_free - b_ideal, "comm": b - b_free},
            "busy_s": busy}


def _cpu_replay(plan: Plan, cpu: dict, cm) -> float:
    """The step the measured units' CPU times give when replayed like the prediction (the profile's
    processors and messages, CostModel `cm`): what the run would have taken with no other process on
    the machine. Set beside the prediction it separates a cost-model error from a busy machine."""
    from .costs import replay_engine

    prof = cm.prof
    index = {(r, ins): i for r, s in enumerate(plan.ranks) for i, ins in enumerate(s)}
    res = replay_engine(plan, prof, cm.msg_cost())(plan, lambda r, ins: cpu[(r, index[(r, ins)])], cm.p2p_time,
                                                   cm.kv_time)
    return res.makespan


def predicted_serving(plan: Plan, cm) -> list[float]:
    """Per rank, the seconds the cost model `cm` gives its answers to KV-exchange requests: for each
    exchange it serves (partner or helper), the attention block of every layer (CostModel.kv_shift)
    and the posting of every layer's reply (CostModel.message_cpu at the reply's bytes): what the
    executor's trace measures as kv_served_s (executor/kv.py KVService.answer). Seconds, no sharing."""
    out = [0.0] * len(plan.ranks)
    for r, s in enumerate(plan.ranks):
        for ins in s:
            if ins.kind in KV_SERVER:
                out[r] += cm.kv_shift(r, ins) + cm.kv_layers(r, ins) * cm.message_cpu(cm.kv_messages(ins)[1])
    return out


def against(plan: Plan, path: str, profile, dtype_bytes: int = 4) -> dict:
    """The comparison report (see the module docstring). dtype_bytes: the executor's dtype (fp32 = 4)."""
    step, dur, step_s, cpu, step_cpu, served = load_measured(path, plan)
    raw = dur
    dur, moved = carry_served(plan, dur, served)
    if any(moved):  # the units' CPU times likewise (the served time is the compute thread's)
        cpu = {k: v + dur[k] - raw[k] for k, v in cpu.items()}
    sim = simulate_timed(plan, profile, dtype_bytes, record=True)
    res = sim["_replay"]
    pred_dur = {(r, i): t1 - t0 for r, i, t0, t1 in res.timeline}
    for r, i, t0, t1 in res.comm or ():
        pred_dur[(r, i)] = pred_dur.get((r, i), 0.0) + max(t1 - t0, 0.0)
    from .costs import CostModel, load_profile

    prof = load_profile(profile)
    cm = CostModel(plan.spec, prof, dtype_bytes, plan=plan)  # for the CPU replay and the KV answers
    units = [(r, i) for r, st in enumerate(plan.ranks) for i, ins in enumerate(st) if ins.kind in _UNIT]
    unit_cpu = cpu if units and all(k in cpu for k in units) else None  # a CPU time for every unit, or none
    meas = _bubbles(plan, dur, step_s, prof, unit_cpu)
    pred = {"step_s": sim["step_s"], "bubble_fraction": sim["bubble_fraction"],
            "bubble_breakdown": sim["bubble_breakdown"], "busy_s": [r["busy_s"] for r in sim["ranks"]]}
    if unit_cpu:
        meas["cpu_replay_step_s"] = _cpu_replay(plan, unit_cpu, cm)
    if served:
        meas["kv_served_outside_units_s"] = moved
        answered = [0.0] * len(plan.ranks)
        for (r, _i), (fwd, bwd) in served.items():
            answered[r] += fwd + bwd
        meas["kv_served_s"] = answered
        pred["kv_served_s"] = predicted_serving(plan, cm)
    if step_cpu:
        # what the ranks' processes used beyond their compute threads (gloo's threads, the watchers):
        # processor time the model gives no rank, which takes turns with the units where ranks
        # outnumber the processors
        meas["process_cpu_s"] = [p for p, _t in step_cpu]
        meas["compute_thread_cpu_s"] = [t for _p, t in step_cpu]
        meas["other_threads_cpu_s"] = sum(max(p - t, 0.0) for p, t in step_cpu)
    kinds: dict[str, list] = {}
    slices: dict[tuple, list] = {}
    costs = sim["_table"]  # a unit's processor seconds (no sharing): what measured_cpu_s compares with
    for r, s in enumerate(plan.ranks):
        for i, ins in enumerate(s):
            unit = ins.kind in _UNIT
            pc = costs[(r, ins.kind, ins.mb, ins.slice, ins.chunk)] if unit else 0.0
            pm = [pred_dur.get((r, i), 0.0), dur[(r, i)], 1, cpu.get((r, i), 0.0), (r, i) in cpu, pc]
            for key, table in ((ins.kind, kinds), ((ins.kind, ins.slice), slices)):
                if table is slices and not unit:
                    continue
                a = table.setdefault(key, [0.0, 0.0, 0, 0.0, 0, 0.0])
                for j in range(6):
                    a[j] += pm[j]

    def rows(table, named):
        out = [{**named(k), "count": c, "predicted_s": ps, "measured_s": ms, "residual_s": ms - ps,
                **({"predicted_cpu_s": pc} if named(k)["kind"] in _UNIT else {}),
                **({"measured_cpu_s": cs} if nc == c else {})}
               for k, (ps, ms, c, cs, nc, pc) in table.items()]
        return sorted(out, key=lambda x: -abs(x["residual_s"]))

    return {
        "step": step, "device_profile": sim["device_profile"],
        "predicted": pred, "measured": meas,
        "step_error": (pred["step_s"] - step_s) / step_s if step_s else 0.0,
        **({"cpu_replay_error": (pred["step_s"] - meas["cpu_replay_step_s"]) / meas["cpu_replay_step_s"]}
           if meas.get("cpu_replay_step_s") else {}),
        "bubble_points": 100 * (pred["bubble_fraction"] - meas["bubble_fraction"]),
        "kinds": rows(kinds, lambda k: {"kind": k}),
        "slices": rows(slices, lambda k: {"kind": k[0], "slice": k[1]}),
        "note": "predicted durations: compute units as simulated (shared processors included); sends and KV "
                "exchanges their simulated flight or rendezvous time; receives and OPT are not costed (0). "
                "predicted_cpu_s: the units' own processor seconds (the cost model's, no sharing). "
                "Measured: receives last until their data is there, less the KV requests the rank answered meanwhile, "
                "which count as its next unit's work of their direction (kv_served_outside_units_s); measured_cpu_s is the rank thread's CPU time "
                "(what the instructions cost when other processes do not take the processors): compare it "
                "with predicted_cpu_s.",
    }
