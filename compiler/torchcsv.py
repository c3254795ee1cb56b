"""torch.distributed.pipelining schedule CSVs in and out (ir.torchfmt holds the text grammar).

Import: p is the number of rows, the stages and their placement come from which rank runs which
stage (chunks of a rank in ascending stage order), m from the largest micro-batch index, one
slice per micro-batch. A compute-only file is lowered with our lowering (passes.lower); a file
that carries SEND/RECV actions keeps its order exactly, so `check` proves what torch's runtime
would run. OVERLAP_F_B becomes its two parts in order; I and W are our split-backward kinds. UNSHARD, RESHARD and REDUCE_GRAD (FSDP
and data-parallel bookkeeping with no pipeline data flow) and idle cells are kept as
annotations in plan.meta["torch"] that export puts back where they were: the simulator and our
executor ignore them. Every stream ends with our OPT (dropped again on export).

Export: the reverse, for plans without sequence slices and KV exchange. With communication
(--comms), `torch_order` first orders the sends and receives inside each run of a plan of ours
(passes.lower.order_for_single_posting): torch's runtime posts each action alone, and where sends
block until their receive is posted (NCCL's large messages) our lowering order waits in a cycle;
our executor posts a run as one batch, so that is the same plan. `rendezvous_note` says what cycle
is left.
"""
from __future__ import annotations

import os

from ir import KV, Instr, Kind, Plan, PlanFormatError, SpecError, atomic_write
from ir.torchfmt import COMM_TYPES, OVERLAP, STAGE_TYPES, Action, read_csv, write_rows
from passes import rendezvous_problem
from passes.replay import replay
from passes.lower import ACT, GRAD, lower_comm, order_for_single_posting, p2p_tag

from .layout import build_spec
from .models import resolve_model

SCHEDULE_NAME = "torch-csv"
_SEND_RECV = {"SEND_F": Kind.SEND_ACT, "RECV_F": Kind.RECV_ACT, "SEND_B": Kind.SEND_GRAD, "RECV_B": Kind.RECV_GRAD}
_TORCH_COMM = {v: k for k, v in _SEND_RECV.items()}
_COMPUTE = (Kind.F, Kind.B, Kind.I, Kind.W)  # torch's F, B and its split backward I (input), W (weight)


def _where(r: int, i: int, a) -> str:
    return f"rank {r} step {i} '{a}'"


def _layout(rows) -> tuple[list[list[int]], int]:
    """placement (rank -> sorted stages) and m, from the actions."""
    owner: dict[int, tuple[int, int, Action]] = {}
    mbs: set[int] = set()
    m = 0
    for r, row in enumerate(rows):
        for i, a in enumerate(row):
            if a is None:
                continue
            for x in (a.parts if a.type == OVERLAP else (a,)):
                prev = owner.setdefault(x.stage, (r, i, a))
                if prev[0] != r:
                    raise SpecError(f"{_where(r, i, a)}: stage {x.stage} also runs on {_where(*prev)}; "
                                    f"a stage lives on one rank")
                if x.mb >= 0:
                    m = max(m, x.mb + 1)
                    mbs.add(x.mb)
    if not owner:
        raise SpecError("the schedule has no actions")
    stages = max(owner) + 1
    if stages != len(owner):  # found without walking range(stages): a hostile '999999999F0' is one cell
        gap = next(s for s, t in enumerate(sorted(owner)) if s != t)
        raise SpecError(f"stage {gap} runs nowhere (stages 0..{stages - 1} are named); every stage needs a rank")
    if m > len(mbs):
        gap = next(k for k, t in enumerate(sorted(mbs)) if k != t)
        raise SpecError(f"micro-batch {gap} never runs (micro-batches 0..{m - 1} are named); every micro-batch "
                        f"needs its forward and backward on every stage")
    p = len(rows)
    placement = [sorted(s for s, (r, *_rest) in owner.items() if r == q) for q in range(p)]
    counts = sorted({len(pl) for pl in placement})
    if len(counts) != 1:
        q = min(range(p), key=lambda x: len(placement[x]))
        raise SpecError(f"rank {q} runs {len(placement[q])} stage(s) and others more; slimpipe plans give every rank the "
                        f"same number of stages ({stages} stages over {p} ranks)")
    if m == 0:
        raise SpecError("the schedule names no micro-batch (no F or B action)")
    return placement, m


def from_rows(rows, model=None, seq_len: int | None = None, source: str = "") -> Plan:
    """A plan from parsed CSV rows (ir.torchfmt.parse_rows). `model` (a ModelConfig, which must have
    a layer per stage at least; default the tiny preset with its layers raised to one per stage
    where it has fewer: a stand-in for checking a schedule) and `seq_len` (default 128) size the spec."""
    placement, m = _layout(rows)
    p = len(rows)
    v = len(placement[0])
    stages = p * v
    if model is None:
        model = resolve_model("tiny")
        if model.layers < stages:
            model = model.model_copy(update={"layers": stages})
    if model.layers < stages:
        where = f"{source}: " if source else ""
        raise SpecError(f"{where}the schedule has {stages} stages ({p} ranks x {v}), more than model {model.name}'s "
                        f"{model.layers} layers (one stage holds one layer at least); give --layers {stages} or more, "
                        f"or a --model with as many")
    spec = build_spec(SCHEDULE_NAME, model, pp=p, microbatches=m, slices=1, virtual_stages=v,
                      seq_len=seq_len or 128, placement=tuple(tuple(pl) for pl in placement))
    owner = spec.stage_rank()
    chunk = spec.stage_chunk()
    last = stages - 1
    comms = any(a is not None and a.type in COMM_TYPES for row in rows for a in row)
    streams, notes, overlaps, cells = [], [], [], []
    for r, row in enumerate(rows):
        out: list[Instr] = []
        col: list[int] = []  # the CSV column of each instruction (for messages)
        cells.append(col)
        ncomp = 0
        for i, a in enumerate(row):
            if a is None or a.type in STAGE_TYPES:
                notes.append([r, ncomp, len(out), "" if a is None else str(a)])
                continue
            if a.type == OVERLAP:
                overlaps.append([r, ncomp])
            for x in (a.parts if a.type == OVERLAP else (a,)):
                s, mb = x.stage, x.mb
                col.append(i)
                if x.type in _COMPUTE:
                    out.append(Instr(x.type, mb, 0, chunk[s]))
                    ncomp += 1
                    continue
                fwd = x.type in ("SEND_F", "RECV_F")
                sending = x.type.startswith("SEND")
                peer_stage = s + 1 if fwd == sending else s - 1
                if not 0 <= peer_stage <= last:
                    raise SpecError(f"{_where(r, i, a)}: stage {s} has no stage {peer_stage} to "
                                    f"{'send to' if sending else 'receive from'}")
                if owner[peer_stage] == r:
                    raise SpecError(f"{_where(r, i, a)}: stages {s} and {peer_stage} both run on rank {r}; torch's runtime "
                                    f"hands the tensor over locally, so the schedule must not send it")
                boundary = min(s, peer_stage)
                tag = p2p_tag(spec, mb, 0, boundary, ACT if fwd else GRAD)
                out.append(Instr(_SEND_RECV[x.type], mb, 0, chunk[s], owner[peer_stage], tag))
        streams.append(out)
    meta = {"compiler": "slimpipe import", "p2p_batching": "single",
            "torch": {"source": os.path.basename(source), "format": "compute_comms" if comms else "compute_only",
                      "annotations": notes, "overlap": overlaps}}
    if comms:
        meta["torch"]["columns"] = cells
    plan = Plan(spec, tuple(tuple(s) for s in streams), meta)
    if not comms:
        plan = lower_comm(plan)
    return plan.with_ranks([s + (Instr(Kind.OPT),) for s in plan.ranks])


def csv_cell(plan: Plan, rank: int | None, index: int | None) -> str:
    """' (CSV row R column C)' for an instruction of a plan imported from a torch CSV that kept its
    communication (each instruction is one cell there), else ''."""
    cols = (plan.meta.get("torch") or {}).get("columns")
    if cols is None or rank is None or index is None or not 0 <= rank < len(cols) or not 0 <= index < len(cols[rank]):
        return ""
    return f" (CSV row {rank + 1}, column {cols[rank][index] + 1})"


def import_csv(path: str, model=None, seq_len: int | None = None) -> Plan:
    return from_rows(read_csv(path), model, seq_len, source=path)


def to_rows(plan: Plan, comms: bool = False) -> list[list[Action | None]]:
    """torch's actions per rank. Annotations and OVERLAP_F_B pairs recorded by import come back
    where they were."""
    spec = plan.spec
    if spec.slices != 1:
        raise SpecError(f"plan slices each micro-batch into {spec.slices}; torch's schedule format has no sequence "
                        f"slices (allowed: plans with --slices 1)")
    meta = plan.meta.get("torch") or {}
    notes = meta.get("annotations", [])
    overlap = {(r, k) for r, k in meta.get("overlap", [])}
    # where an annotation goes: before the compute action it preceded (count of compute actions),
    # or, writing a file that carried its own communication, before the action it preceded
    by_all = comms and meta.get("format") == "compute_comms"
    rows = []
    for r, stream in enumerate(plan.ranks):
        stages = spec.placement[r]
        cells: list = []
        here = [(n[2] if by_all else n[1], n[3]) for n in notes if n[0] == r]
        ncomp = nall = 0
        merge_at = None  # cell index of an OVERLAP_F_B's first part, until its second arrives

        def flush(upto: int) -> None:
            while here and here[0][0] <= upto:
                text = here.pop(0)[1]
                cells.append(None if text == "" else _stage_action(text))

        for i, ins in enumerate(stream):
            k = ins.kind
            if k == Kind.OPT:
                if i != len(stream) - 1:
                    raise SpecError(f"rank {r} #{i} 'OPT': torch's format has no optimizer step inside the stream "
                                    f"(allowed: OPT as the last instruction)")
                continue
            if k == Kind.REDUCE_GRAD:  # data-parallel: torch's own stage-only action
                flush(nall if by_all else ncomp)
                cells.append(Action(stages[ins.chunk], "REDUCE_GRAD"))
                nall += 1
                continue
            if k in KV:
                raise SpecError(f"rank {r} #{i} '{ins}': the plan has KV exchanges; torch's runtime has none "
                                f"(compile with --no-exchange)")
            if k in _COMPUTE:
                act = Action(stages[ins.chunk], k, ins.mb)
                if merge_at is not None:
                    cells[merge_at] = Action(-1, OVERLAP, -1, (cells[merge_at], act))
                    merge_at = None
                else:
                    flush(nall if by_all else ncomp)
                    if (r, ncomp) in overlap:
                        merge_at = len(cells)
                    cells.append(act)
                ncomp += 1
                nall += 1
            elif k in _TORCH_COMM:
                if comms:
                    act = Action(stages[ins.chunk], _TORCH_COMM[k], ins.mb)
                    if merge_at is not None and k in (Kind.RECV_ACT, Kind.RECV_GRAD):
                        cells.insert(merge_at, act)  # torch runs the cell's parts back to back: receive first
                        merge_at += 1
                    else:
                        if by_all:
                            flush(nall)
                        cells.append(act)
                nall += 1
            else:
                raise SpecError(f"rank {r} #{i} '{ins}': torch's schedule format has no {k} action")
        flush(1 << 62)
        rows.append(cells)
    return rows


def _stage_action(text: str) -> Action:
    for t in STAGE_TYPES:
        if text.endswith(t) and text[:-len(t)].isdigit():
            return Action(int(text[:-len(t)]), t)
    raise PlanFormatError(f"plan meta.torch.annotations holds {text!r}; allowed: '' or a stage-only action such as 0REDUCE_GRAD")


def torch_order(plan: Plan) -> Plan:
    """The plan as `export --comms` writes it: the sends and receives inside each run ordered for
    torch's runtime, which posts each action alone (passes.lower.order_for_single_posting), unless
    that order came from a torch file with communication (import keeps it exactly)."""
    torch = plan.meta.get("torch") or {}
    if plan.meta.get("p2p_batching", "runs") == "single" and torch.get("format") != "compute_only":
        return plan
    return order_for_single_posting(plan)


def rendezvous_note(plan: Plan, rows) -> str | None:
    """What `slimpipe check FILE.csv --p2p rendezvous` says of `rows` (to_rows(plan, comms=True)),
    as torch's runtime posts them, each action alone, with its CSV cell; None when they have no
    wait cycle. The file is read back (its annotations and OVERLAP_F_B cells count in the
    positions) only when there is one."""
    if not replay(plan, p2p="rendezvous", batch_runs=False).deadlocked:
        return None
    back = from_rows(rows, plan.spec.model, plan.spec.seq_len)
    problem = rendezvous_problem(back)
    return None if problem is None else f"{problem}{csv_cell(back, problem.rank, problem.index)}"


def export_csv(plan: Plan, path: str, comms: bool = False) -> list[list[Action | None]]:
    """Write to_rows(plan, comms) to `path` (atomically). `export --comms` gives it torch_order(plan)."""
    rows = to_rows(plan, comms)
    atomic_write(path, write_rows(rows))
    return rows
