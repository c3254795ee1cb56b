"""Helpers shared by the subcommands."""
from __future__ import annotations

import argparse
import json
import os
import sys

from ir import Plan, SpecError, load


def add_parser(sub, name: str, help: str, example: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, epilog=f"example:\n  {example}",
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def load_plan(path: str) -> Plan:
    return load(path)


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


def check_output_path(path: str) -> None:
    """Fail before any work if the output cannot be written where asked."""
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise SpecError(f"-o {path!r}: directory {d!r} does not exist; create it or choose another path")
    if os.path.isdir(path):
        raise SpecError(f"-o {path!r} is a directory; give a file path such as plan.json")


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    return v


def add_render_args(p, output_help: str) -> None:
    """Arguments shared by the commands that render a simulated plan (trace, plot)."""
    p.add_argument("plan")
    p.add_argument("-o", "--output", required=True, help=output_help)
    p.add_argument("--device-profile", help="h100 (default), a100, or a JSON file")
    p.add_argument("--unit-costs", action="store_true", help="F=1, B=2, communication free")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
