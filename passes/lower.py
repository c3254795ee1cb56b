"""Communication lowering: insert sends/receives at every stage boundary that crosses ranks.

A receive sits right before the unit that consumes it, a send right after the unit that produces
it. With non-blocking sends (the executor's semantics) this adds no wait that the compute order
did not already have, so a feasible compute order stays deadlock-free.

Then `order_receives` makes each rank pair's receives follow its sends (rule p2p-order: NCCL
matches the messages of a pair in posting order, whatever their tags): a receive whose send
comes earlier on the peer than the send of a receive placed before it is hoisted to sit right
before that receive. It then waits for data that was sent no later than the data the rank
waited for at that point anyway, so no wait and no deadlock is added.

`order_for_single_posting` orders the sends and receives inside each run of consecutive p2p
instructions (a run is one batch for our executor, so the plan leaves its order open) for a
runtime that posts every instruction alone, as torch's does: there a send ordered before a
receive that its peer needs first is a wait cycle when sends block until their receive is posted.
"""
from __future__ import annotations

from collections import deque

from ir import KINDS, P2P, RECVS, SENDS, Instr, Plan
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
    n_slices, n_stages = spec.slices, spec.num_stages  # p2p_tag's arithmetic, inlined in the loop below
    # per kind: None (passes through) or (receive kind, send kind, step, direction) from the kind table
    how = {}
    for k, row in KINDS.items():
        if row.role == "compute" and (row.receives is not None or row.sends is not None):
            step, direction = (1, ACT) if row.phase == "forward" else (-1, GRAD)
            how[k] = (row.receives, row.sends, step, direction)
    new = tuple.__new__  # an Instr without the Python-level Instr.__new__ (all eight fields given)
    out = []
    # what order_receives looks for, noted while the messages are made: per (src, dst) the send
    # tags in src's order, the receive tags and positions in dst's order
    send_tags: dict[tuple[int, int], list[int]] = {}
    recv_tags: dict[tuple[int, int], list[int]] = {}
    recv_at: dict[tuple[int, int], list[int]] = {}
    p2p = SENDS | RECVS
    given = False  # the input has messages of its own: order_receives scans for itself
    for r, stream in enumerate(plan.ranks):
        mine: dict[int, list[int]] = {}  # peer -> tags sent to it
        theirs: dict[int, tuple[list[int], list[int]]] = {}  # peer -> (tags received from it, positions)
        # per kind, per chunk of this rank: (receive kind, source rank, tag's boundary stage, its
        # tags, its positions, send kind, destination rank, boundary, its tags, direction); a side
        # without a message across ranks has kind None (p2p_tag's arithmetic, inlined in the loop)
        table = {}
        for k, (receives, sends, step, direction) in how.items():
            rows = []
            for s in spec.placement[r]:
                src, dst = s - step, s + step  # the stage its input comes from, the one its output goes to
                rk = qs = bs = rt = ra = sk = qd = bd = st = None
                if receives is not None and 0 <= src <= last and owner[src] != r:
                    rk, qs, bs = receives, owner[src], min(s, src)
                    seen = theirs.get(qs)
                    if seen is None:
                        seen = theirs[qs] = ([], [])
                    rt, ra = seen
                if sends is not None and 0 <= dst <= last and owner[dst] != r:
                    sk, qd, bd = sends, owner[dst], min(s, dst)
                    st = mine.get(qd)
                    if st is None:
                        st = mine[qd] = []
                rows.append((rk, qs, bs, rt, ra, sk, qd, bd, st, direction))
            table[k] = rows
        ops: list[Instr] = []
        add = ops.append
        for ins in stream:
            rows = table.get(ins[0])
            if rows is None:
                if ins[0] not in KINDS:
                    raise KeyError(ins[0])
                given = given or ins[0] in p2p
                add(ins)
                continue
            rk, qs, bs, rt, ra, sk, qd, bd, st, direction = rows[ins[3]]
            mb, j, c = ins[1], ins[2], ins[3]
            if rk is not None:
                tag = ((mb * n_slices + j) * n_stages + bs) * 2 + direction
                rt.append(tag)
                ra.append(len(ops))
                add(new(Instr, (rk, mb, j, c, qs, tag, 0, 0)))
            add(ins)
            if sk is not None:
                tag = ((mb * n_slices + j) * n_stages + bd) * 2 + direction
                st.append(tag)
                add(new(Instr, (sk, mb, j, c, qd, tag, 0, 0)))
        out.append(ops)
        for q, tags in mine.items():
            if tags:
                send_tags[(r, q)] = tags
        for q, (tags, at) in theirs.items():
            if tags:
                recv_tags[(q, r)] = tags
                recv_at[(q, r)] = at
    lowered = plan.with_ranks(out, lowered=True)
    return order_receives(lowered) if given else order_receives(lowered, (send_tags, recv_tags, recv_at))


@gc_paused
def order_receives(plan: Plan, tables=None) -> Plan:
    """Reorder each rank's p2p receives so that, per source rank, they come in the order of that
    rank's sends to it (matched by tag). Receives only move earlier; nothing else moves.
    `tables`: (send tags, receive tags, receive positions) per (src, dst) in program order, as
    lower_comm notes them; None = scan the plan for them."""
    ranks = plan.ranks
    if tables is None:
        send_tags: dict[tuple[int, int], list[int]] = {}  # (src, dst) -> tags in src's program order
        recv_at: dict[tuple[int, int], list[int]] = {}  # (src, dst) -> positions of dst's receives from src
        for r, stream in enumerate(ranks):
            for i, ins in enumerate(stream):
                k = ins[0]
                if k in SENDS:
                    key = (r, ins[4])
                    tags = send_tags.get(key)
                    if tags is None:
                        tags = send_tags[key] = []
                    tags.append(ins[5])
                elif k in RECVS:
                    key = (ins[4], r)
                    at = recv_at.get(key)
                    if at is None:
                        at = recv_at[key] = []
                    at.append(i)
        recv_tags = {key: [ranks[key[1]][i][5] for i in at] for key, at in recv_at.items()}
    else:
        send_tags, recv_tags, recv_at = tables
    moved_by_rank: dict[int, dict[int, tuple]] = {}
    for (src, dst), at in recv_at.items():
        stream = ranks[dst]
        tags = send_tags.get((src, dst), [])
        if recv_tags[(src, dst)] == tags:
            continue  # already in send order (the common case)
        order = {t: k for k, t in reversed(list(enumerate(tags)))}  # first send of each tag
        chain = sorted((order[stream[i][5]], i) for i in at if stream[i][5] in order)  # unmatched: left alone
        moved = moved_by_rank.setdefault(dst, {})
        pos = len(stream)
        for k, i in reversed(chain):
            pos = min(pos, i)
            moved[i] = (pos, 0, k)
    changed = False
    out = list(ranks)
    for r, moved in moved_by_rank.items():
        stream = ranks[r]
        if all(key[0] == i for i, key in moved.items()):
            continue
        keys = [moved.get(i) or (i, 1, 0) for i in range(len(stream))]
        out[r] = tuple(stream[i] for i in sorted(range(len(stream)), key=keys.__getitem__))
        changed = True
    return plan.with_ranks(out) if changed else plan


@gc_paused
def order_for_single_posting(plan: Plan) -> Plan:
    """The plan with the sends and receives inside its runs of consecutive p2p instructions
    reordered so that posting each one alone, a send blocking until its receive is posted and a
    receive until its send is (NCCL's large messages under torch's runtime, p2p_batching
    "single"), has no wait cycle; the plan itself where it has none as it is. Where no order of
    its runs avoids one (posting each run as one batch then waits in a cycle too), the runs up to
    that cycle are ordered and the rest keep their order, so the first cycle left is that one.
    Nothing moves out of its run, so our executor runs the same batches, and per peer and
    direction the order is kept (NCCL matches a rank pair's messages in posting order).
    A replay of that posting: a send meets its receive when both are the next instruction of
    their ranks; when no rank can go on so, one instruction that is first in its run for its peer
    and direction meets its counterpart ahead of its run's order (any order that finishes makes
    that meeting, so this finishes where such an order exists), and the replay goes on in order.
    Plans with KV exchanges are not for this pass (they are run boundaries that never wait here)."""
    ranks = plan.ranks
    p = len(ranks)
    out: list[list[Instr]] = [[] for _ in range(p)]
    pos = [0] * p
    runs: list[list[int] | None] = [None] * p  # what is left of the run each rank stands at (indices)
    work = deque(range(p))

    def advance(r: int) -> None:  # emit up to rank r's next run and stand there (None: stream done)
        stream, i = ranks[r], pos[r]
        n = len(stream)
        while i < n and stream[i][0] not in P2P:
            out[r].append(stream[i])
            i += 1
        j = i
        while j < n and stream[j][0] in P2P:
            j += 1
        pos[r] = j
        runs[r] = list(range(i, j)) if j > i else None

    def first(r: int, send: bool, peer: int) -> int | None:  # position in runs[r] of its first such op
        stream = ranks[r]
        return next((k for k, x in enumerate(runs[r]) if (stream[x][0] in SENDS) == send and stream[x][4] == peer), None)

    def meet(r: int, k: int, ahead: bool) -> bool:
        """Whether op k of r's run and its counterpart (the peer's next op unless `ahead`) meet now."""
        op = ranks[r][runs[r][k]]
        send, b = op[0] in SENDS, op[4]
        if not runs[b]:
            return False
        kb = first(b, not send, r)
        if kb is None or ranks[b][runs[b][kb]][5] != op[5] or (kb and not ahead):
            return False
        del runs[r][k]
        out[r].append(op)
        out[b].append(ranks[b][runs[b].pop(kb)])
        for q in (r, b):
            if not runs[q]:
                advance(q)
            work.append(q)
        return True

    def meet_ahead() -> bool:  # one meeting out of order: on one side if that will do, else on both
        for ahead in (False, True):
            for r in range(p):
                stream = ranks[r]
                for k, x in enumerate(runs[r] or ()):
                    if k and first(r, stream[x][0] in SENDS, stream[x][4]) == k and meet(r, k, ahead):
                        return True
        return False

    for r in range(p):
        advance(r)
    while True:
        while work:
            r = work.popleft()
            while runs[r] and meet(r, 0, False):
                pass
        if not meet_ahead():
            break
    for r in range(p):  # stuck in a cycle no order avoids: the rest as it was
        out[r].extend(ranks[r][x] for x in runs[r] or ())
        out[r].extend(ranks[r][pos[r]:])
    if all(tuple(o) == s for o, s in zip(out, ranks)):
        return plan
    return plan.with_ranks(out)
