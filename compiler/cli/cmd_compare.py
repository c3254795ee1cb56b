"""slimpipe compare: every schedule family (at its best n, v) on one model, context and cluster."""
from __future__ import annotations

import re

from ir import SlimpipeError, SpecError
from passes.costs import GIB, load_profile
from passes.partition import flops_partition

from .. import schedules
from ..layout import build_spec
from ..search import evaluate
from .cmd_compile import add_model_args, model_from_args
from .common import BYTE_UNITS, TIME_UNITS, add_parser, emit_json, fit_unit, human_bytes, positive_int

_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2 ** 10, "mib": 2 ** 20,
          "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(text: str, flag: str = "--memory-budget") -> float:
    """'80GiB', '80GB', '8.5e10B' -> bytes. A unit is required: a bare '80' is refused rather than
    read as 80 bytes (or silently as GiB)."""
    units = "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
    mt = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+]?[0-9]+)?)\s*([a-zA-Z]*)\s*", text or "")
    if mt and not mt.group(2):
        raise SpecError(f"{flag} {text!r} has no unit; write it with one, e.g. {mt.group(1)}GiB "
                        f"(GiB = 2^30 bytes; allowed units: {units})")
    if not mt or mt.group(2).lower() not in _UNITS or float(mt.group(1)) <= 0:
        raise SpecError(f"{flag} {text!r} is not a size; allowed: a positive number with a unit "
                        f"({units}), e.g. 80GiB")
    return float(mt.group(1)) * _UNITS[mt.group(2).lower()]


def candidates(args, layers: int):
    """(family, n, v) combinations worth simulating: each family record's compare choices."""
    p, m = args.pp, args.microbatches
    vs = [v for v in (1, 2, 4) if layers >= p * v]
    for fam in schedules.FAMILIES.values():
        if fam.compare is not None:
            for n, v in fam.compare(p, m, vs):
                yield fam.name, n, v


def best_per_family(args, model, seq, profile, budget):
    rows = []
    for fam, n, v in candidates(args, model.layers):
        record = schedules.get(fam)
        extra = dict(tp=args.tp, cp=args.cp, dp=args.dp)
        if n > 1 and record.compare_partition == "flops":
            extra.update(partition="flops", slice_lens=tuple(flops_partition(model, seq, n)))
        elif n > 1 and seq % n:
            continue
        if record.exchange_default(n):
            extra["exchange"] = True
        try:
            spec = build_spec(fam, model, pp=args.pp, microbatches=args.microbatches, slices=n, virtual_stages=v,
                              seq_len=seq, **extra)
            row, _plan = evaluate(spec, profile)
        except SlimpipeError:
            continue
        rows.append({"schedule": fam, "slices": n, "virtual_stages": v, **row,
                     "oom": row["peak_memory_bytes"] > budget})
    best = {}
    for row in rows:
        cur = best.get(row["schedule"])
        key = (row["oom"], row["step_s"] if not row["oom"] else row["peak_memory_bytes"])
        if cur is None or key < (cur["oom"], cur["step_s"] if not cur["oom"] else cur["peak_memory_bytes"]):
            best[row["schedule"]] = row
    order = list(schedules.FAMILIES)
    return [best[f] for f in order if f in best], len(rows)


def run(args) -> int:
    if args.microbatches is None:
        args.microbatches = args.pp
    profile = load_profile(args.device_profile)
    budget = parse_bytes(args.memory_budget) if args.memory_budget else profile.memory_bytes
    model, seq = model_from_args(args)
    if model.heads % args.tp:
        raise SpecError(f"--tp {args.tp} must divide the model's {model.heads} attention heads")
    table, tried = best_per_family(args, model, seq, profile, budget)
    if args.json:
        emit_json({"model": model.name, "seq_len": seq, "pp": args.pp, "microbatches": args.microbatches,
                   "tp": args.tp, "cp": args.cp, "dp": args.dp, "device_profile": profile.name,
                   "memory_budget_bytes": budget, "configurations_tried": tried, "rows": table})
        return 0
    print(f"{model.name}, seq {seq}, pp={args.pp} m={args.microbatches} tp={args.tp} cp={args.cp} dp={args.dp} on "
          f"{profile.name}; budget {human_bytes(budget)}; best n, v per family of {tried} configurations")
    tu, ts = fit_unit([r["step_s"] for r in table], TIME_UNITS)
    mu, ms = fit_unit([r["peak_memory_bytes"] for r in table], BYTE_UNITS)
    print(f"{'schedule':<17}{'n':>4}{'v':>3}{'step ' + tu:>10}{'bubble':>9}{'peak ' + mu:>10}{'tokens/s':>11}{'MFU':>7}")
    for r in table:
        print(f"{r['schedule']:<17}{r['slices']:>4}{r['virtual_stages']:>3}{r['step_s'] / ts:>10.3f}"
              f"{r['bubble_fraction']:>8.2%} {r['peak_memory_bytes'] / ms:>9.1f}{r['tokens_per_s']:>11.0f}"
              f"{r['mfu']:>6.1%}" + ("  OOM" if r["oom"] else ""))
    return 0


def register(sub) -> None:
    p = add_parser(sub, "compare", "compare the schedule families (each at its best n, v): step time, bubble, "
                   "peak memory, tokens/s, OOM against a memory budget",
                   "slimpipe compare --model llama-70b --seq-len 524288 --pp 16 --tp 8 --cp 4 --memory-budget 80GiB")
    add_model_args(p)
    p.add_argument("--pp", type=positive_int, required=True, help="pipeline ranks p")
    p.add_argument("--microbatches", type=positive_int, help="micro-batches m per step (default: pp)")
    p.add_argument("--tp", type=positive_int, default=1, help="tensor parallel degree (default 1)")
    p.add_argument("--cp", type=positive_int, default=1, help="context parallel degree (default 1)")
    p.add_argument("--dp", type=positive_int, default=1, help="data parallel degree (default 1)")
    p.add_argument("--memory-budget", help="memory per GPU with a unit, e.g. 80GiB or 85.9GB (default: the device "
                   "profile's)")
    p.add_argument("--device-profile", help="h100 (default), a100, or a JSON file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)
