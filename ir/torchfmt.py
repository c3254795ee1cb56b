"""torch.distributed.pipelining's schedule text: one CSV row per rank, one action per cell.

Action grammar (torch's `_Action.__repr__` / `from_str`, torch 2.13):

    {stage}{type}{microbatch}   type F, I, W, B, SEND_F, RECV_F, SEND_B, RECV_B   e.g. 2F0, 1SEND_B3
    {stage}{type}               type UNSHARD, RESHARD, REDUCE_GRAD (no micro-batch) e.g. 0REDUCE_GRAD
    (a;b)OVERLAP_F_B            a forward and a backward that run together
    (empty cell)                an idle step

Parsing is strict where torch's is lax (its regex accepts '2F' or '2Ffoo'): every cell is either
empty or exactly one action; errors name the rank (row) and the step (column).
"""
from __future__ import annotations

import csv
import io
import re
from typing import NamedTuple

from .errors import PlanFormatError
from .limits import file_or_pipe
from .instr import _clip

COMPUTE_TYPES = ("F", "I", "W", "B")
COMM_TYPES = ("SEND_F", "RECV_F", "SEND_B", "RECV_B")
STAGE_TYPES = ("UNSHARD", "RESHARD", "REDUCE_GRAD")  # carry a stage only
OVERLAP = "OVERLAP_F_B"
_ONE = re.compile(r"([0-9]{1,9})(SEND_F|RECV_F|SEND_B|RECV_B|UNSHARD|RESHARD|REDUCE_GRAD|F|I|W|B)([0-9]{0,9})")


class Action(NamedTuple):
    """One cell. `mb` is -1 for the stage-only types; `parts` holds the sub-actions of OVERLAP_F_B."""

    stage: int
    type: str
    mb: int = -1
    parts: tuple = ()

    def __str__(self) -> str:
        if self.type == OVERLAP:
            return "(" + ";".join(map(str, self.parts)) + ")" + OVERLAP
        return f"{self.stage}{self.type}{'' if self.mb < 0 else self.mb}"


def parse_action(text: str, where: str = "") -> Action | None:
    """A cell's action, or None for an empty cell. PlanFormatError names `where` and what is allowed."""
    t = text.strip()
    if not t:
        return None
    if t.startswith("("):
        close = t.find(")")
        if close < 0 or t[close + 1:] != OVERLAP:
            raise PlanFormatError(f"{where}action {_clip(t)}: a combined action is written '(0F3;3B1){OVERLAP}'")
        parts = tuple(parse_action(s, where) for s in t[1:close].split(";"))
        if len(parts) != 2 or None in parts or any(p.type not in COMPUTE_TYPES for p in parts):
            raise PlanFormatError(f"{where}action {_clip(t)}: {OVERLAP} combines two compute actions (F, I, W, B), "
                                  f"e.g. '(0F3;3B1){OVERLAP}'")
        return Action(-1, OVERLAP, -1, parts)
    m = _ONE.fullmatch(t)
    if m is None:
        raise PlanFormatError(f"{where}action {_clip(t)} is not torch's '{{stage}}{{type}}{{microbatch}}' (e.g. 2F0, "
                              f"1SEND_B3, 0REDUCE_GRAD, (0F3;3B1){OVERLAP}); types: "
                              f"{', '.join(COMPUTE_TYPES + COMM_TYPES + STAGE_TYPES)}")
    stage, typ, mb = m.groups()
    if typ in STAGE_TYPES:
        if mb:
            raise PlanFormatError(f"{where}action {_clip(t)}: {typ} takes a stage only (e.g. 0{typ})")
        return Action(int(stage), typ)
    if not mb:
        raise PlanFormatError(f"{where}action {_clip(t)}: {typ} needs a micro-batch index (e.g. {stage}{typ}0)")
    return Action(int(stage), typ, int(mb))


def read_rows(text: str) -> list[list[str]]:
    """The CSV's cells, one list per rank (trailing blank lines dropped)."""
    try:
        rows = list(csv.reader(io.StringIO(text)))
    except csv.Error as e:
        raise PlanFormatError(f"not a readable CSV file: {e}") from None
    while rows and not any(c.strip() for c in rows[-1]):
        rows.pop()
    if not rows:
        raise PlanFormatError("the CSV file holds no schedule (expected one row of actions per rank)")
    return rows


def parse_rows(rows: list[list[str]]) -> list[list[Action | None]]:
    return [[parse_action(c, f"rank {r} step {i}: ") for i, c in enumerate(row)] for r, row in enumerate(rows)]


def write_rows(rows: list[list[Action | None]]) -> str:
    """CSV text as torch's `_dump_csv` writes it (csv.writer, None as an empty cell)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    for row in rows:
        w.writerow(["" if a is None else str(a) for a in row])
    return buf.getvalue()


def read_csv(path: str) -> list[list[Action | None]]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: a byte-order mark (Excel's) is not a cell
            if not file_or_pipe(f):
                raise PlanFormatError(f"schedule file {path!r} is not a file (a device or socket); give a CSV file, or a pipe")
            text = f.read()
    except FileNotFoundError:
        raise PlanFormatError(f"schedule file {path!r} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PlanFormatError(f"schedule file {path!r} unreadable: {e}") from None
    try:
        return parse_rows(read_rows(text))
    except PlanFormatError as e:
        raise PlanFormatError(f"{path}: {e}") from None
