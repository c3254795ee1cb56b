"""Structural rules every plan must satisfy (checked on the plan alone, before replay).

- fields in range (micro-batch, slice, chunk, peer, tag, x);
- every (micro-batch, slice, stage) has exactly one F and one B on the rank that owns the stage;
- per rank: forward slices ascending, backward slices descending, B after its F, and stages that
  share a rank in pipeline order;
- every send has exactly one matching receive, matched by (src, dst, tag) in program order, and
  the pair agrees on micro-batch, slice and stage boundary (hence on shape);
- every unit whose neighbour stage lives on another rank receives from it before running, and the
  sender sends after producing the data;
- every KV exchange pairs an owner and a partner instruction (same micro-batch, slice, chunk, x),
  and the owner's next compute unit is the one it names.
"""
from __future__ import annotations

from dataclasses import dataclass

from ir import COMPUTE, KV, KV_OWNER, KV_PARTNER, MATCH, P2P, RECVS, SENDS, Instr, Kind, Plan, to_text

MAX_PROBLEMS = 20


@dataclass(frozen=True)
class Problem:
    rule: str
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.message}"


class _TooMany(Exception):
    pass


def _at(r: int, i: int, ins: Instr) -> str:
    return f"rank {r} #{i} '{to_text(ins)}'"


def validate(plan: Plan, max_problems: int = MAX_PROBLEMS) -> list[Problem]:
    """All rule violations found (at most `max_problems`), in a stable order."""
    problems: list[Problem] = []

    def bad(rule: str, msg: str) -> None:
        problems.append(Problem(rule, msg))
        if len(problems) >= max_problems:
            raise _TooMany

    try:
        _fields(plan, bad)
        if problems:
            return problems
        pos = _coverage_and_order(plan, bad)
        _p2p(plan, pos, bad)
        _kv(plan, bad)
    except _TooMany:
        pass
    return problems


def _fields(plan: Plan, bad) -> None:
    spec = plan.spec
    p, m, n, v = spec.pp, spec.microbatches, spec.slices, spec.virtual_stages
    for r, stream in enumerate(plan.ranks):
        for i, ins in enumerate(stream):
            k = ins.kind
            if k == Kind.OPT:
                continue
            if not (0 <= ins.mb < m and 0 <= ins.slice < n and 0 <= ins.chunk < v):
                bad("range", f"{_at(r, i, ins)}: needs mb < {m}, s < {n}, c < {v}")
            elif k in P2P or k in KV:
                if not (0 <= ins.peer < p) or ins.peer == r:
                    bad("range", f"{_at(r, i, ins)}: peer must be another rank in 0..{p - 1}")
                elif ins.tag < 0:
                    bad("range", f"{_at(r, i, ins)}: tag must be >= 0")
                elif k in KV and not (1 <= ins.x <= ins.slice):
                    bad("range", f"{_at(r, i, ins)}: x must be 1..{ins.slice} (earlier slices of the owner's unit)")


def _coverage_and_order(plan: Plan, bad) -> list[dict]:
    """Per rank: {(kind, mb, slice, chunk): index} of compute units and p2p instructions."""
    spec = plan.spec
    m, n, v = spec.microbatches, spec.slices, spec.virtual_stages
    owner = spec.stage_rank()
    chunk_of = spec.stage_chunk()
    last = spec.num_stages - 1
    keyed = COMPUTE | P2P
    F, B = Kind.F, Kind.B
    out = []
    for r, stream in enumerate(plan.ranks):
        idx = [i for i, ins in enumerate(stream) if ins[0] in keyed]
        # ins[:4] is (kind, mb, slice, chunk); built from the end so each key keeps its first index
        pos: dict[tuple, int] = {stream[i][:4]: i for i in reversed(idx)}
        if len(pos) != len(idx):  # duplicates: report them in program order
            seen: dict[tuple, int] = {}
            for i in idx:
                key = stream[i][:4]
                if key in seen:
                    bad("unique", f"{_at(r, i, stream[i])} repeats #{seen[key]}")
                else:
                    seen[key] = i
        out.append(pos)
    for r, pos in enumerate(out):
        stages = spec.placement[r]
        stream = plan.ranks[r]
        get = pos.get
        for c in range(v):
            s = stages[c]
            prev_c = chunk_of[s - 1] if s > 0 and owner[s - 1] == r else None
            next_c = chunk_of[s + 1] if s < last and owner[s + 1] == r else None
            for mb in range(m):
                for j in range(n):
                    f = get((F, mb, j, c))
                    b = get((B, mb, j, c))
                    if f is None or b is None:
                        miss = "F" if f is None else "B"
                        bad("coverage", f"rank {r} lacks '{miss} mb{mb} s{j} c{c}' (stage {s}); every unit needs one F and one B")
                        continue
                    if b < f:
                        bad("order", f"{_at(r, b, stream[b])} runs before its forward {_at(r, f, stream[f])}")
                    if j > 0:
                        fp = get((F, mb, j - 1, c))
                        if fp is not None and fp > f:
                            bad("order", f"{_at(r, f, stream[f])} runs before the earlier slice {_at(r, fp, stream[fp])} (forward slices ascend)")
                    if j < n - 1:
                        bn = get((B, mb, j + 1, c))
                        if bn is not None and bn > b:
                            bad("order", f"{_at(r, b, stream[b])} runs before the later slice {_at(r, bn, stream[bn])} (backward slices descend)")
                    if prev_c is not None:
                        fp = get((F, mb, j, prev_c))
                        if fp is not None and fp > f:
                            bad("order", f"{_at(r, f, stream[f])} runs before the previous stage's {_at(r, fp, stream[fp])}")
                    if next_c is not None:
                        bn = get((B, mb, j, next_c))
                        if bn is not None and bn > b:
                            bad("order", f"{_at(r, b, stream[b])} runs before the next stage's {_at(r, bn, stream[bn])}")
    return out


def _p2p(plan: Plan, pos: list[dict], bad) -> None:
    spec = plan.spec
    owner = spec.stage_rank()
    chunk_of = spec.stage_chunk()
    last = spec.num_stages - 1
    placement = spec.placement
    sends: dict[tuple, list] = {}
    recvs: dict[tuple, list] = {}
    for r, stream in enumerate(plan.ranks):
        for i, ins in enumerate(stream):
            k = ins[0]
            if k in SENDS:
                key = (r, ins[4], ins[5])  # (src, dst=peer, tag)
                lst = sends.get(key)
                if lst is None:
                    sends[key] = [i]
                else:
                    lst.append(i)
            elif k in RECVS:
                key = (ins[4], r, ins[5])
                lst = recvs.get(key)
                if lst is None:
                    recvs[key] = [i]
                else:
                    lst.append(i)
    ranks = plan.ranks
    SEND_ACT = Kind.SEND_ACT
    matched: dict[tuple[int, int], tuple[int, int]] = {}  # (dst, recv index) -> (src, send index)
    # program order of the first send (then receives without a send): the same problems as a
    # set union would give, in a readable order, and walking the dicts in insertion order is
    # far kinder to the cache than hash order at a million instructions
    for key in [*sends, *(k for k in recvs if k not in sends)]:
        src, dst, tag = key
        ss, rr = sends.get(key, []), recvs.get(key, [])
        src_stream, dst_stream = ranks[src], ranks[dst]
        src_place, dst_place = placement[src], placement[dst]
        for si, ri in zip(ss, rr):
            s_ins, r_ins = src_stream[si], dst_stream[ri]
            s_stage = src_place[s_ins[3]]
            want = s_stage + 1 if s_ins[0] == SEND_ACT else s_stage - 1
            if (MATCH[s_ins[0]] != r_ins[0] or s_ins[1] != r_ins[1] or s_ins[2] != r_ins[2]
                    or dst_place[r_ins[3]] != want):
                bad("match", f"{_at(src, si, s_ins)} is matched by tag with {_at(dst, ri, r_ins)}, "
                             f"which expects other data (kind, micro-batch, slice or stage differ)")
            else:
                matched[(dst, ri)] = (src, si)
        for si in ss[len(rr):]:
            bad("match", f"{_at(src, si, ranks[src][si])} has no matching receive on rank {dst}")
        for ri in rr[len(ss):]:
            bad("match", f"{_at(dst, ri, ranks[dst][ri])} has no matching send on rank {src}")
    # every cross-rank dependency goes through a receive placed before its consumer
    m_range, n_range = range(spec.microbatches), range(spec.slices)
    mget = matched.get
    for r, stream in enumerate(ranks):
        rget = pos[r].get
        for c, s in enumerate(placement[r]):
            for (need, recv_kind, nb, send_after, what) in (
                (Kind.F, Kind.RECV_ACT, s - 1, Kind.F, "activation"),
                (Kind.B, Kind.RECV_GRAD, s + 1, Kind.B, "gradient"),
            ):
                if nb < 0 or nb > last or owner[nb] == r:
                    continue
                q = owner[nb]
                qc = chunk_of[nb]
                for mb in m_range:
                    for j in n_range:
                        u = rget((need, mb, j, c))
                        if u is None:
                            continue
                        ri = rget((recv_kind, mb, j, c))
                        if ri is None:
                            bad("dependency", f"{_at(r, u, stream[u])} needs the {what} from rank {q} but rank {r} never receives it")
                            continue
                        src = mget((r, ri))
                        if src is None:
                            continue  # reported as a matching problem
                        q_, si = src
                        if ri > u:
                            bad("dependency", f"{_at(r, u, stream[u])} runs before {_at(r, ri, stream[ri])} that brings its {what} "
                                              f"from {_at(q_, si, ranks[q_][si])}")
                        pu = pos[q_].get((send_after, mb, j, qc))
                        if pu is not None and si < pu:
                            bad("dependency", f"{_at(q_, si, ranks[q_][si])} sends before {_at(q_, pu, ranks[q_][pu])} produces the {what} "
                                              f"that {_at(r, ri, stream[ri])} receives")


def _kv(plan: Plan, bad) -> None:
    ranks = plan.ranks
    ends: dict[tuple, list] = {}
    for r, stream in enumerate(ranks):
        nxt = None  # index of the next compute unit, scanning backwards
        for i in range(len(stream) - 1, -1, -1):
            ins = stream[i]
            k = ins.kind
            if k == Kind.F or k == Kind.B:
                nxt = i
            elif k in KV:
                if k in KV_OWNER:
                    want = Kind.F if k == Kind.KVF_SEND else Kind.B
                    u = stream[nxt] if nxt is not None else None
                    if u is None or (u.kind, u.mb, u.slice, u.chunk) != (want, ins.mb, ins.slice, ins.chunk):
                        bad("kv", f"{_at(r, i, ins)}: the next compute unit must be '{want} mb{ins.mb} s{ins.slice} c{ins.chunk}'")
                    ends.setdefault((r, ins.peer, ins.tag, "o"), []).append(i)
                else:
                    if nxt is None:
                        bad("kv", f"{_at(r, i, ins)}: no compute unit follows to run the exchange alongside")
                    ends.setdefault((ins.peer, r, ins.tag, "p"), []).append(i)
    for (o, pa, tag, side), idx in list(ends.items()):
        if side != "o":
            continue
        other = ends.get((o, pa, tag, "p"), [])
        for oi, pi in zip(idx, other):
            a, b = ranks[o][oi], ranks[pa][pi]
            if MATCH[a.kind] != b.kind or (a.mb, a.slice, a.chunk, a.x) != (b.mb, b.slice, b.chunk, b.x):
                bad("kv", f"{_at(o, oi, a)} is paired by tag with {_at(pa, pi, b)}, which names another exchange")
        for oi in idx[len(other):]:
            bad("kv", f"{_at(o, oi, ranks[o][oi])} has no partner instruction on rank {pa}")
    for (o, pa, tag, side), idx in ends.items():
        if side == "p":
            n_owner = len(ends.get((o, pa, tag, "o"), []))
            for pi in idx[n_owner:]:
                bad("kv", f"{_at(pa, pi, ranks[pa][pi])} has no owner instruction on rank {o}")
