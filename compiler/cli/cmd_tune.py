"""slimpipe tune: search schedule family, p (with tp, cp, dp filling the GPUs), m, n, v, partition,
exchange and layer split for the plan with the highest simulated throughput that fits a memory budget."""
from __future__ import annotations

import os
import sys
import time

from ir import SpecError
from passes import rendezvous_cycle
from passes.costs import GIB, load_profile

from .. import schedules
from ..layout import LAYER_SPLITS
from ..search import N_CHOICES, TP_CHOICES, CP_CHOICES, V_CHOICES, Problem, Space, default_global_batch, search
from .cmd_compare import parse_bytes
from .cmd_compile import add_model_args, model_from_args
from .common import (BYTE_UNITS, DTYPE_HELP, add_parser, chosen_dtype, add_plan_format_arg, save_plan, families_arg, check_output_path, emit_json, fit_unit, human_bytes, limit_seconds,
                     positive_int)
from .tables import family_table, plan_table

PLOT_FORMATS = ("png", "svg", "pdf")


def _names(pred) -> str:
    """The families whose record satisfies `pred`, comma-separated."""
    return ", ".join(f.name for f in schedules.FAMILIES.values() if pred(f))


_SLICED = lambda f: f.allows_slices and f.search_slices  # noqa: E731

SPACE_HELP = f"""search space (each part can be narrowed with the flags below):
  family     {', '.join(schedules.FAMILIES)}
  tp         {', '.join(map(str, TP_CHOICES))}, dividing heads and kv_heads
  cp         {', '.join(map(str, CP_CHOICES))} (capped at 8: the cost model prices cp on NVLink; --cp 16,32 lifts it)
  p          every divisor of gpus/(tp*cp); dp = gpus/(tp*cp*p); m = global batch / dp, an integer
  n          1 for {_names(lambda f: not _SLICED(f))}; {', '.join(map(str, N_CHOICES))} for {_names(_SLICED)}
  v          1 for {_names(lambda f: f.search_virtual == "one")}; {', '.join(map(str, V_CHOICES))} otherwise (not 1 for
             {_names(lambda f: f.search_virtual == "above_one")}); p*v <= layers
  partition  uniform (seq divisible by n*cp); also flops for {_names(lambda f: "flops" in f.partitions)}
             (seq divisible by cp; slices in multiples of lcm(2, cp) tokens)
  exchange   on and off for {_names(lambda f: f.default_exchange)}
  layers     uniform; also balanced (stages balanced by the cost model, LM head included) where it differs
Candidates over the budget by a sound memory bound are pruned; the rest are simulated in order of an
estimate until no candidate left can beat the top K (a sound time bound), or until --time-limit
(then the answer is marked NOT PROVEN). Step times within 0.5% of the fastest are a tie: less memory
wins (a balanced layer split not more than 0.5% faster than uniform loses to it where it needs more
memory). The best plan of every family is shown too, or why the family has none.

example:
  """


def int_list(flag: str, text: str | None, allowed=None) -> tuple[int, ...] | None:
    if text is None:
        return None
    out = []
    for part in text.split(","):
        try:
            v = int(part)
        except ValueError:
            v = 0
        if v < 1 or (allowed is not None and v not in allowed):
            what = f"one of {', '.join(map(str, allowed))}" if allowed else "positive integers"
            raise SpecError(f"{flag} {text!r}: {part!r} is not allowed; give a comma-separated list of {what}")
        out.append(v)
    return tuple(sorted(set(out)))


def space_from_args(args) -> Space:
    kw = {}
    if args.schedules is not None:
        kw["families"] = families_arg(args.schedules)
    if args.layer_split is not None:
        kinds = [s.strip() for s in args.layer_split.split(",")]
        for k in kinds:
            if k not in LAYER_SPLITS:
                raise SpecError(f"--layer-split {args.layer_split!r}: {k!r} is unknown; allowed: a comma-separated "
                                f"list of {', '.join(LAYER_SPLITS)}")
        kw["layer_splits"] = tuple(k for k in LAYER_SPLITS if k in kinds)
    for flag, name in (("--tp", "tp"), ("--cp", "cp"), ("--pp", "pp"), ("--slices", "slices"),
                       ("--virtual-stages", "virtual_stages")):
        val = int_list(flag, getattr(args, name))
        if val is not None:
            kw[name] = val
    return Space(**kw)


class Progress:
    """A carriage-return progress line on stderr, shown once the search has run ~2 s (TTY only);
    a final line either way when the search took that long."""

    def __init__(self, stream=sys.stderr, delay: float = 2.0):
        self.stream, self.delay = stream, delay
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.shown = False

    def __call__(self, st: dict) -> None:
        now = time.perf_counter()
        if not self.tty or now - self.t0 < self.delay or now - self.last < 0.2:
            return
        self.last = now
        if st["stage"] == 1:
            msg = f"tune: bounding candidates: {st['done']}"
        else:
            best = f"{st['best_s']:.3f} s" if st.get("best_s") is not None else "-"
            msg = (f"tune: {st['done']}/{st['total']} examined, {st['simulated']} simulated, best step {best}, "
                   f"{now - self.t0:.0f} s")
        self.stream.write("\r" + msg[:100].ljust(100))
        self.stream.flush()
        self.shown = True

    def finish(self, res) -> None:
        elapsed = time.perf_counter() - self.t0
        if self.shown:
            self.stream.write("\r" + " " * 100 + "\r")
        if elapsed >= self.delay:
            c = res.counts
            self.stream.write(f"tune: done in {elapsed:.1f} s: {c['candidates']} candidates, {c['simulated']} simulated "
                              f"({res.stopped})\n")
        self.stream.flush()


def check_plot(path: str) -> None:
    check_output_path(path)
    fmt = os.path.splitext(path)[1].lstrip(".").lower()
    if fmt not in PLOT_FORMATS:
        raise SpecError(f"--plot {path!r}: unknown picture format {fmt!r}; allowed: {', '.join('.' + f for f in PLOT_FORMATS)}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SpecError("--plot needs matplotlib, which is not installed; run: pip install slimpipe[plot]") from None


def front_figure(res):
    """Peak memory vs tokens/s of every simulated plan, the Pareto front, the pick and the budget,
    as a matplotlib Figure whose title and legend (outside the axes, right) fit in it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    colors = {f: plt.cm.tab10(i) for i, f in enumerate(schedules.FAMILIES)}
    mems = [r["peak_memory_bytes"] for r in res.simulated] or [res.problem.memory_budget]
    mu, ms = fit_unit(mems, BYTE_UNITS)  # a tiny model's plans read in MiB, not as 0.0 GiB
    tps = [r["tokens_per_s"] for r in res.simulated] or [1.0]
    tk, tl = (1e6, "million tokens/s") if max(tps) >= 1e6 else (1e3, "thousand tokens/s") if max(tps) >= 1e4 else (1.0, "tokens/s")
    for fam in schedules.FAMILIES:
        rows = [r for r in res.simulated if r["schedule"] == fam]
        if rows:
            ax.scatter([r["peak_memory_bytes"] / ms for r in rows], [r["tokens_per_s"] / tk for r in rows], s=14,
                       alpha=0.6, color=colors[fam], label=fam)
    front = res.pareto
    if front:
        ax.step([r["peak_memory_bytes"] / ms for r in front], [r["tokens_per_s"] / tk for r in front], where="post",
                color="black", lw=1.2, label="Pareto front")
    fam_best = [f.row for f in res.families if f.row]
    if fam_best:  # each family's best plan: what 1F1B or interleaved would have cost
        ax.scatter([r["peak_memory_bytes"] / ms for r in fam_best], [r["tokens_per_s"] / tk for r in fam_best], s=70,
                   facecolors=[colors[r["schedule"]] for r in fam_best], edgecolors="black", marker="D", zorder=4)
        ax.scatter([], [], s=70, facecolors="white", edgecolors="black", marker="D", label="best of each family")
        for k, r in enumerate(fam_best):  # staggered: families often land on the same spot
            ax.annotate(r["schedule"], (r["peak_memory_bytes"] / ms, r["tokens_per_s"] / tk), fontsize=7,
                        xytext=(6, -10 - 9 * k), textcoords="offset points",
                        arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "grey"})
    if res.best:
        b = res.best
        ax.scatter([b["peak_memory_bytes"] / ms], [b["tokens_per_s"] / tk], marker="*", s=160, color="black", zorder=5,
                   label="best")
    budget = res.problem.memory_budget
    if budget <= 1.5 * max(mems):
        ax.axvline(budget / ms, color="red", ls="--", lw=1, label=f"budget {human_bytes(budget)}")
    else:  # drawing it would squeeze every plan against the left edge
        ax.plot([], [], color="red", ls="--", lw=1, label=f"budget {human_bytes(budget)} (far right, not drawn)")
    none = [f.family for f in res.families if f.row is None]
    if none:  # families with no plan under the budget are named, so their absence is not a mystery
        ax.plot([], [], " ", label="no plan fits: " + ", ".join(none))
    ax.set_xlabel(f"peak memory per GPU ({mu})")
    ax.set_ylabel(tl)
    pr = res.problem
    fig.suptitle(f"{pr.model.name}, seq {pr.seq_len}, {pr.gpus} GPUs: simulated plans", fontsize=10)
    fig.legend(loc="outside right upper", fontsize=8, frameon=False)
    return fig


def plot_front(res, path: str) -> None:
    import io

    import matplotlib.pyplot as plt

    from ir import atomic_write

    fig = front_figure(res)
    buf = io.BytesIO()
    fig.savefig(buf, format=os.path.splitext(path)[1].lstrip(".").lower(), dpi=100)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def row_json(r: dict) -> dict:
    return {k: v for k, v in r.items() if not k.startswith("_")}


def run(args) -> int:
    if args.output:
        check_output_path(args.output)
    if args.plot:
        check_plot(args.plot)
    profile = load_profile(args.device_profile)
    dtype_name, dtype = chosen_dtype(args.dtype, profile)
    budget = parse_bytes(args.memory_budget) if args.memory_budget else profile.memory_bytes
    model, seq = model_from_args(args)
    space = space_from_args(args)
    gb = args.global_batch or default_global_batch(seq, args.gpus)
    problem = Problem(model, seq, args.gpus, budget, gb, profile, dtype)
    prog = Progress()
    res = search(problem, space, top_k=args.top, time_limit=args.time_limit or None, progress=prog)
    prog.finish(res)
    if args.output and res.best_plan is not None:
        save_plan(res.best_plan, args.output, args.plan_format)
    if args.plot:
        plot_front(res, args.plot)
    c = res.counts
    if args.json:
        emit_json({"model": model.name, "seq_len": seq, "gpus": args.gpus, "global_batch": gb,
                   "memory_budget_bytes": budget, "device_profile": profile.name, "dtype": dtype_name,
                   "dtype_bytes": problem.dtype_bytes,
                   "space": {"families": list(space.families), "tp": list(space.tp), "cp": list(space.cp),
                             "pp": list(space.pp) if space.pp else "divisors", "slices": list(space.slices),
                             "virtual_stages": list(space.virtual_stages), "layer_splits": list(space.layer_splits)},
                   "counts": c, "infeasible_reasons": res.infeasible_reasons, "stopped": res.stopped, "listing_cut": res.listing_cut,
                   "proven": res.proven, "tie_tolerance": res.tie,
                   "unexplored": res.unexplored, "unexplored_best_bound_s": res.unexplored_best_bound_s,
                   "top": [row_json(r) for r in res.top], "families": [f.to_json() for f in res.families],
                   "pareto": [row_json(r) for r in res.pareto],
                   "why_none": None if res.top else res.why_none(),
                   "least_memory_candidate": res.least_memory, "output": args.output if res.best_plan else None,
                   "plot": args.plot, "elapsed_s": res.elapsed_s})
        return 0 if res.top else 1
    print(f"{model.name}, seq {seq}, {args.gpus} GPUs, global batch {gb}, budget {human_bytes(budget)}, {profile.name}, "
          f"{dtype_name}")
    if res.top:
        print(f"fastest plans that fit (step times within {res.tie:.1%} of the fastest count as a tie: less memory "
              "first):")
        for line in plan_table(res.top):
            print(line)
    else:
        print(res.why_none())
    if res.families:
        print("best plan of each family (or why it has none):")
        for line in family_table(res.families, res.best):
            print(line)
    print(f"{c['candidates']} candidates: {c['infeasible']} break a rule, {c['pruned_memory_bound']} over budget by the "
          f"memory bound, {c['oom_exact']} over budget by the memory model, {c['pruned_time_bound']} provably slower "
          f"(time bound), " + (f"{c['unexplored']} unexplored (time limit), " if c["unexplored"] else "") +
          f"{c['simulated']} simulated")
    if res.stopped == "time-limit":
        gap = ""
        if res.top and res.unexplored_best_bound_s and res.unexplored_best_bound_s < res.top[0]["step_s"]:
            gap = f": one of them could be up to {1 - res.unexplored_best_bound_s / res.top[0]['step_s']:.1%} faster than #1"
        print(f"NOT PROVEN: the search stopped at --time-limit {args.time_limit:g} s with {res.stop_phrase()}"
              f"{gap}; run with --time-limit 0 to finish the proof")
    elif res.top:
        print(f"proven: no plan of the space is faster than #1 by more than {res.tie:.1%} (every candidate not "
              f"simulated breaks a rule, is over budget or is provably slower than the top {args.top})")
    if args.output:
        split = res.best_plan.spec.layer_split if res.best_plan is not None else None
        print(f"wrote {args.output} (#1, layer split {split})" if res.best_plan is not None
              else f"not written: {args.output} ({'no plan found before the time limit' if not res.proven else 'no plan fits'})")
        if res.best_plan is not None:
            cycle = rendezvous_cycle(res.best_plan)
            if cycle:
                print(f"note: #1 runs on gloo, but when sends block until their receive is posted (NCCL, large "
                      f"messages) it can hang: {cycle}; see `slimpipe check {args.output} --p2p rendezvous`")
    if args.plot:
        print(f"wrote {args.plot}")
    return 0 if res.top else 1


def register(sub) -> None:
    example = "slimpipe tune --model llama-70b --seq-len 524288 --gpus 256 --memory-budget 80GiB -o best.json"
    p = add_parser(sub, "tune", "search the best plan that fits a memory budget (highest simulated tokens/s)",
                   example)
    p.epilog = SPACE_HELP + example
    add_model_args(p)
    p.add_argument("--gpus", type=positive_int, required=True, help="GPUs in all: tp * cp * p * dp")
    p.add_argument("--memory-budget", help="memory per GPU with a unit, e.g. 80GiB or 85.9GB (default: the device "
                   "profile's)")
    p.add_argument("--global-batch", type=positive_int, help="sequences per step (default: 4M tokens, at most one per GPU, "
                   "a power of two)")
    p.add_argument("--device-profile", help="h100 (default), a100, or a JSON file")
    p.add_argument("--dtype", help=DTYPE_HELP)
    p.add_argument("--schedules", help=f"comma-separated families to search (default all: {','.join(schedules.FAMILIES)})")
    p.add_argument("--tp", help="comma-separated tp degrees (default 1,2,4,8)")
    p.add_argument("--cp", help="comma-separated cp degrees (default 1,2,4,8)")
    p.add_argument("--pp", help="comma-separated pipeline sizes (default: every divisor)")
    p.add_argument("--slices", help=f"comma-separated n for {_names(_SLICED).replace(', ', '/')} (default 2,4,8,16,32)")
    p.add_argument("--virtual-stages", help="comma-separated v (default 1,2,3,4,5,6,8,10)")
    p.add_argument("--layer-split", help="comma-separated layer splits (default uniform,balanced: balanced where it "
                   "differs from uniform)")
    p.add_argument("--top", type=positive_int, default=5, help="plans to list (default 5)")
    p.add_argument("--time-limit", type=limit_seconds, default=120.0,
                   help="seconds before the search stops and reports what is left (default 120; 0 = none)")
    p.add_argument("--json", action="store_true", help="machine-readable output with the Pareto front and counts")
    p.add_argument("-o", "--output", help="write the best plan here (atomically)")
    add_plan_format_arg(p)
    p.add_argument("--plot", help="draw the Pareto front (throughput vs peak memory): .png, .svg or .pdf; needs "
                   "slimpipe[plot]")
    p.set_defaults(run=run)
