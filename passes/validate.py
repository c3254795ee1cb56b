"""Structural rules every plan must satisfy (checked on the plan alone, before replay).

- what the executor needs of the spec (spec_problems: an even head dim for RoPE, ...);
- every kind is one of ir.KINDS (rule "kind"), and carries the fields its table row names;
- fields in range (micro-batch, slice, chunk, peer, x; tags small enough for the transport's tags);
- every (micro-batch, slice, stage) has exactly one F and one B on the rank that owns the stage,
  or, split backward, one F, one I and one W with W after its I (rules "coverage", "order");
- per rank: forward slices ascending, backward slices descending, B after its F, and stages that
  share a rank in pipeline order; an I obeys every rule a B obeys (it is the unit's backward for
  those rules: slices descending, after its forward and its output gradient);
- every send has exactly one matching receive, matched by (src, dst, tag) in program order, and
  the pair agrees on micro-batch, slice and stage boundary (hence on shape);
- per ordered rank pair, the receives come in the order of the sends (rule "p2p-order"): NCCL
  ignores tags and matches the messages of one pair in posting order, so a plan whose two
  receives from one peer are swapped would silently swap two same-shaped tensors there (gloo,
  which honours tags, would run it right). KV exchanges between one owner and one partner are
  held to the same rule (they travel on their own process group, in order per pair);
- every unit whose neighbour stage lives on another rank receives from it before running, and the
  sender sends after producing the data;
- every KV exchange pairs an owner and a partner (or helper) instruction (same direction,
  micro-batch, slice, chunk and token range), the range lies inside the owner unit's prefix (the
  earlier slices' tokens), the owner's next compute unit is the one it names, the ranges shipped
  before one unit are disjoint, and a partner (KV*_RECV) has a compute unit of its own after it;
- REDUCE_GRAD c (data-parallel gradient average of chunk c) at most once per rank and step, after
  every backward of chunk c on that rank and before OPT (rule "reduce-grad").
- in a step plan (one that has an optimizer step on some rank; always under `check`), every rank
  holding parameters runs exactly one OPT, after every instruction of its step that leaves a weight
  gradient (rule "optimizer"). A bare schedule (the generators' output, before compile appends the
  optimizer step) has none.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import compress
from operator import add, gt, itemgetter, lt

from ir import COMPUTE, KINDS, KV, KV_FWD, KV_OWNER, KV_SERVER, MATCH, P2P, RECVS, SENDS, Instr, Kind, Plan, allowed_kinds, to_text
from ir.gcpause import gc_paused
from ir.instr import _clip
from ir.limits import tag_limit, wire_stride

MAX_PROBLEMS = 20
_PEER = itemgetter(4)
_KIND, _MB, _SLICE, _CHUNK = itemgetter(0), itemgetter(1), itemgetter(2), itemgetter(3)
_MATCH_GET = MATCH.get
# a send's neighbour stage: the next stage for an activation, the previous for a gradient
_STEP = {k: (1 if k == Kind.SEND_ACT else -1) for k in SENDS}
_INDEXED = tuple(COMPUTE | P2P)
# phase -> the compute kinds of that phase (forward: F; backward: B, I; weight: W)
_PHASES = {ph: sorted(k for k in COMPUTE if KINDS[k].phase == ph) for ph in sorted({KINDS[k].phase for k in COMPUTE})}


@dataclass(frozen=True)
class Problem:
    """One broken rule: `rank` and `index` locate the instruction it is about (the first one the
    message names), None where there is none (a unit a rank lacks has a rank but no index)."""

    rule: str
    message: str
    rank: int | None = None
    index: int | None = None

    def to_json(self) -> dict:
        return {"rule": self.rule, "rank": self.rank, "index": self.index, "message": self.message}

    def __str__(self) -> str:
        return f"[{self.rule}] {self.message}"


def spec_problems(spec) -> list[Problem]:
    """What the executor needs of a plan's spec beyond the schedule rules, so that a plan it
    cannot run is refused by compile, check and the executor's own plan check before any rank
    starts (rule "executable"). Cheap: the executor runs these even with --no-check."""
    out = []
    cfg = spec.model
    if cfg.head_dim % 2:
        out.append(Problem("executable", f"model head_dim {cfg.head_dim} (hidden {cfg.hidden} / heads {cfg.heads}) is "
                                         f"odd; the executor's rotary position embedding (RoPE) rotates pairs of "
                                         f"dimensions and needs an even head_dim"))
    # the p2p tags a compiled plan uses (passes.lower: 2 per unit and stage boundary; KV exchanges
    # take more above them, which the range rule checks on the plan) must fit the transport's tags
    # (passes.lower.p2p_tag: ((mb n + slice) stages + boundary) 2 + direction, boundary < stages - 1)
    top_tag = 2 * spec.microbatches * spec.slices * spec.num_stages - 3 if spec.num_stages > 1 else -1
    if top_tag >= tag_limit(spec):
        deepest = max(spec.stage_layers)
        out.append(Problem("executable", f"a stage of {deepest} layers needs {wire_stride(spec.stage_layers)} transport tags "
                                         f"per plan tag (one per layer message) and the plan's p2p tags, up to {top_tag}, "
                                         f"then pass torch.distributed's 31-bit tags; use fewer layers per stage (more "
                                         f"stages) or fewer micro-batches or slices"))
    return out


def executor_problems(plan) -> list[Problem]:
    """Kinds the executor has no handler for yet (ir.KINDS column `executor`; today the split
    backward's I and W): one problem naming them, rule "executable". The plan is valid (check,
    simulate, show take it); only `python -m executor` refuses it, before any rank starts."""
    kinds = sorted({ins.kind for s in plan.ranks for ins in s if ins.kind in KINDS and not KINDS[ins.kind].executor})
    if not kinds:
        return []
    return [Problem("executable", f"the plan has {'/'.join(kinds)} instructions (split backward), which the executor "
                                  f"cannot run yet; compile it without split backward (a family with a fused B) to run it")]


class _TooMany(Exception):
    pass


def _at(r: int, i: int, ins: Instr) -> str:
    if ins.kind not in KINDS:
        return f"rank {r} #{i} (kind {_clip(ins.kind)})"
    return f"rank {r} #{i} '{to_text(ins)}'"


@gc_paused
def validate(plan: Plan, max_problems: int = MAX_PROBLEMS, step: bool | None = None, kv: bool = True) -> list[Problem]:
    """All rule violations found (at most `max_problems`), in a stable order. `step` says whether
    the plan must be a whole training step (rule "optimizer": True for what is run or checked,
    None = when some rank has an OPT, False for a bare schedule). `kv=False` leaves out the KV
    exchanges' pairing rule (validate_kv checks it; passes.check runs the two in two processes):
    when validate_kv finds nothing, the list is validate's whole list."""
    problems: list[Problem] = []

    def bad(rule: str, msg: str, rank: int | None = None, index: int | None = None) -> None:
        problems.append(Problem(rule, msg, rank, index))
        if len(problems) >= max_problems:
            raise _TooMany

    problems.extend(spec_problems(plan.spec)[:max_problems])
    if problems:
        return problems
    try:
        if _FUSED:
            scan = _scan(plan)
            _fields(plan, bad, positions=scan.others)  # what the scan did not pass (it passes nothing _fields reports)
        else:
            _fields(plan, bad)
        if problems:
            return problems
        if not _FUSED:
            scan = _scan_loops(plan)
        pos = _coverage_and_order(plan, bad, scan)
        tags = _p2p(plan, pos, bad, scan.tags)
        kv_at = scan.kv_at
        if kv:
            _kv(plan, bad, kv_at)
        _optimizer(plan, bad, step, scan.opt_at)
        _order(plan, bad, tags, kv_at)
        _reduce_grad(plan, bad, scan.reduces)
    except _TooMany:
        pass
    return problems


@gc_paused
def validate_kv(plan: Plan, max_problems: int = MAX_PROBLEMS) -> list[Problem]:
    """The rules of the KV exchanges alone (fields and pairing): what inserting exchanges into a
    plan that already validates can break (the exchange pass checks its result with this)."""
    problems: list[Problem] = []

    def bad(rule: str, msg: str, rank: int | None = None, index: int | None = None) -> None:
        problems.append(Problem(rule, msg, rank, index))
        if len(problems) >= max_problems:
            raise _TooMany

    try:
        positions = _kv_positions(plan)
        _fields(plan, bad, positions=positions)
        if not problems:
            _kv(plan, bad, positions)
    except _TooMany:
        pass
    return problems


# kinds whose fields are (mb, s, c): 1; + a peer and a tag: 2; + lo, hi: 3 (_fields' inline checks)
_SHAPES = {("mb", "s", "c"): 1, ("mb", "s", "c", "to", "t"): 2, ("mb", "s", "c", "from", "t"): 2,
           ("mb", "s", "c", "to", "lo", "hi", "t"): 3, ("mb", "s", "c", "from", "lo", "hi", "t"): 3}
_SHAPE = {k: _SHAPES[row.fields] for k, row in KINDS.items() if row.fields in _SHAPES}


@dataclass
class _Scan:
    """What validate needs from one pass over each stream (_scan)."""

    others: list[list[int]]   # per rank: instructions the pass did not find in range (_fields looks at these)
    tabs: list[dict]          # per rank: {compute or p2p kind: [index of that kind's instruction per unit id, or -1]}
    repeats: list[tuple[int, int, int]]  # (rank, index, index of the first) of a unit's kind met again
    tags: tuple               # _by_tag_both's tables
    kv_at: list[list[int]]    # per rank: the indices of KV instructions (_kv_positions)
    opt_at: list[list[int]]   # per rank: the indices of optimizer steps
    reduces: list[bool]       # per rank: whether it has a REDUCE_GRAD


# _scan's kind codes: 1 a compute unit (fields mb s c), 2 a send, 4 a receive (+ peer, tag), 3 a KV
# exchange (+ lo, hi); the rest (no code) go to _fields' general checks
_CODE = {k: {1: 1, 2: 2 if k in SENDS else 4, 3: 3}[sh] for k, sh in _SHAPE.items()}
# _scan relies on the kind table's shapes: compute kinds carry (mb, s, c), p2p kinds (mb, s, c, peer,
# t), KV kinds (mb, s, c, peer, lo, hi, t); otherwise validate takes the separate loops (_scan_loops)
_FUSED = (all(_SHAPE.get(k) == 1 for k in COMPUTE) and all(_SHAPE.get(k) == 2 for k in P2P)
          and all(_SHAPE.get(k) == 3 for k in KV) and set(_INDEXED) == COMPUTE | P2P)


def _scan(plan: Plan) -> _Scan:
    """One pass over each stream: _fields' inline range checks, _coverage_and_order's unit index,
    _by_tag_both's tag tables, the KV, optimizer and REDUCE_GRAD positions. An instruction out of
    range (or of a kind without inline checks) goes to `others` and into no table: _fields then
    reports it and validate stops there (every instruction of a code that fails these checks is
    reported by _fields' general checks), so the tables are only used when they are complete."""
    spec = plan.spec
    ranks = plan.ranks
    p, m, n, v = spec.pp, spec.microbatches, spec.slices, spec.virtual_stages
    tag_lim = tag_limit(spec)
    offsets = [spec.slice_offsets(mb) for mb in range(m)]
    nu = m * n * v
    code_of = _CODE.get
    opt_kinds, reduce_kind = _OPTIMIZER, Kind.REDUCE_GRAD
    s_first = [[{} for _ in range(p)] for _ in range(p)]
    r_first = [[{} for _ in range(p)] for _ in range(p)]
    s_rep: dict[tuple, list] = {}
    r_rep: dict[tuple, list] = {}
    out = _Scan([], [], [], (s_first, s_rep, r_first, r_rep), [], [], [])
    repeats = out.repeats
    for r, stream in enumerate(ranks):
        tab = {k: [-1] * nu for k in _INDEXED}
        others: list[int] = []
        kv_at: list[int] = []
        opt_at: list[int] = []
        reduces = False
        mine = s_first[r]
        for i, ins in enumerate(stream):
            k = ins[0]
            code = code_of(k)
            if code is None:
                others.append(i)
                if k in opt_kinds:
                    opt_at.append(i)
                elif k == reduce_kind:
                    reduces = True
                continue
            mb, s, c = ins[1], ins[2], ins[3]
            if not (0 <= mb < m and 0 <= s < n and 0 <= c < v):
                others.append(i)
                continue
            if code != 1:
                q, t = ins[4], ins[5]
                if q == r or not (0 <= q < p and 0 <= t < tag_lim):
                    others.append(i)
                    continue
                if code == 3:
                    if 0 <= ins[6] < ins[7] <= offsets[mb][s]:
                        kv_at.append(i)
                    else:
                        others.append(i)
                    continue
                if code == 2:
                    d = mine[q]
                    if t in d:
                        s_rep.setdefault((r, q, t), [d[t]]).append(i)
                    else:
                        d[t] = i
                else:
                    d = r_first[q][r]
                    if t in d:
                        r_rep.setdefault((q, r, t), [d[t]]).append(i)
                    else:
                        d[t] = i
            arr = tab[k]
            u = (mb * n + s) * v + c
            first = arr[u]
            if first >= 0:
                repeats.append((r, i, first))
            else:
                arr[u] = i
        out.others.append(others)
        out.tabs.append(tab)
        out.kv_at.append(kv_at)
        out.opt_at.append(opt_at)
        out.reduces.append(reduces)
    return out


def _scan_loops(plan: Plan) -> _Scan:
    """What _scan finds, one loop per rule, on a plan whose fields are all in range (the
    reference tests/test_validate_fast holds _scan to; validate's path when _FUSED is off)."""
    spec = plan.spec
    n, v = spec.slices, spec.virtual_stages
    nu = spec.microbatches * n * v
    tabs, repeats = [], []
    for r, stream in enumerate(plan.ranks):
        tab = {k: [-1] * nu for k in _INDEXED}
        get = tab.get
        for i, ins in enumerate(stream):
            arr = get(ins[0])
            if arr is None:
                continue
            u = (ins[1] * n + ins[2]) * v + ins[3]
            if arr[u] >= 0:
                repeats.append((r, i, arr[u]))
            else:
                arr[u] = i
        tabs.append(tab)
    return _Scan([list(range(len(st))) for st in plan.ranks], tabs, repeats, _by_tag_both(plan), _kv_positions(plan),
                 [_positions(st, _OPTIMIZER) for st in plan.ranks], [_reduces(st) for st in plan.ranks])


def _fields(plan: Plan, bad, positions=None) -> None:
    """Fields in range; with `positions` (per rank, a list of indices) those only."""
    spec = plan.spec
    p, m, n, v = spec.pp, spec.microbatches, spec.slices, spec.virtual_stages
    tags = tag_limit(spec)
    offsets = [spec.slice_offsets(mb) for mb in range(m)]
    shape = _SHAPE
    for r, stream in enumerate(plan.ranks):
        for i in (range(len(stream)) if positions is None else positions[r]):
            ins = stream[i]
            # the common shapes, checked inline; anything else (or out of range) takes the general
            # checks below, which name the problem
            sh = shape.get(ins[0])
            if sh is not None and 0 <= ins[1] < m and 0 <= ins[2] < n and 0 <= ins[3] < v and (
                    sh == 1 or (ins[4] != r and 0 <= ins[4] < p and 0 <= ins[5] < tags and (
                        sh == 2 or 0 <= ins[6] < ins[7] <= offsets[ins[1]][ins[2]]))):
                continue
            row = KINDS.get(ins.kind)
            if row is None:
                bad("kind", f"{_at(r, i, ins)}: unknown instruction kind; allowed: {allowed_kinds()}", r, i)
                continue
            fields = row.fields
            if not fields:
                continue
            if (("mb" in fields and not 0 <= ins.mb < m) or ("s" in fields and not 0 <= ins.slice < n)
                    or ("c" in fields and not 0 <= ins.chunk < v)):
                bad("range", f"{_at(r, i, ins)}: needs " + ", ".join(
                    f"{f} < {lim}" for f, lim in (("mb", m), ("s", n), ("c", v)) if f in fields), r, i)
            elif "to" in fields or "from" in fields:
                if not (0 <= ins.peer < p) or ins.peer == r:
                    bad("range", f"{_at(r, i, ins)}: peer must be another rank in 0..{p - 1}", r, i)
                elif not 0 <= ins.tag < tags:
                    bad("range", f"{_at(r, i, ins)}: tag must be 0..{tags - 1} (the executor sends each plan tag as "
                                 f"{wire_stride(spec.stage_layers)} transport tags, one per layer message, and "
                                 f"torch.distributed's tags are 31-bit)", r, i)
                elif "lo" in fields and not (0 <= ins.lo < ins.hi <= offsets[ins.mb][ins.slice]):
                    bad("range", f"{_at(r, i, ins)}: needs 0 <= lo < hi <= {offsets[ins.mb][ins.slice]} "
                                 f"(tokens of the earlier slices of the owner's unit)", r, i)


def _coverage_and_order(plan: Plan, bad, scan: _Scan) -> list[dict[str, list[int]]]:
    """Per rank: {kind: position of that kind's instruction for each unit id (-1: none)} for
    compute units and p2p instructions (the scan's tables, with the phases added); unit id =
    (mb * n + slice) * v + chunk."""
    spec = plan.spec
    m, n, v = spec.microbatches, spec.slices, spec.virtual_stages
    owner = spec.stage_rank()
    chunk_of = spec.stage_chunk()
    last = spec.num_stages - 1
    B = Kind.B
    for r, i, first in scan.repeats:
        bad("unique", f"{_at(r, i, plan.ranks[r][i])} repeats #{first}", r, i)
    out = []
    for tab in scan.tabs:
        # per phase of the kind table: the position of the unit's forward (F), its input-gradient
        # backward (B, or I of a split backward) and its weight gradient (W)
        for phase, kinds in _PHASES.items():
            if len(kinds) == 1:
                tab[phase] = tab[kinds[0]]
            else:
                tab[phase] = list(map(max, *(tab[k] for k in kinds)))
        out.append(tab)
    for r, tab in enumerate(out):
        stages = spec.placement[r]
        stream = plan.ranks[r]
        fa, ba = tab["forward"], tab["backward"]
        fused, ia, wa = tab[B], tab[Kind.I], tab["weight"]
        for c in range(v):
            s = stages[c]
            prev_d = chunk_of[s - 1] - c if s > 0 and owner[s - 1] == r else None
            next_d = chunk_of[s + 1] - c if s < last and owner[s + 1] == r else None
            for mb in range(m):
                for j in range(n):
                    u = (mb * n + j) * v + c
                    f, b = fa[u], ba[u]
                    fb, ib, w = fused[u], ia[u], wa[u]
                    if fb >= 0 and ib >= 0:
                        bad("coverage", f"{_at(r, ib, stream[ib])}: the unit also has the fused {_at(r, fb, stream[fb])}; "
                                        f"each unit has one B, or one I and one W", r, ib)
                        continue
                    if f < 0 or b < 0 or (ib >= 0 and w < 0):
                        miss = "F" if f < 0 else "B" if b < 0 else "W"
                        bad("coverage", f"rank {r} lacks '{miss} mb{mb} s{j} c{c}' (stage {s}); every unit needs one F and "
                                        f"one B, or one F, one I and one W", r)
                        continue
                    if w >= 0 and ib < 0:
                        bad("coverage", f"{_at(r, w, stream[w])}: a weight gradient without the unit's I (it has the fused B, "
                                        f"which computes it already)", r, w)
                        continue
                    if w >= 0 and w < ib:
                        bad("order", f"{_at(r, w, stream[w])} runs before its input gradient {_at(r, ib, stream[ib])}", r, w)
                    if b < f:
                        bad("order", f"{_at(r, b, stream[b])} runs before its forward {_at(r, f, stream[f])}", r, b)
                    if j > 0:
                        fp = fa[u - v]
                        if fp > f:
                            bad("order", f"{_at(r, f, stream[f])} runs before the earlier slice {_at(r, fp, stream[fp])} (forward slices ascend)", r, f)
                    if j < n - 1:
                        bn = ba[u + v]
                        if bn > b:
                            bad("order", f"{_at(r, b, stream[b])} runs before the later slice {_at(r, bn, stream[bn])} (backward slices descend)", r, b)
                    if prev_d is not None:
                        fp = fa[u + prev_d]
                        if fp > f:
                            bad("order", f"{_at(r, f, stream[f])} runs before the previous stage's {_at(r, fp, stream[fp])}", r, f)
                    if next_d is not None:
                        bn = ba[u + next_d]
                        if bn > b:
                            bad("order", f"{_at(r, b, stream[b])} runs before the next stage's {_at(r, bn, stream[bn])}", r, b)
    return out


def _by_tag(plan: Plan, kinds, sender: bool):
    """[src][dst] -> {tag: index} of the first instruction per (src, dst, tag), and
    {(src, dst, tag): [indices in program order]} for keys that repeat (hand-edited plans)."""
    p = len(plan.ranks)
    first = [[{} for _ in range(p)] for _ in range(p)]
    repeats: dict[tuple, list] = {}
    for r, stream in enumerate(plan.ranks):
        for i, ins in enumerate(stream):
            if ins[0] in kinds:
                src, dst = (r, ins[4]) if sender else (ins[4], r)
                d = first[src][dst]
                t = ins[5]
                if t in d:
                    repeats.setdefault((src, dst, t), [d[t]]).append(i)
                else:
                    d[t] = i
    return first, repeats


def _by_tag_both(plan: Plan):
    """_by_tag for the sends and for the receives, in one pass over the streams."""
    p = len(plan.ranks)
    s_first = [[{} for _ in range(p)] for _ in range(p)]
    r_first = [[{} for _ in range(p)] for _ in range(p)]
    s_rep: dict[tuple, list] = {}
    r_rep: dict[tuple, list] = {}
    sends, recvs = SENDS, RECVS
    for r, stream in enumerate(plan.ranks):
        mine = s_first[r]
        for i, ins in enumerate(stream):
            k = ins[0]
            if k in sends:
                d = mine[ins[4]]
                t = ins[5]
                if t in d:
                    s_rep.setdefault((r, ins[4], t), [d[t]]).append(i)
                else:
                    d[t] = i
            elif k in recvs:
                d = r_first[ins[4]][r]
                t = ins[5]
                if t in d:
                    r_rep.setdefault((ins[4], r, t), [d[t]]).append(i)
                else:
                    d[t] = i
    return s_first, s_rep, r_first, r_rep


def _dependencies() -> list[tuple[str, str, int, str, str]]:
    """(consumer phase, the receive kind feeding it, +-1 to the neighbour stage it comes from, the
    phase producing it there, what it is), from the kind table's receives/sends columns."""
    out = {}
    for k in sorted(COMPUTE):
        row = KINDS[k]
        if row.receives is None:
            continue
        fwd = row.phase == "forward"
        producer = next(KINDS[p].phase for p in sorted(COMPUTE) if KINDS[p].sends == MATCH[row.receives])
        out[row.phase] = (row.phase, row.receives, -1 if fwd else 1, producer, "activation" if fwd else "gradient")
    return list(out.values())


_DEPENDENCIES = _dependencies()


def _p2p(plan: Plan, pos: list[dict[str, list[int]]], bad, tags=None) -> None:
    spec = plan.spec
    n, v = spec.slices, spec.virtual_stages
    owner = spec.stage_rank()
    chunk_of = spec.stage_chunk()
    last = spec.num_stages - 1
    placement = spec.placement
    ranks = plan.ranks
    p = len(ranks)
    SEND_ACT = Kind.SEND_ACT
    sends, send_rep, recvs, recv_rep = _by_tag_both(plan) if tags is None else tags
    via = [[-1] * len(s) for s in ranks]  # via[dst][recv index] = index of its matched send on the peer
    for src in range(p):
        src_stream, src_place = ranks[src], placement[src]
        for dst in range(p):
            sd, rd = sends[src][dst], recvs[src][dst]
            if not sd and not rd:
                continue
            dst_stream, dst_place, dst_via = ranks[dst], placement[dst], via[dst]

            def pair(si, ri):  # called within this (src, dst) iteration only
                """Send si matched by tag with receive ri: the same data, or rule "match"."""
                s_ins, r_ins = src_stream[si], dst_stream[ri]
                s_stage = src_place[s_ins[3]]
                want = s_stage + 1 if s_ins[0] == SEND_ACT else s_stage - 1
                if (MATCH[s_ins[0]] != r_ins[0] or s_ins[1] != r_ins[1] or s_ins[2] != r_ins[2]
                        or dst_place[r_ins[3]] != want):
                    bad("match", f"{_at(src, si, s_ins)} is matched by tag with {_at(dst, ri, r_ins)}, "
                                 f"which expects other data (kind, micro-batch, slice or stage differ)", src, si)
                else:
                    dst_via[ri] = si

            if not send_rep and not recv_rep:  # every (src, dst, tag) once: the same checks, without lists
                if _pairs_match(src_stream, dst_stream, src_place, dst_place, sd, rd, dst_via):
                    continue
                for tag, si in sd.items():
                    ri = rd.get(tag)
                    if ri is None:
                        bad("match", f"{_at(src, si, src_stream[si])} has no matching receive on rank {dst}", src, si)
                        continue
                    pair(si, ri)
                if not rd.keys() <= sd.keys():
                    for tag, ri in rd.items():
                        if tag not in sd:
                            bad("match", f"{_at(dst, ri, dst_stream[ri])} has no matching send on rank {src}", dst, ri)
                continue
            # tags in program order of the first send, then receives without a send
            for tag in [*sd, *(t for t in rd if t not in sd)]:
                key = (src, dst, tag)
                ss = send_rep.get(key) or ([sd[tag]] if tag in sd else [])
                rr = recv_rep.get(key) or ([rd[tag]] if tag in rd else [])
                for si, ri in zip(ss, rr):
                    pair(si, ri)
                for si in ss[len(rr):]:
                    bad("match", f"{_at(src, si, src_stream[si])} has no matching receive on rank {dst}", src, si)
                for ri in rr[len(ss):]:
                    bad("match", f"{_at(dst, ri, dst_stream[ri])} has no matching send on rank {src}", dst, ri)
    # every cross-rank dependency goes through a receive placed before its consumer
    m_range, n_range = range(spec.microbatches), range(n)
    for r, stream in enumerate(ranks):
        tab, r_via = pos[r], via[r]
        for c, s in enumerate(placement[r]):
            for (need, recv_kind, step, send_after, what) in _DEPENDENCIES:
                nb = s + step
                if nb < 0 or nb > last or owner[nb] == r:
                    continue
                q = owner[nb]
                dq = chunk_of[nb] - c  # unit id offset from this chunk to the neighbour's chunk on q
                units, recv_at, produced = tab[need], tab[recv_kind], pos[q][send_after]
                if _dependencies_hold(stream, units[c::v], recv_at[c::v], produced[c + dq::v], r_via, q):
                    continue  # nothing to report for this chunk and dependency (the loop below would agree)
                for mb in m_range:
                    for j in n_range:
                        uid = (mb * n + j) * v + c
                        u = units[uid]
                        if u < 0:
                            continue
                        ri = recv_at[uid]
                        if ri < 0:
                            bad("dependency", f"{_at(r, u, stream[u])} needs the {what} from rank {q} but rank {r} never receives it", r, u)
                            continue
                        si = r_via[ri]
                        if si < 0:
                            continue  # reported as a matching problem
                        q_ = stream[ri][4]
                        if ri > u:
                            bad("dependency", f"{_at(r, u, stream[u])} runs before {_at(r, ri, stream[ri])} that brings its {what} "
                                              f"from {_at(q_, si, ranks[q_][si])}", r, u)
                        pu = produced[uid + dq] if q_ == q else -1
                        if si < pu:
                            bad("dependency", f"{_at(q_, si, ranks[q_][si])} sends before {_at(q_, pu, ranks[q_][pu])} produces the {what} "
                                              f"that {_at(r, ri, stream[ri])} receives", q_, si)
    return sends, send_rep, recvs, recv_rep


def _pairs_match(src_stream, dst_stream, src_place, dst_place, sd, rd, dst_via) -> bool:
    """True when the sends of one rank pair (sd: tag -> index) and its receives (rd) are the same
    tags and each send's receive expects its data (kind, micro-batch, slice, neighbour stage):
    then _p2p's loop reports nothing for the pair; records dst_via as that loop would. C-level
    passes over the columns (one column at a time: no tuple per instruction); False sends the
    pair to the loop."""
    if len(sd) != len(rd):
        return False
    if list(sd) == list(rd):  # the same tags in the same order (the p2p-order rule's common case)
        sis, ris = list(sd.values()), list(rd.values())
    elif sd.keys() == rd.keys():
        sis, ris = list(sd.values()), list(map(rd.__getitem__, sd))
    else:
        return False
    S = list(map(src_stream.__getitem__, sis))
    R = list(map(dst_stream.__getitem__, ris))
    s_kind = list(map(_KIND, S))
    if (list(map(_MATCH_GET, s_kind)) != list(map(_KIND, R)) or list(map(_MB, S)) != list(map(_MB, R))
            or list(map(_SLICE, S)) != list(map(_SLICE, R))
            or list(map(add, map(src_place.__getitem__, map(_CHUNK, S)), map(_STEP.__getitem__, s_kind)))
            != list(map(dst_place.__getitem__, map(_CHUNK, R)))):
        return False
    for ri, si in zip(ris, sis):
        dst_via[ri] = si
    return True


def _dependencies_hold(stream, units, recv_at, produced, via, q) -> bool:
    """True when every unit of one chunk (units[k]: its position; recv_at[k]: its receive's;
    produced[k]: where rank q produces what it receives) exists, receives from rank q before it
    runs, and that receive's matched send comes after the producing unit: then _p2p's loop over
    these units reports nothing. C-level passes over the columns; False sends it to the loop."""
    if not units or min(units) < 0 or min(recv_at) < 0 or any(map(gt, recv_at, units)):
        return not units
    sent = list(map(via.__getitem__, recv_at))
    if min(sent) < 0 or any(map(lt, sent, produced)):
        return False
    return all(map(q.__eq__, map(_PEER, map(stream.__getitem__, recv_at))))


# what the optimizer step must follow: every compute kind that leaves a weight gradient (the fused
# backward B, the split backward's W; I leaves none, but it precedes its W)
_OPTIMIZER = frozenset(k for k, row in KINDS.items() if row.role == "optimizer")
_GRADIENTS = frozenset(k for k, row in KINDS.items() if row.role == "compute" and row.cost in ("backward", "backward_weight"))


def _optimizer(plan: Plan, bad, step: bool | None, found=None) -> None:
    """Rule "optimizer": each rank holding parameters (every rank holds at least one stage)
    runs exactly one optimizer step, after the last instruction that leaves a weight gradient;
    an earlier one would update the parameters without the gradients that follow it.
    `step`: True, the plan is a training step (every rank needs its OPT); None, it is one when
    some rank has an OPT; False, the rule is skipped."""
    opt = _OPTIMIZER
    if found is None:
        found = [_positions(stream, opt) for stream in plan.ranks]
    if step is False or (step is None and not any(found)):
        return
    for r, stream in enumerate(plan.ranks):
        opts = found[r]
        if not opts:
            bad("optimizer", f"rank {r} has no optimizer step (OPT): every rank holding parameters runs exactly one "
                             f"per step, after its last backward", r)
            continue
        for i in opts[1:]:
            bad("optimizer", f"{_at(r, i, stream[i])} repeats {_at(r, opts[0], stream[opts[0]])}: one optimizer step "
                             f"per rank and step", r, i)
        o = opts[0]
        last = next((i for i in range(len(stream) - 1, o, -1) if stream[i].kind in _GRADIENTS), None)
        if last is not None:
            bad("optimizer", f"{_at(r, o, stream[o])} runs before {_at(r, last, stream[last])}: the optimizer step "
                             f"must follow every backward of the step, or it misses their gradients", r, o)


def _positions(stream, kinds: frozenset) -> list[int]:
    """Indices of the instructions of `kinds` in a stream, ascending (a C-level pass: a set
    lookup per kind, itertools.compress over the indices)."""
    return list(compress(range(len(stream)), map(kinds.__contains__, map(_KIND, stream))))


def _kv_positions(plan: Plan) -> list[list[int]]:
    return [_positions(stream, KV) for stream in plan.ranks]


def _kv(plan: Plan, bad, positions=None) -> None:
    ranks = plan.ranks
    ends: dict[tuple, list] = {}
    compute = COMPUTE
    if positions is None:
        positions = _kv_positions(plan)
    for r, stream in enumerate(ranks):
        n = len(stream)
        shipped: dict[int, list[tuple[int, int, int]]] = {}  # next unit -> (lo, hi, index) shipped before it
        for i in positions[r]:
            ins = stream[i]
            k = ins.kind
            j = i + 1
            while j < n and stream[j].kind not in compute:
                j += 1
            nxt = j if j < n else None
            row = KINDS[k]
            if row.side == "owner":
                u = stream[nxt] if nxt is not None else None
                urow = KINDS[u.kind] if u is not None else None
                if (urow is None or not urow.attention or urow.phase != row.phase
                        or (u.mb, u.slice, u.chunk) != (ins.mb, ins.slice, ins.chunk)):
                    want = "/".join(sorted(c for c in COMPUTE if KINDS[c].attention and KINDS[c].phase == row.phase))
                    bad("kv", f"{_at(r, i, ins)}: the next compute unit must be '{want} mb{ins.mb} s{ins.slice} c{ins.chunk}'", r, i)
                before = shipped.setdefault(nxt, [])
                for lo, hi, o in before:
                    if ins.lo < hi and lo < ins.hi:
                        bad("kv", f"{_at(r, i, ins)} ships tokens that {_at(r, o, stream[o])} ships too "
                                  f"(the ranges shipped before one unit must be disjoint)", r, i)
                        break
                before.append((ins.lo, ins.hi, i))
                ends.setdefault((r, ins.peer, ins.tag, "o"), []).append(i)
            else:
                if nxt is None and row.side != "helper":
                    bad("kv", f"{_at(r, i, ins)}: no compute unit follows to run the exchange alongside", r, i)
                ends.setdefault((ins.peer, r, ins.tag, "p"), []).append(i)
    for (o, pa, tag, side), idx in list(ends.items()):
        if side != "o":
            continue
        other = ends.get((o, pa, tag, "p"), [])
        for oi, pi in zip(idx, other):
            a, b = ranks[o][oi], ranks[pa][pi]
            if (a.kind in KV_FWD) != (b.kind in KV_FWD) or b.kind in KV_OWNER or \
                    (a.mb, a.slice, a.chunk, a.lo, a.hi) != (b.mb, b.slice, b.chunk, b.lo, b.hi):
                bad("kv", f"{_at(o, oi, a)} is paired by tag with {_at(pa, pi, b)}, which names another exchange", o, oi)
        for oi in idx[len(other):]:
            bad("kv", f"{_at(o, oi, ranks[o][oi])} has no partner instruction on rank {pa}", o, oi)
    for (o, pa, tag, side), idx in ends.items():
        if side == "p":
            n_owner = len(ends.get((o, pa, tag, "o"), []))
            for pi in idx[n_owner:]:
                bad("kv", f"{_at(pa, pi, ranks[pa][pi])} has no owner instruction on rank {o}", pa, pi)


def _order(plan: Plan, bad, tags=None, kv_at=None) -> None:
    """Rule p2p-order: the k-th receive of each ordered pair (src, dst) pairs with src's k-th
    send to dst (same tag, hence same data once the tag matching holds); likewise the k-th
    partner instruction of an (owner, partner) pair with the owner's k-th exchange. Reported
    once per pair, at the first position where the two sequences part. `tags` (_p2p's tag
    tables) and `kv_at` (_kv_positions) let a plan that keeps the rule pass without a new scan."""
    if tags is not None and kv_at is not None and _order_holds(plan, tags, kv_at):
        return
    ranks = plan.ranks
    role = {k: (True, k in KV) for k in SENDS | KV_OWNER}
    role.update({k: (False, k in KV) for k in RECVS | KV_SERVER})  # partners and helpers
    get = role.get
    sends: dict[tuple, list] = {}
    recvs: dict[tuple, list] = {}
    for r, stream in enumerate(ranks):
        for i, ins in enumerate(stream):
            x = get(ins[0])
            if x is None:
                continue
            if x[0]:
                key = (r, ins[4], x[1])
                d = sends
            else:
                key = (ins[4], r, x[1])
                d = recvs
            lst = d.get(key)
            if lst is None:
                lst = d[key] = []
            lst.append(i)
    for key in sorted(set(sends) | set(recvs)):
        src, dst, kv = key
        ss, rr = sends.get(key, ()), recvs.get(key, ())
        s_stream, r_stream = ranks[src], ranks[dst]
        if [s_stream[i][5] for i in ss[:len(rr)]] == [r_stream[i][5] for i in rr[:len(ss)]]:
            continue  # same tags in the same order (kinds that disagree are the match rule's)
        for n_, (si, ri) in enumerate(zip(ss, rr)):
            a, b = s_stream[si], r_stream[ri]
            if a[5] != b[5] or (MATCH[a[0]] != b[0] and MATCH.get(b[0]) != a[0]):  # a helper's MATCH is its owner kind
                what = "exchange" if kv else "receive"
                sent = "exchange with" if kv else "send to"
                bad("p2p-order", f"{_at(dst, ri, b)} is rank {dst}'s {_nth(n_)} {what} from rank {src}, but rank {src}'s "
                                 f"{_nth(n_)} {sent} rank {dst} is {_at(src, si, a)}: messages between two ranks match "
                                 f"in posting order (NCCL ignores tags), so it would get other data", dst, ri)
                break


def _order_holds(plan: Plan, tags, kv_at) -> bool:
    """True when _order would report nothing: per rank pair, the receives' tags and the sends'
    agree on their common prefix in program order (each tag once per pair: _p2p's tables then
    list them in program order), and the same for the KV exchanges of owner and partner."""
    sends, send_rep, recvs, recv_rep = tags
    if send_rep or recv_rep:
        return False
    p = len(plan.ranks)
    for src in range(p):
        for dst in range(p):
            sd, rd = sends[src][dst], recvs[src][dst]
            if sd and rd:
                k = min(len(sd), len(rd))
                if list(sd)[:k] != list(rd)[:k]:
                    return False
    own: dict[tuple, list] = {}
    serve: dict[tuple, list] = {}
    owner_kinds = KV_OWNER
    for r, stream in enumerate(plan.ranks):
        for i in kv_at[r]:
            ins = stream[i]
            if ins[0] in owner_kinds:
                own.setdefault((r, ins[4]), []).append(ins[5])
            else:
                serve.setdefault((ins[4], r), []).append(ins[5])
    for key, a in own.items():
        b = serve.get(key)
        if b:
            k = min(len(a), len(b))
            if a[:k] != b[:k]:
                return False
    return True


def _nth(k: int) -> str:
    n = k + 1
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _reduces(stream) -> bool:
    """Whether a stream has a REDUCE_GRAD (a C-level scan)."""
    return Kind.REDUCE_GRAD in map(_KIND, stream)


def _reduce_grad(plan: Plan, bad, reduces=None) -> None:
    """REDUCE_GRAD c averages chunk c's weight gradients over the replicas when it runs: it must
    come after every unit that adds to them (rule "reduce-grad"), once per chunk, before OPT."""
    wgrad = _GRADIENTS
    for r, stream in enumerate(plan.ranks):
        if not (_reduces(stream) if reduces is None else reduces[r]):
            continue  # nothing is reduced on this rank: nothing below can be reported
        seen: dict[int, int] = {}
        opt_at = None
        for i, ins in enumerate(stream):
            k = ins.kind
            if k == Kind.REDUCE_GRAD:
                if ins.chunk in seen:
                    bad("reduce-grad", f"{_at(r, i, ins)}: chunk {ins.chunk} is already reduced at #{seen[ins.chunk]}; "
                                       f"once per step", r, i)
                seen[ins.chunk] = i
                if opt_at is not None:
                    bad("reduce-grad", f"{_at(r, i, ins)}: after the optimizer step at #{opt_at}", r, i)
            elif k == Kind.OPT:
                opt_at = i
            elif k in wgrad and ins.chunk in seen:
                j = seen[ins.chunk]
                bad("reduce-grad", f"{_at(r, i, ins)}: adds to chunk {ins.chunk}'s gradients after "
                                   f"#{j} '{to_text(stream[j])}' reduced them; place REDUCE_GRAD after the chunk's "
                                   f"last backward", r, i)
