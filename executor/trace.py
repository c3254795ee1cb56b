"""The measured trace: what every rank executed, one Chrome/Perfetto event per instruction, named
like `slimpipe trace`'s events (passes/trace.py) so the two overlay; and figures per kind.

Events carry args.index (the instruction's position in its rank's stream) and args.step; times
come from time.monotonic(), one clock for every process of a machine, so ranks line up. An
instruction during which the rank answered KV-exchange requests (inside its units between layers,
or while it waited) carries args.kv_served_s = [forward s, backward s] of that work; what a rank
answered after its last instruction is otherData.kv_served_after_s per rank and step."""
from __future__ import annotations

import statistics

from ir import KV, Kind, to_text

_CAT = {Kind.F: "forward", Kind.B: "backward", Kind.OPT: "optimizer"}


def step_spans(per_rank) -> list[tuple[float, float]]:
    """(start, end) of each step over all ranks; per_rank[r] = [(events, [t0, t1], cpu, served_after),
    ...] (cpu: [process s, compute thread s] of the step, or None; served_after: [forward s, backward s]
    of KV requests served after the rank's last instruction, or None)."""
    n = len(per_rank[0])
    return [(min(pr[s][1][0] for pr in per_rank), max(pr[s][1][1] for pr in per_rank)) for s in range(n)]


def measured_steps(n: int) -> list[int]:
    """The steps the figures use: all but the first (warm-up) when there are several."""
    return list(range(1, n)) if n > 1 else [0]


def median_step(per_rank) -> int:
    """The measured step whose duration is the median (the lower one for an even count)."""
    spans = step_spans(per_rank)
    steps = sorted(measured_steps(len(spans)), key=lambda s: spans[s][1] - spans[s][0])
    return steps[(len(steps) - 1) // 2]


def chrome_trace(plan, per_rank, dtype: str = "fp32") -> dict:
    """Every executed instruction of every step as an "X" event (microseconds from the first step's start)."""
    spec = plan.spec
    spans = step_spans(per_rank)
    origin = spans[0][0]
    us = 1e6
    ev = []
    for r in range(spec.pp):
        ev.append({"name": "process_name", "ph": "M", "pid": r, "tid": 0, "args": {"name": f"rank {r}"}})
        ev.append({"name": "process_sort_index", "ph": "M", "pid": r, "tid": 0, "args": {"sort_index": r}})
        ev.append({"name": "thread_name", "ph": "M", "pid": r, "tid": 0, "args": {"name": "compute"}})
        ev.append({"name": "thread_name", "ph": "M", "pid": r, "tid": 1, "args": {"name": "communication"}})
        for step, (events, *_rest) in enumerate(per_rank[r]):
            for i, t0, t1, cpu, served in events:
                ins = plan.ranks[r][i]
                k = ins.kind
                args = {"instr": to_text(ins), "index": i, "step": step}
                if cpu is not None:
                    args["cpu_s"] = cpu
                if served is not None:  # KV-exchange requests this rank answered inside the instruction
                    args["kv_served_s"] = served
                if k in (Kind.F, Kind.B):
                    args.update(stage=spec.placement[r][ins.chunk], tokens=spec.slice_lens[ins.mb][ins.slice])
                    name, tid = f"{k}{ins.mb}.{ins.slice}", 0
                elif k == Kind.OPT:
                    name, tid = "OPT", 0
                else:
                    args["peer"] = ins.peer
                    name, tid = k, 1
                ev.append({"name": name, "cat": _CAT.get(k, "kv_exchange" if k in KV else "p2p"), "ph": "X",
                           "pid": r, "tid": tid, "ts": (t0 - origin) * us, "dur": max(t1 - t0, 0.0) * us, "args": args})
    return {"traceEvents": ev, "displayTimeUnit": "ms",
            "otherData": {"schedule": spec.schedule, "pp": spec.pp, "microbatches": spec.microbatches,
                          "slices": spec.slices, "virtual_stages": spec.virtual_stages, "time_unit": "seconds",
                          "measured": True, "dtype": dtype, "clock": "time.monotonic (one machine)",
                          "steps": [[(a - origin) * us, (b - origin) * us] for a, b in spans],
                          "median_step": median_step(per_rank),
                          # per rank and step: [CPU s of the rank's process, of its compute thread] (null
                          # for in-process ranks): the rest is its other threads' (gloo's, the watchers')
                          "step_cpu_s": [[cpu for _ev, _span, cpu, _sa in pr] for pr in per_rank],
                          # per rank and step: [forward s, backward s] of KV-exchange requests answered
                          # after the rank's last instruction (null: none), beside the events' kv_served_s
                          "kv_served_after_s": [[sa for *_x, sa in pr] for pr in per_rank]}}


def kind_figures(plan, per_rank) -> dict:
    """Per instruction kind over all ranks in the median measured step: count, total and mean seconds."""
    step = median_step(per_rank)
    acc: dict[str, list] = {}
    for r, steps in enumerate(per_rank):
        for i, t0, t1, *_rest in steps[step][0]:
            a = acc.setdefault(plan.ranks[r][i].kind, [0, 0.0, []])
            a[0] += 1
            a[1] += t1 - t0
            a[2].append(t1 - t0)
    return {k: {"count": c, "total_s": tot, "mean_s": tot / c, "median_s": statistics.median(xs)}
            for k, (c, tot, xs) in sorted(acc.items())}
