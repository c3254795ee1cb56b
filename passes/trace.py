"""Chrome / Perfetto trace of a replayed plan: a process per rank with a compute row and a
communication row (sends from issue to arrival, KV exchanges from arrival to the rendezvous's end)."""
from __future__ import annotations

from ir import KV, Kind, Plan, PlanInvalidError, to_text

from .replay import replay


def timed_replay(plan: Plan, profile=None, unit_costs: bool = False, dtype_bytes: int = 2):
    """(Replay with timeline and comm records, seconds per time unit)."""
    if unit_costs:
        res = replay(plan, record=True)
        scale = 1.0
    else:
        from .costs import CostModel, load_profile, unit_cost_table

        cm = CostModel(plan.spec, profile or load_profile(None), dtype_bytes)
        table = unit_cost_table(plan, cm)
        res = replay(plan, lambda r, i: table[(r, i.kind, i.mb, i.slice, i.chunk)], cm.p2p_time, cm.kv_time, record=True)
        scale = 1.0
    if res.deadlocked:
        raise PlanInvalidError(res.deadlock_message())
    return res, scale


def chrome_trace(plan: Plan, profile=None, unit_costs: bool = False) -> dict:
    """{"traceEvents": [...], "displayTimeUnit": "ms"}; times in microseconds (unit costs: 1 unit = 1 ms)."""
    res, _ = timed_replay(plan, profile, unit_costs)
    us = 1000.0 if unit_costs else 1e6
    spec = plan.spec
    ev = []
    for r in range(spec.pp):
        ev.append({"name": "process_name", "ph": "M", "pid": r, "tid": 0, "args": {"name": f"rank {r}"}})
        ev.append({"name": "process_sort_index", "ph": "M", "pid": r, "tid": 0, "args": {"sort_index": r}})
        ev.append({"name": "thread_name", "ph": "M", "pid": r, "tid": 0, "args": {"name": "compute"}})
        ev.append({"name": "thread_name", "ph": "M", "pid": r, "tid": 1, "args": {"name": "communication"}})
    for r, i, t0, t1 in res.timeline:
        ins = plan.ranks[r][i]
        stage = spec.placement[r][ins.chunk]
        ev.append({"name": f"{ins.kind}{ins.mb}.{ins.slice}", "cat": "forward" if ins.kind == Kind.F else "backward",
                   "ph": "X", "pid": r, "tid": 0, "ts": t0 * us, "dur": (t1 - t0) * us,
                   "args": {"instr": to_text(ins), "stage": stage, "index": i,
                            "tokens": spec.slice_lens[ins.mb][ins.slice]}})
    for r, i, t0, t1 in res.comm:
        ins = plan.ranks[r][i]
        ev.append({"name": ins.kind, "cat": "kv_exchange" if ins.kind in KV else "p2p", "ph": "X", "pid": r, "tid": 1,
                   "ts": t0 * us, "dur": max(t1 - t0, 0.0) * us,
                   "args": {"instr": to_text(ins), "peer": ins.peer, "index": i}})
    return {"traceEvents": ev, "displayTimeUnit": "ms",
            "otherData": {"schedule": spec.schedule, "pp": spec.pp, "microbatches": spec.microbatches,
                          "slices": spec.slices, "virtual_stages": spec.virtual_stages,
                          "time_unit": "unit costs (1 unit = 1 ms)" if unit_costs else "seconds"}}


def plot_timeline(plan: Plan, path_format: str, profile=None, unit_costs: bool = False) -> bytes:
    """The classic pipeline picture: a row per rank, a box per unit coloured by micro-batch and
    shaded by slice (later slices darker), backward boxes hatched. Needs matplotlib."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    res, _ = timed_replay(plan, profile, unit_costs)
    spec = plan.spec
    cmap = plt.get_cmap("tab20" if spec.microbatches > 10 else "tab10")
    fig_w = min(40.0, max(8.0, len(res.timeline) / spec.pp / 6))
    fig, ax = plt.subplots(figsize=(fig_w, 0.6 * spec.pp + 1.5))
    n = spec.slices
    for r, i, t0, t1 in res.timeline:
        ins = plan.ranks[r][i]
        alpha = 0.45 + 0.55 * (ins.slice + 1) / n
        ax.broken_barh([(t0, t1 - t0)], (r - 0.4, 0.8), facecolors=cmap(ins.mb % cmap.N), alpha=alpha,
                       edgecolor="black", linewidth=0.3, hatch="//" if ins.kind == Kind.B else None)
    for r, i, t0, t1 in res.comm:
        if plan.ranks[r][i].kind in KV and t1 > t0:
            ax.broken_barh([(t0, t1 - t0)], (r + 0.4, 0.08), facecolors="red")
    ax.set_yticks(range(spec.pp))
    ax.set_yticklabels([f"rank {r}" for r in range(spec.pp)])
    ax.invert_yaxis()
    ax.set_xlabel("time (units: F=1, B=2)" if unit_costs else "time (s)")
    ax.set_title(f"{spec.schedule} p={spec.pp} m={spec.microbatches} n={spec.slices} v={spec.virtual_stages}"
                 f" ({spec.model.name}, seq {spec.seq_len}); colour = micro-batch, darker = later slice, hatched = backward")
    handles = [Patch(color=cmap(mb % cmap.N), label=f"mb {mb}") for mb in range(min(spec.microbatches, 10))]
    ax.legend(handles=handles, loc="upper right", fontsize="small", ncol=min(10, len(handles)))
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format=path_format, dpi=120)
    plt.close(fig)
    return buf.getvalue()
