"""Helpers shared by the subcommands."""
from __future__ import annotations

import argparse
import json
import os
import sys

from ir import Plan, PlanFormatError, SpecError, check_writable, load, save
from ir.options import limit_seconds, nonneg_float, nonneg_int, positive_float, positive_int  # noqa: F401 (the commands' option types)

from .. import schedules
from ..models import PRESETS


def add_parser(sub, name: str, help: str, example: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, epilog=f"example:\n  {example}",
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def load_plan(path: str) -> Plan:
    """A plan file, or a torch.distributed.pipelining schedule CSV (*.csv) imported on the fly
    with the default model (compiler.torchcsv)."""
    if path.lower().endswith(".csv"):
        from ..torchcsv import import_csv

        plan = import_csv(path)  # the tiny model, its layers raised to one per stage where it has fewer: say so
        own = PRESETS["tiny"]["layers"]
        if plan.spec.model.layers > own:
            print(f"note: {path} has {plan.spec.num_stages} stages, more than the tiny model's {own} layers: read with "
                  f"tiny's layers raised to {plan.spec.model.layers} (one per stage); `slimpipe import` with --model or "
                  f"--layers chooses the model", file=sys.stderr)
        return plan
    return load(path)


def dtype_bytes_arg(text: str) -> int:
    """--dtype's bytes per element (passes.costs.DTYPE_BYTES); SpecError naming what is allowed."""
    from passes.costs import DTYPE_BYTES

    if text not in DTYPE_BYTES:
        raise SpecError(f"--dtype {text!r} is unknown; allowed: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[text]


def chosen_dtype(arg: str | None, profile, fallback: str = "bf16") -> tuple[str, int]:
    """(name, bytes) the cost model sizes memory and messages with: --dtype when given, else the
    dtype a measured profile was measured in (passes.costs.profile_dtype), else `fallback`."""
    from passes.costs import profile_dtype

    name = arg or profile_dtype(profile) or fallback
    return name, dtype_bytes_arg(name)


DTYPE_HELP = ("activation/parameter dtype of the memory and message-size model: bf16 (a GPU training run), fp16, "
              "fp32 (what `python -m executor` runs by default). Default: the dtype a measured --device-profile was "
              "measured in, else bf16")


def emit_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=1)
    sys.stdout.write("\n")


def report(args, summary: dict, line: str) -> int:
    """The command's result: `summary` as JSON with --json, else one human line. Exit code 0."""
    if getattr(args, "json", False):
        emit_json(summary)
    else:
        print(line)
    return 0


def check_output_path(path: str, source: str | None = None) -> None:
    """Fail before any work if the output cannot be written where asked, or (`source`: the file
    the command reads) would replace its own input."""
    if not path:
        raise SpecError("-o '': give a file path such as plan.json")
    d = os.path.dirname(os.path.abspath(path))
    if os.path.exists(d) and not os.path.isdir(d):
        raise SpecError(f"-o {path!r}: {d!r} is a file, not a directory; choose another path")
    if not os.path.isdir(d):
        raise SpecError(f"-o {path!r}: directory {d!r} does not exist; create it or choose another path")
    if os.path.isdir(path):
        raise SpecError(f"-o {path!r} is a directory; give a file path such as plan.json")
    try:
        same = source is not None and os.path.samefile(path, source)
    except OSError:  # either one missing: not the same file (a missing input is reported when it is read)
        same = False
    if same:
        raise SpecError(f"-o {path!r} is the file this command reads ({source!r}); give another output path")
    check_writable(path)  # a directory no file can be made in (read-only, /proc): said now, not after the work


PLAN_FORMATS = {"auto": None, "text": False, "compact": True}


def add_plan_format_arg(p) -> None:
    """--plan-format: how a written plan holds its instructions (ir.dumps)."""
    p.add_argument("--plan-format", choices=PLAN_FORMATS, default="auto",
                   help="instructions as texts (schema_version 1: any slimpipe reads it, edit by hand), compact "
                        "(schema_version 2: smaller, loads faster) or auto: compact from 100,000 instructions "
                        "(default auto)")


def save_plan(plan: Plan, path: str, fmt: str = "auto") -> None:
    """Write `plan` atomically in the --plan-format `fmt`."""
    save(plan, path, PLAN_FORMATS[fmt])


# ---------------------------------------------------------------- units that fit the numbers

BYTE_UNITS = (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10), ("B", 1))
TIME_UNITS = (("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9))


def fit_unit(values, units) -> tuple[str, float]:
    """(name, size) of the largest unit the biggest of `values` reaches (so a column of tiny
    figures reads 40.2 us, not 0.000 s); the smallest unit when all are smaller."""
    top = max((abs(v) for v in values), default=0.0)
    for name, size in units:
        if top >= size:
            return name, size
    return units[-1]


def human_bytes(n: float) -> str:
    """1536 -> '1.50 KiB'; GiB for anything a GPU holds, smaller units for toy models."""
    name, size = fit_unit([n], BYTE_UNITS)
    return f"{n:.0f} B" if name == "B" else f"{n / size:.2f} {name}"


def human_time(t: float) -> str:
    """0.0000402 -> '40.2 us'; 19.6 -> '19.6 s'."""
    name, size = fit_unit([t], TIME_UNITS)
    return f"{t / size:.4g} {name}"


def render_profile(args):
    """The device profile of trace/plot: None with --unit-costs (which takes no profile)."""
    from passes.costs import load_profile

    if args.unit_costs:
        if args.device_profile is not None:
            raise SpecError("--unit-costs takes no --device-profile (forward 1, backward 2, communication free)")
        return None
    return load_profile(args.device_profile)


def plan_profile(arg: str | None, plan: Plan):
    """The device profile to price `plan` with: --device-profile when given, else the one the plan
    was compiled for (plan.meta), else h100."""
    from passes.costs import PROFILES, load_profile, profile_from_dict

    if arg is not None:
        return load_profile(arg)
    rec = plan.meta.get("device_profile_fields")
    if rec is not None:
        try:
            return profile_from_dict(rec, plan.meta.get("device_profile", "plan"),
                                     "the plan's meta.device_profile_fields")
        except SpecError as e:
            raise PlanFormatError(f"{e}; give --device-profile") from None
    name = plan.meta.get("device_profile")
    if name is None:
        return load_profile(None)
    if name not in PROFILES:  # pricing it on h100 instead would be a silent wrong answer
        raise PlanFormatError(f"the plan was compiled for device profile {name!r}, which is not built in, and it "
                              f"carries no meta.device_profile_fields; give --device-profile (the profile's JSON file, "
                              f"or one of {', '.join(PROFILES)})")
    return PROFILES[name]


def add_render_args(p, output_help: str) -> None:
    """Arguments shared by the commands that render a simulated plan (trace, plot)."""
    p.add_argument("plan")
    p.add_argument("-o", "--output", required=True, help=output_help)
    p.add_argument("--device-profile", help="h100, a100, or a JSON file (default: the profile the plan was "
                   "compiled for, else h100)")
    p.add_argument("--unit-costs", action="store_true", help="F=1, B=2, communication free")
    p.add_argument("--json", action="store_true", help="print a JSON summary")


def families_arg(text: str) -> tuple[str, ...]:
    """--schedules 'a,b' -> the named families in the family table's order; SpecError naming an
    unknown one and what is allowed."""
    names = [s.strip() for s in text.split(",")]
    for nm in names:
        if nm not in schedules.FAMILIES:
            raise SpecError(f"--schedules {text!r}: {nm!r} is unknown; allowed: {', '.join(schedules.FAMILIES)}")
    return tuple(f for f in schedules.FAMILIES if f in names)


def exchanges_phrase(k: int) -> str:
    """'1 KV exchange', '3 KV exchanges'."""
    return f"{k} KV exchange" + ("" if k == 1 else "s")
