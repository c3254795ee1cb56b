"""Chrome / Perfetto trace of a replayed plan: a process per rank with a compute row and a
communication row (sends from issue to arrival, KV exchanges from arrival to the rendezvous's end)."""
from __future__ import annotations

from ir import KINDS, KV, Plan, PlanInvalidError, to_text

from .replay import replay


def _replayed(plan: Plan, profile=None, unit_costs: bool = False):
    """The replay the pictures draw (timeline and messages recorded): unit costs, or the cost
    model's costs.timed_replay on `profile` (default h100; messages sized in its dtype, CostModel's
    default, as simulate sizes them). A deadlock is an invalid plan."""
    if unit_costs:
        res = replay(plan, record=True)
    else:
        from .costs import CostModel, load_profile, timed_replay

        res, _ = timed_replay(plan, CostModel(plan.spec, profile or load_profile(None), plan=plan), record=True)
    if res.deadlocked:
        raise PlanInvalidError(res.deadlock_message())
    return res


def assign_tracks(spans: list[tuple[float, float]]) -> list[int]:
    """Track index (0, 1, ...) per (start, end) span so that spans on one track never overlap:
    Perfetto and chrome://tracing cannot draw complete events that partly overlap on one thread.
    Greedy interval partitioning: the fewest tracks, the lowest free one first."""
    order = sorted(range(len(spans)), key=lambda k: (spans[k][0], spans[k][1]))
    ends: list[float] = []  # last end per track
    out = [0] * len(spans)
    for k in order:
        t0, t1 = spans[k]
        for tr, e in enumerate(ends):
            if e <= t0:
                break
        else:
            tr = len(ends)
            ends.append(0.0)
        ends[tr] = t1
        out[k] = tr
    return out


def chrome_trace(plan: Plan, profile=None, unit_costs: bool = False) -> dict:
    """{"traceEvents": [...], "displayTimeUnit": "ms"}; ts and dur in microseconds, as the format
    says (unit costs: 1 unit = 1 ms). A process per rank: its compute on one thread, its messages
    on as many communication threads as it has concurrent messages (none partly overlap on one)."""
    res = _replayed(plan, profile, unit_costs)
    us = 1000.0 if unit_costs else 1e6
    spec = plan.spec

    def span(t0, t1):  # whole nanoseconds, as Perfetto reads them: one event's end equals the next one's start
        return round(t0 * us * 1000), round(max(t1, t0) * us * 1000)

    ev = []
    for r in range(spec.pp):
        ev.append({"name": "process_name", "ph": "M", "pid": r, "tid": 0, "args": {"name": f"rank {r}"}})
        ev.append({"name": "process_sort_index", "ph": "M", "pid": r, "tid": 0, "args": {"sort_index": r}})
        ev.append({"name": "thread_name", "ph": "M", "pid": r, "tid": 0, "args": {"name": "compute"}})
    for r, i, t0, t1 in res.timeline:
        ins = plan.ranks[r][i]
        stage = spec.placement[r][ins.chunk]
        a, b = span(t0, t1)
        ev.append({"name": f"{ins.kind}{ins.mb}.{ins.slice}", "cat": KINDS[ins.kind].cost,
                   "ph": "X", "pid": r, "tid": 0, "ts": a / 1000, "dur": (b - a) / 1000,
                   "args": {"instr": to_text(ins), "stage": stage, "index": i,
                            "tokens": spec.slice_lens[ins.mb][ins.slice]}})
    for r, i, t0, t1 in res.helps:  # a helper's served blocks: its own compute, between its units
        ins = plan.ranks[r][i]
        a, b = span(t0, t1)
        ev.append({"name": f"help{ins.mb}.{ins.slice}", "cat": "kv_help", "ph": "X", "pid": r, "tid": 0,
                   "ts": a / 1000, "dur": (b - a) / 1000,
                   "args": {"instr": to_text(ins), "owner": ins.peer, "index": i, "tokens": ins.hi - ins.lo}})
    per_rank: dict[int, list] = {}
    for r, i, t0, t1 in res.comm:
        per_rank.setdefault(r, []).append((i, *span(t0, t1)))
    for r, items in sorted(per_rank.items()):
        tracks = assign_tracks([(a, b) for _, a, b in items])
        for k in range(max(tracks) + 1):
            ev.append({"name": "thread_name", "ph": "M", "pid": r, "tid": 1 + k,
                       "args": {"name": "communication" if k == 0 else f"communication {k + 1}"}})
        for (i, a, b), tr in zip(items, tracks):
            ins = plan.ranks[r][i]
            ev.append({"name": ins.kind, "cat": "kv_exchange" if ins.kind in KV else "p2p", "ph": "X", "pid": r,
                       "tid": 1 + tr, "ts": a / 1000, "dur": (b - a) / 1000,
                       "args": {"instr": to_text(ins), "peer": ins.peer, "index": i}})
    return {"traceEvents": ev, "displayTimeUnit": "ms",
            "otherData": {"schedule": spec.schedule, "pp": spec.pp, "microbatches": spec.microbatches,
                          "slices": spec.slices, "virtual_stages": spec.virtual_stages,
                          "time_unit": "us", "unit_costs": unit_costs,
                          "timing": "unit costs: F=1, B=2, I=W=1 units, 1 unit shown as 1 ms" if unit_costs else
                          f"cost model, device profile {getattr(profile, 'name', None) or 'h100'}"}}


# backward boxes hatched, by the kind table's cost class: B "//", a split backward's I "\\\\", W ".."
_HATCH = {"backward": "//", "backward_input": "\\\\", "backward_weight": ".."}
_HATCH_LABEL = {"backward": "backward (B)", "backward_input": "input gradient (I)", "backward_weight": "weight gradient (W)"}


def timeline_figure(plan: Plan, profile=None, unit_costs: bool = False):
    """The classic pipeline picture as a matplotlib Figure: a row per rank, a box per unit coloured
    by micro-batch and shaded by slice (later slices darker), backward boxes hatched, KV exchanges
    as red marks. Title and legend sit outside the axes and are sized to fit. Needs matplotlib."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    res = _replayed(plan, profile, unit_costs)
    spec = plan.spec
    m = spec.microbatches
    cmap = plt.get_cmap("tab10" if m <= 10 else "tab20")
    colours = min(m, cmap.N)
    units_per_rank = len(res.timeline) / max(spec.pp, 1)
    fig_w = min(16.0, max(8.0, units_per_rank / 5))
    has_kv = any(plan.ranks[r][i].kind in KV and t1 > t0 for r, i, t0, t1 in res.comm)
    rows_h = min(10.0, max(1.6, 0.4 * spec.pp))
    title = (f"{spec.schedule} p={spec.pp} m={m} n={spec.slices} v={spec.virtual_stages}, {spec.model.name}, "
             f"seq {spec.seq_len}" + ("" if unit_costs else f", {getattr(profile, 'name', None) or 'h100'}"))
    if m > cmap.N:
        title += f" (micro-batch colours repeat every {cmap.N})"
    title_lines = textwrap.wrap(title, width=int(fig_w * 11))
    legend_cols = max(3, int(fig_w / 1.9))
    legend_rows = -(-(colours + 2 + has_kv) // legend_cols)
    fig_h = rows_h + 1.0 + 0.22 * len(title_lines) + 0.25 * legend_rows
    # constrained layout keeps the title and the legend below the axes inside the figure
    fig, ax = plt.subplots(figsize=(fig_w, fig_h), layout="constrained")
    n = spec.slices
    unit, k = "units: F=1, B=2, I=W=1", 1.0
    if not unit_costs:  # seconds in the unit that fits the step (a tiny model's step is microseconds)
        unit, size = next(((u, sz) for u, sz in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)) if res.makespan >= sz),
                          ("ns", 1e-9))
        k = 1.0 / size
    for r, i, t0, t1 in res.timeline:
        ins = plan.ranks[r][i]
        alpha = 0.45 + 0.55 * (ins.slice + 1) / n
        thin = (t1 - t0) < 0.004 * res.makespan  # an outline would hide the colour of a sliver
        ax.broken_barh([(t0 * k, (t1 - t0) * k)], (r - 0.4, 0.8), facecolors=cmap(ins.mb % cmap.N), alpha=alpha,
                       edgecolor="black", linewidth=0 if thin else 0.3, hatch=_HATCH.get(KINDS[ins.kind].cost))
    for r, i, t0, t1 in res.comm:
        if plan.ranks[r][i].kind in KV and t1 > t0:
            ax.broken_barh([(t0 * k, (t1 - t0) * k)], (r + 0.4, 0.08), facecolors="red")
    ax.set_yticks(range(spec.pp))
    ax.set_yticklabels([f"rank {r}" for r in range(spec.pp)])
    ax.set_ylim(spec.pp - 0.5, -0.5)
    ax.set_xlim(0, res.makespan * k * 1.01 if res.makespan > 0 else 1)
    ax.set_xlabel(f"time ({unit})")
    fig.suptitle("\n".join(title_lines), fontsize=10)
    handles = [Patch(facecolor=cmap(mb), label=f"mb {mb}") for mb in range(colours)]
    handles.append(Patch(facecolor="white", edgecolor="black", label="forward (darker: later slice)"))
    classes = {KINDS[ins.kind].cost for s in plan.ranks for ins in s if KINDS[ins.kind].role == "compute"}
    for cls, hatch in _HATCH.items():
        if cls in classes:
            handles.append(Patch(facecolor="white", edgecolor="black", hatch=hatch, label=_HATCH_LABEL[cls]))
    if has_kv:
        handles.append(Patch(facecolor="red", label="KV exchange"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(legend_cols, len(handles)), fontsize="small",
               frameon=False)
    return fig


def plot_timeline(plan: Plan, path_format: str, profile=None, unit_costs: bool = False) -> bytes:
    """timeline_figure rendered as png, svg or pdf bytes."""
    import io

    import matplotlib.pyplot as plt

    fig = timeline_figure(plan, profile, unit_costs)
    buf = io.BytesIO()
    fig.savefig(buf, format=path_format, dpi=100)
    plt.close(fig)
    return buf.getvalue()
