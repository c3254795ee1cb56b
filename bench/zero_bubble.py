"""Zero-bubble schedules at long and short context (issue 10): step time, bubble and peak memory
of 1f1b, interleaved-zb, zb-v (whole sequence and sliced), seq1f1b (flops slices) and slimpipe
(with the KV exchange, with and without --split-backward; both again without the exchange) under
the cost and memory models with the h100 device profile, to test the SlimPipe paper's claim that zero-bubble V schedules lose
their advantage at long context, where attention dominates.

Cases (every row of a case shares model, sequence, p, tp, m):
- llama-70b, 512K tokens, p = 8, tp = 8, m = 1 and m = 4, n = 32 for the sliced rows (the SlimPipe
  headline model and context; exchange.py's layout);
- llama-7b, 4K tokens, p = 8, tp = 1, m = 16, n = 4 for the sliced rows: the context the zero-bubble
  paper trains at (1K-4K), the same pipeline depth as the 512K case (so the same p - 1 fill),
  m = 2p micro-batches so that the zero-bubble families reach their steady state, 4 layers per
  stage; n = 4 (1K-token slices, Seq1F1B's usual n) because the h100 profile prices a matmul at a
  fixed fraction of peak whatever its size, which would flatter 128-token slices (n = 32).

Every row goes through the command line's own code: the argument list of `slimpipe compile` is
parsed by its parser (compiler.cli.build_parser), turned into a spec by cmd_compile.spec_from_args
and compiled by compile_plan(spec, h100); then what `slimpipe simulate plan.json --json` does
(require_valid without the deadlock search, simulate_timed with the plan's profile, bf16).
A configuration the command line refuses is recorded with the line `slimpipe compile` prints
(`refused`), not dropped. Each row also carries the unit-cost replay (F = I = W = 1, B = 2;
`slimpipe simulate --unit-costs` on the plan without its KV-exchange instructions; as compiled,
with them, in `unit_cost_as_compiled`): where the zero-bubble families are "zero bubble".
`unit_times` per case: a middle stage's forward, input-gradient (I) and weight-gradient (W) seconds
for the whole sequence and for the first and last uniform slice, and attention's share of the
forward: the paper's argument in numbers (attention has no W half).

    PYTHONPATH=. python bench/zero_bubble.py            # records bench/results/zero_bubble.json
    PYTHONPATH=. python bench/zero_bubble.py --table    # the README's tables from the recorded JSON
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.machine import commit_of  # noqa: E402
from compiler import compile_plan  # noqa: E402
from compiler.cli import build_parser  # noqa: E402
from compiler.cli.cmd_compile import spec_from_args  # noqa: E402
from compiler.cli.common import plan_profile  # noqa: E402
from ir import Kind, SlimpipeError, atomic_write  # noqa: E402
from passes import require_valid, simulate_units  # noqa: E402
from passes.costs import GIB, CostModel, load_profile, unit_parts  # noqa: E402
from passes.simulate import simulate_timed, strip_exchanges  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results", "zero_bubble.json")
PROFILE = "h100"

CASES = [
    dict(case="llama-70b 512K m=1", model="llama-70b", seq_len=524288, pp=8, tp=8, microbatches=1, slices=32),
    dict(case="llama-70b 512K m=4", model="llama-70b", seq_len=524288, pp=8, tp=8, microbatches=4, slices=32),
    dict(case="llama-7b 4K m=16", model="llama-7b", seq_len=4096, pp=8, tp=1, microbatches=16, slices=4),
]
# (row label, the schedule's flags for `slimpipe compile`; {n} = the case's slices)
ROWS = [
    ("1f1b", "--schedule 1f1b"),
    ("1f1b sliced", "--schedule 1f1b --slices {n}"),
    ("interleaved-zb", "--schedule interleaved-zb --virtual-stages 2"),
    ("interleaved-zb sliced", "--schedule interleaved-zb --virtual-stages 2 --slices {n}"),
    ("zb-v", "--schedule zb-v"),
    ("zb-v sliced", "--schedule zb-v --slices {n}"),
    ("seq1f1b flops", "--schedule seq1f1b --slices {n} --partition flops"),
    ("slimpipe", "--schedule slimpipe --slices {n} --exchange"),
    ("slimpipe split-backward", "--schedule slimpipe --slices {n} --exchange --split-backward"),
    # the same two without the KV exchange: what the exchange buys (at 4K it costs; see the README)
    ("slimpipe no-exchange", "--schedule slimpipe --slices {n} --no-exchange"),
    ("slimpipe split-backward no-exchange", "--schedule slimpipe --slices {n} --no-exchange --split-backward"),
]


def compile_argv(case: dict, flags: str) -> list[str]:
    return (["compile", "--model", case["model"], "--seq-len", str(case["seq_len"]), "--pp", str(case["pp"]),
             "--tp", str(case["tp"]), "--microbatches", str(case["microbatches"])]
            + shlex.split(flags.format(n=case["slices"])) + ["--device-profile", PROFILE, "-o", "plan.json"])


def parse(argv: list[str]):
    """(args, None) from the command line's parser, or (None, the line it prints) when it refuses."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(argv), None
    except SystemExit:
        return None, err.getvalue().strip()


def run_row(case: dict, label: str, flags: str) -> dict:
    argv = compile_argv(case, flags)
    row = {"row": label, "command": "slimpipe " + " ".join(argv) + " && slimpipe simulate plan.json --json"}
    args, refusal = parse(argv)
    if args is None:
        return {**row, "refused": refusal}
    try:
        spec = spec_from_args(args)
        plan = compile_plan(spec, load_profile(args.device_profile))
    except SlimpipeError as e:
        return {**row, "refused": f"slimpipe compile: error: {' '.join(str(e).splitlines())}"}
    require_valid(plan, "not simulated", deadlock=False)  # as `slimpipe simulate` does
    prof = plan_profile(None, plan)  # the profile the plan was compiled for (h100)
    out = simulate_timed(plan, prof, 2)
    # the schedule's own unit-cost replay: without the KV-exchange instructions (their rendezvous were
    # placed for the h100 unit times; under unit costs they only hold paired units back)
    units = simulate_units(strip_exchanges(plan))
    peaks = [r["peak_memory_bytes"] for r in out["ranks"]]
    top = max(range(len(peaks)), key=peaks.__getitem__)
    return {**row, "schedule": spec.schedule, "slices": spec.slices, "virtual_stages": spec.virtual_stages,
            "placement": [list(ch) for ch in spec.placement[:1]], "partition": spec.partition,
            "slice_lens": [spec.slice_lens[0][0], spec.slice_lens[0][-1]], "exchange": spec.exchange,
            "split_backward": any(ins.kind == Kind.I for ins in plan.ranks[0]),
            "exchanges": plan.meta.get("exchanges", 0), "instructions": plan.num_instructions(),
            "step_s": out["step_s"], "bubble_fraction": out["bubble_fraction"],
            "bubble_breakdown": out["bubble_breakdown"], "mfu": out["mfu"], "tokens_per_s": out["tokens_per_s"],
            "peak_memory_gib": peaks[top] / GIB, "peak_rank": top,
            "peak_breakdown_gib": {k: v / GIB for k, v in out["ranks"][top]["memory_breakdown"].items()},
            "peak_memory_gib_per_rank": [p / GIB for p in peaks],
            "fits_memory": peaks[top] <= prof.memory_bytes,
            "unit_cost": {"makespan": units["makespan"], "bubble_fraction": units["bubble_fraction"]},
            **({"unit_cost_as_compiled": {k: v for k, v in simulate_units(plan).items() if k != "ranks"}}
               if spec.exchange else {})}


def unit_times(case: dict) -> dict:
    """Seconds of a middle stage's F, I and W (and attention's share of F): whole sequence, first
    and last of n uniform slices. Stage 1 of a plain p-stage split (no embedding, no LM head)."""
    args, _ = parse(compile_argv(case, "--schedule 1f1b"))
    spec = spec_from_args(args)
    prof = load_profile(PROFILE)
    layers = spec.stage_layers[1]
    S, n = case["seq_len"], case["slices"]
    out = {"stage_layers": layers}
    for name, s, prefix in (("whole", S, 0), ("first_slice", S // n, 0), ("last_slice", S // n, S - S // n)):
        t = {}
        for k, cls in (("F", "forward"), ("I", "backward_input"), ("W", "backward_weight")):
            t[k] = CostModel(spec, prof).unit_time_of(1, s, (prefix,) if prefix else (), cls)
        mm, attn, _ring, tpc = unit_parts(spec.model, s, prefix, "forward", spec.tp, spec.cp, prof, layers=layers)
        t["attention_share_of_F"] = attn / (mm + attn + tpc)
        t["W_share"] = t["W"] / (t["F"] + t["I"] + t["W"])  # 1/3 at unit costs
        out[name] = {"tokens": s, "prefix": prefix, **t}
    return out


def verdict(cases: list[dict]) -> list[dict]:
    """Per case: zb-v's best row (whole or sliced) against slimpipe and 1f1b."""
    out = []
    for c in cases:
        rows = {r["row"]: r for r in c["rows"] if "step_s" in r}
        zbv = min((rows[k] for k in ("zb-v", "zb-v sliced") if k in rows), key=lambda r: r["step_s"])
        d = {"case": c["case"], "zb_v_best": zbv["row"], "zb_v_step_s": zbv["step_s"]}
        for other in ("1f1b", "slimpipe", "slimpipe split-backward"):
            if other in rows:
                d[f"zb_v_over_{other.replace(' ', '_').replace('-', '_')}"] = zbv["step_s"] / rows[other]["step_s"]
        fastest = min(rows.values(), key=lambda r: r["step_s"])
        d["fastest"], d["fastest_step_s"] = fastest["row"], fastest["step_s"]
        # the split backward inside one schedule: step saved by slimpipe --split-backward
        for tag, a, b in (("exchange", "slimpipe", "slimpipe split-backward"),
                          ("no_exchange", "slimpipe no-exchange", "slimpipe split-backward no-exchange")):
            if a in rows and b in rows:
                d[f"split_backward_saves_{tag}"] = 1 - rows[b]["step_s"] / rows[a]["step_s"]
        d["zb_v_unit_cost_bubble"] = zbv["unit_cost"]["bubble_fraction"]
        d["zb_v_bubble"] = zbv["bubble_fraction"]
        out.append(d)
    return out


def run(cases=CASES) -> dict:
    res = {"bench": "zero_bubble", "device_profile": PROFILE, "dtype": "bf16", "commit": commit_of(),
           "method": "slimpipe compile (its parser, spec_from_args, compile_plan with the h100 profile) + what "
                     "`slimpipe simulate --json` does; peak memory = the largest rank's peak (memory model, fused "
                     "saves); unit_cost = `slimpipe simulate --unit-costs` (F = I = W = 1, B = 2)",
           "cases": []}
    for case in cases:
        c = {**case, "rows": [], "unit_times": unit_times(case)}
        for label, flags in ROWS:
            r = run_row(case, label, flags)
            c["rows"].append(r)
            if "refused" in r:
                print(f"{case['case']:<20} {label:<24} refused: {r['refused']}", file=sys.stderr)
            else:
                print(f"{case['case']:<20} {label:<24} step {r['step_s']:9.3f} s  bubble {r['bubble_fraction']:7.2%}  "
                      f"(unit cost {r['unit_cost']['bubble_fraction']:6.2%})  peak {r['peak_memory_gib']:6.1f} GiB "
                      f"(rank {r['peak_rank']})", file=sys.stderr)
        res["cases"].append(c)
    res["verdict"] = verdict(res["cases"])
    return res


def table(res: dict) -> str:
    """Markdown: one row per schedule, one column per case (step, bubble with the unit-cost bubble
    beside it, peak GiB of the fullest rank); the refusal lines under it; then the F/I/W times."""
    cases = res["cases"]
    head = ["schedule"] + [f"{c['case']} (n={c['slices']})" for c in cases]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    refusals: list[str] = []
    for i, label in enumerate(r["row"] for r in cases[0]["rows"]):
        cells = [label]
        for c in cases:
            r = c["rows"][i]
            if "refused" in r:
                if r["refused"] not in refusals:
                    refusals.append(r["refused"])
                cells.append(f"refused ({refusals.index(r['refused']) + 1})")
                continue
            step = f"{r['step_s']:.3f}" if r["step_s"] < 10 else f"{r['step_s']:.1f}"
            cells.append(f"{step} s, {r['bubble_fraction']:.1%} ({r['unit_cost']['bubble_fraction']:.1%}), "
                         f"{r['peak_memory_gib']:.1f} GiB")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"({k}) `{line}`" + ("  " if k < len(refusals) else "") for k, line in enumerate(refusals, 1)]
    lines.append("")
    lines += ["A middle stage's unit times (stage 1), seconds: F, I, W; attention's share of F; W's share of "
              "F + I + W (1/3 at unit costs):", "",
              "| model, context | piece | tokens | F | I | W | attention share of F | W share |",
              "|---|---|---|---|---|---|---|---|"]
    seen = set()
    for c in res["cases"]:
        key = (c["model"], c["seq_len"], c["pp"], c["tp"], c["slices"])
        if key in seen:  # the same model, context and layout: the same units
            continue
        seen.add(key)
        S = c["seq_len"]
        name = f"{c['model']} {S // 1024}K" if S % 1024 == 0 else f"{c['model']} {S} tokens"
        for piece in ("whole", "first_slice", "last_slice"):
            u = c["unit_times"][piece]
            lines.append(f"| {name} | {piece.replace('_', ' ')} | {u['tokens']} | {u['F']:.4g} | {u['I']:.4g} | "
                         f"{u['W']:.4g} | {u['attention_share_of_F']:.1%} | {u['W_share']:.1%} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", action="store_true", help="print the README tables from the recorded JSON and exit")
    a = ap.parse_args()
    if a.table:
        with open(RESULTS) as f:
            print(table(json.load(f)))
        return
    res = run()
    text = json.dumps(res, indent=1)
    print(text)
    atomic_write(RESULTS, text + "\n")


if __name__ == "__main__":
    main()
