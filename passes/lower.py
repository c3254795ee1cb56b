"""Communication lowering: insert sends/receives at every stage boundary that crosses ranks.

A receive sits right before the unit that consumes it, a send right after the unit that produces
it. With non-blocking sends (the executor's semantics) this adds no wait that the compute order
did not already have, so a feasible compute order stays deadlock-free.

Then `order_receives` makes each rank pair's receives follow its sends (rule p2p-order: NCCL
matches the messages of a pair in posting order, whatever their tags): a receive whose send
comes earlier on the peer than the send of a receive placed before it is hoisted to sit right
before that receive. It then waits for data that was sent no later than the data the rank
waited for at that point anyway, so no wait and no deadlock is added.
"""
from __future__ import annotations

from ir import KINDS, RECVS, SENDS, Instr, Plan
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
            row = KINDS[ins.kind]  # the kind table says what a compute unit receives and sends
            if row.role != "compute" or (row.receives is None and row.sends is None):
                add(ins)
                continue
            mb, j, c = ins.mb, ins.slice, ins.chunk
            s = stages[c]
            step, direction = (1, ACT) if row.phase == "forward" else (-1, GRAD)
            src, dst = s - step, s + step  # the stage its input comes from, the one its output goes to
            if row.receives is not None and 0 <= src <= last and owner[src] != r:
                add(Instr(row.receives, mb, j, c, owner[src], p2p_tag(spec, mb, j, min(s, src), direction)))
            add(ins)
            if row.sends is not None and 0 <= dst <= last and owner[dst] != r:
                add(Instr(row.sends, mb, j, c, owner[dst], p2p_tag(spec, mb, j, min(s, dst), direction)))
        out.append(ops)
    return order_receives(plan.with_ranks(out, lowered=True))


@gc_paused
def order_receives(plan: Plan) -> Plan:
    """Reorder each rank's p2p receives so that, per source rank, they come in the order of that
    rank's sends to it (matched by tag). Receives only move earlier; nothing else moves."""
    ranks = plan.ranks
    send_rank: dict[tuple[int, int, int], int] = {}  # (src, dst, tag) -> position among src's sends to dst
    count: dict[tuple[int, int], int] = {}
    for r, stream in enumerate(ranks):
        for ins in stream:
            if ins[0] in SENDS:
                key = (r, ins[4])
                k = count.get(key, 0)
                count[key] = k + 1
                send_rank.setdefault((r, ins[4], ins[5]), k)
    out = []
    changed = False
    for r, stream in enumerate(ranks):
        chains: dict[int, list[tuple[int, int]]] = {}  # src -> [(send order, position)]
        for i, ins in enumerate(stream):
            if ins[0] in RECVS:
                k = send_rank.get((ins[4], r, ins[5]))
                if k is None:
                    continue  # unmatched: the checker reports it; leave it where it is
                chains.setdefault(ins[4], []).append((k, i))
        moved: dict[int, tuple] = {}
        for chain in chains.values():
            chain.sort()
            if all(chain[j][1] < chain[j + 1][1] for j in range(len(chain) - 1)):
                continue
            at = len(stream)
            for k, i in reversed(chain):
                at = min(at, i)
                if at != i:
                    changed = True
                moved[i] = (at, 0, k)
        if not moved:
            out.append(stream)
            continue
        keys = [moved.get(i) or (i, 1, 0) for i in range(len(stream))]
        out.append(tuple(stream[i] for i in sorted(range(len(stream)), key=keys.__getitem__)))
    return plan.with_ranks(out) if changed else plan
