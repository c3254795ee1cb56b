"""Communication lowering: insert sends/receives at every stage boundary that crosses ranks.

A receive sits right before the unit that consumes it, a send right after the unit that produces
it. With non-blocking sends (the executor's semantics) this adds no wait that the compute order
did not already have, so a feasible compute order stays deadlock-free.
"""
from __future__ import annotations

from ir import Instr, Kind, Plan
from ir.gcpause import gc_paused

ACT, GRAD = 0, 1


def p2p_tag(spec, mb: int, j: int, boundary: int, direction: int) -> int:
    """Unique tag of the activation (direction 0) or gradient (1) crossing boundary
    stage `boundary` -> `boundary+1` for (mb, slice j)."""
    return ((mb * spec.slices + j) * spec.num_stages + boundary) * 2 + direction


def kv_tag_base(spec) -> int:
    """First tag free for KV exchanges (above every p2p tag)."""
    return spec.microbatches * spec.slices * spec.num_stages * 2


@gc_paused
def lower_comm(plan: Plan) -> Plan:
    spec = plan.spec
    owner = spec.stage_rank()
    last = spec.num_stages - 1
    out = []
    for r, stream in enumerate(plan.ranks):
        stages = spec.placement[r]
        ops: list[Instr] = []
        add = ops.append
        for ins in stream:
            k = ins.kind
            if k == Kind.F:
                mb, j, c = ins.mb, ins.slice, ins.chunk
                s = stages[c]
                if s > 0 and owner[s - 1] != r:
                    add(Instr(Kind.RECV_ACT, mb, j, c, owner[s - 1], p2p_tag(spec, mb, j, s - 1, ACT)))
                add(ins)
                if s < last and owner[s + 1] != r:
                    add(Instr(Kind.SEND_ACT, mb, j, c, owner[s + 1], p2p_tag(spec, mb, j, s, ACT)))
            elif k == Kind.B:
                mb, j, c = ins.mb, ins.slice, ins.chunk
                s = stages[c]
                if s < last and owner[s + 1] != r:
                    add(Instr(Kind.RECV_GRAD, mb, j, c, owner[s + 1], p2p_tag(spec, mb, j, s, GRAD)))
                add(ins)
                if s > 0 and owner[s - 1] != r:
                    add(Instr(Kind.SEND_GRAD, mb, j, c, owner[s - 1], p2p_tag(spec, mb, j, s - 1, GRAD)))
            else:
                add(ins)
        out.append(ops)
    return plan.with_ranks(out, lowered=True)
