"""The `slimpipe` command line. Each subcommand lives in its own module with `register(sub)`;
every user error becomes one line on stderr and exit code 2 (1 for an invalid plan)."""
from __future__ import annotations

import argparse
import os
import sys

from ir import SlimpipeError
from ir.options import glue_negative_values, reopen_closed_streams

from ir.version import version
from . import (cmd_check, cmd_compare, cmd_compile, cmd_export, cmd_import, cmd_plot, cmd_profile, cmd_show, cmd_simulate,
               cmd_trace, cmd_tune)

COMMANDS = [cmd_compile, cmd_check, cmd_simulate, cmd_show, cmd_trace, cmd_plot, cmd_compare, cmd_tune, cmd_import, cmd_export,
            cmd_profile]

EPILOG = """example (the README's main job: profile this machine, compile, check, simulate, run on 4 ranks with the
reference check and a measured trace, compare):
  slimpipe profile --model tiny -o cpu.json
  slimpipe compile --schedule slimpipe --pp 4 --microbatches 4 --slices 8 --model tiny --seq-len 256 --device-profile cpu.json -o plan.json
  slimpipe check plan.json && slimpipe simulate plan.json && slimpipe show plan.json
  torchrun --nproc-per-node 4 -m executor plan.json --steps 4 --check-reference --trace measured.json
  slimpipe simulate plan.json --against measured.json"""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) that point at --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> Parser:
    parser = Parser(prog="slimpipe", description="Compile, check, simulate and show pipeline-parallel "
                    "training schedules for long-context language models.", epilog=EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"slimpipe {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for cmd in COMMANDS:
        cmd.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(glue_negative_values(argv))
    except SystemExit as e:  # --help, or a value an option's type refused (one line already printed)
        return e.code
    try:
        return args.run(args) or 0
    except SlimpipeError as e:
        msg = " ".join(str(e).splitlines())  # one line, whatever text a hostile input put in it
        print(f"slimpipe {args.command}: error: {msg}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"slimpipe {args.command}: interrupted", file=sys.stderr)
        return 130
    except (MemoryError, OverflowError) as e:
        # a size no option check bounds (--microbatches 10**10: a plan of 10**11 instructions; a
        # number past what a C integer holds): one line naming why, not a traceback
        why = "ran out of memory" if isinstance(e, MemoryError) else f"a number is too large ({e})"
        print(f"slimpipe {args.command}: error: {why}: the sizes asked for are too large for this machine; "
              f"choose smaller ones", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader left (`slimpipe check plan.json | head -1`): the output, and with it the verdict,
        # did not reach it; exit as a process ended by SIGPIPE does (128 + 13), never 0, so that
        # `set -o pipefail` does not pass a plan whose verdict was cut off
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        except OSError:
            pass
        return 141
    except OSError as e:
        # a write or read the command did not turn into a SlimpipeError: stdout on a full disk (with
        # unbuffered output the print itself fails), or a file system refusing a path. One line, as
        # for any other error: 2 when it names a path (an input), 120 otherwise (the output; Python's
        # own exit code for output it could not flush)
        where = f" ({e.filename})" if e.filename else ""
        try:
            print(f"slimpipe {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        except OSError:  # stderr cannot be written either
            pass
        return 2 if e.filename else 120


def entry() -> None:
    """The `slimpipe` console script and `python -m compiler.cli`: main(), then the process ends
    without freeing its heap object by object (os._exit after flushing stdout and stderr): a
    1.6M-instruction plan is some 3M Python objects, 0.2-0.3 s of teardown that nobody waits
    for. Every file a command writes is complete before main returns (ir.atomic_write), and no
    command registers exit handlers. Output that cannot be written at the end (the reader left:
    141, as in main; a full disk: one line and 120, Python's own code for it) is not a success.
    An exception main lets through ends the process as usual. A stream the process was started
    with closed goes to /dev/null (Python leaves it None, and print(file=None) writes to stdout:
    an error line would land in the command's output)."""
    reopen_closed_streams()
    code = main()
    code = 0 if code is None else code if isinstance(code, int) else 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:  # the reader left before the last lines (see main)
            code = code or 141
        except OSError as e:
            if code == 0:
                code = 120
            try:
                os.write(2, f"slimpipe: error: cannot write the output: {e.strerror or e}\n".encode())
            except OSError:
                pass
    os._exit(code)


if __name__ == "__main__":
    entry()
