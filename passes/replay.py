"""Event-driven replay of a plan: the one engine behind simulation and the deadlock proof.

Semantics (the executor's): compute units run in program order on their rank; sends never
block (the data leaves when the send is issued and arrives after `p2p_delay`); a receive blocks
until its matching send, matched by (src, dst, tag) in program order; a KV exchange is a
rendezvous of its two ranks. If no rank can move, the wait-for graph names who waits for whom.

`p2p="rendezvous"` models sends that may block until their receive is posted (NCCL, large
messages, nothing buffered): a run of consecutive send/receive instructions is posted together
(the executor issues it as one batch_isend_irecv; `batch_runs=False`: each instruction alone, as
torch's runtime does) and the rank waits there until every receive of the run has its data and
every send of the run has its receive posted. A send ordered before a receive that its peer needs
first then shows up as a wait cycle. Matching by tag equals matching by order once the checker's
p2p-order rule holds (it runs first).

`comm_cost` is the time a send or receive occupies its rank (0 by default); with every action
costing 1 the makespan is the step count of torch's `_simulate_comms_compute`.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from ir import (COMPUTE, KINDS, KV_HELPER, KV_OWNER, KV_PARTNER, RECVS, ROLE, SENDS, UNIT_COST, Instr,
                Plan, PlanFormatError, allowed_kinds, to_text)
from ir.instr import _clip
from ir.gcpause import gc_paused

# the roles of the kind table (ir.KINDS); a kind outside it raises PlanFormatError
_COMPUTE = COMPUTE
_SEND = SENDS
_RECV = RECVS
_KV_OWNER = KV_OWNER
_KV_PARTNER = KV_PARTNER
_KV_HELPER = KV_HELPER


def _unknown(r: int, i: int, ins: Instr) -> PlanFormatError:
    return PlanFormatError(f"rank {r} #{i}: unknown instruction kind {_clip(ins.kind)}; allowed: {allowed_kinds()}")


@dataclass
class Stuck:
    """A rank that cannot move: it waits at instruction `index` for `peer`."""

    rank: int
    index: int
    instr: Instr
    peer: int

    def describe(self, finished: bool = False) -> str:
        what = "a rendezvous with" if self.instr.kind not in _RECV else "data from"
        tail = " (which has finished its stream)" if finished else ""
        return f"rank {self.rank} waits at #{self.index} '{to_text(self.instr)}' for {what} rank {self.peer}{tail}"


@dataclass
class Replay:
    clock: list[float]
    busy: list[float]
    stuck: list[Stuck] = field(default_factory=list)
    cycle: list[int] | None = None
    # (rank, index, start, end) of every compute unit, when asked for
    timeline: list[tuple[int, int, float, float]] | None = None
    # (rank, index, start, end) of every send (issue to arrival) and KV rendezvous, when asked for
    comm: list[tuple[int, int, float, float]] | None = None
    # (rank, index, start, end) of every helper's served block (KV*_HELP), when asked for
    helps: list[tuple[int, int, float, float]] | None = None

    @property
    def makespan(self) -> float:
        return max(self.clock) if self.clock else 0.0

    @property
    def deadlocked(self) -> bool:
        return bool(self.stuck)

    def deadlock_message(self) -> str:
        if not self.stuck:
            return ""
        by_rank = {s.rank: s for s in self.stuck}
        if self.cycle:
            lines = [by_rank[r].describe() for r in self.cycle]
            return "deadlock: wait cycle " + " -> ".join(f"rank {r}" for r in self.cycle + self.cycle[:1]) + ": " + "; ".join(lines)
        lines = [s.describe(finished=s.peer not in by_rank) for s in self.stuck]
        return "deadlock: " + "; ".join(lines)


def unit_cost(rank: int, ins: Instr) -> float:
    """The kind table's unit cost (F = 1, B = 2)."""
    return UNIT_COST[ins.kind]


def _zero(*_args) -> float:
    return 0.0


@gc_paused
def replay(plan: Plan, cost: Callable[[int, Instr], float] = unit_cost,
           p2p_delay: Callable[[int, int, Instr], float] = _zero,
           kv_delay: Callable[[int, int, Instr], float] = _zero,
           record: bool = False, p2p: str = "buffered", batch_runs: bool = True,
           comm_cost: float = 0.0, help_cost: Callable[[int, Instr], float] = _zero,
           msg_cost: Callable[[int, Instr], float] | None = None) -> Replay:
    """Run every rank's stream on virtual clocks. `cost(rank, ins)` is a compute unit's
    duration, `p2p_delay(src, dst, send)` a message's flight time, `kv_delay(owner, partner,
    owner_instr)` the time a KV rendezvous adds to both ranks, `help_cost(rank, help_instr)` the
    time a helper (KV*_HELP) then spends computing the block it serves (its own busy time),
    `msg_cost(rank, send_or_recv)` (buffered p2p) the time a send or receive occupies its rank on
    top of comm_cost: a send's before its data leaves is not modelled, a receive's after its data
    is there (measured CPU work per message: passes.costs.CostModel.msg_time)."""
    if (cost is unit_cost and p2p_delay is _zero and kv_delay is _zero and help_cost is _zero and not record
            and p2p == "buffered" and comm_cost == 0 and msg_cost is None):
        return _replay_units(plan)
    ranks = plan.ranks
    p = len(ranks)
    pos = [0] * p
    clock = [0.0] * p
    busy = [0.0] * p
    posted: dict[tuple[int, int, int], deque] = {}
    waiting: dict[tuple[int, int, int], tuple[int, float]] = {}  # KV rendezvous: first side (rank, time)
    release: dict[tuple[tuple[int, int, int], int], float] = {}  # meeting time for the side still parked
    timeline = [] if record else None
    comm = [] if record else None
    helps = [] if record else None
    kv_start: dict[tuple[int, int], float] = {}
    if p2p not in ("buffered", "rendezvous"):
        raise ValueError(f"p2p={p2p!r}: allowed buffered, rendezvous")
    rdv = p2p == "rendezvous"
    recv_posted: dict[tuple[int, int, int], deque] = {}  # rendezvous: receives posted, by (src, dst, tag)
    run_end = [-1] * p  # rendezvous: end of the run of p2p instructions the rank has posted
    wait_at = [-1] * p  # rendezvous: the instruction of that run the rank waits at
    # a helper meets each owner (rendezvous) and queues the block it serves: it computes its
    # queued blocks one after another as they arrive (free_at: when its queue is empty) while it
    # goes on meeting owners; its next other instruction waits for the queue to drain
    free_at = [0.0] * p
    # the common cases without a call per instruction: the kind table's unit costs, free messages
    unit_costs = UNIT_COST if cost is unit_cost else None
    no_delay = p2p_delay is _zero
    progress = True
    while progress:
        progress = False
        for r in range(p):
            stream = ranks[r]
            n = len(stream)
            i = pos[r]
            if i >= n:
                continue
            t = clock[r]
            b = busy[r]
            start = i
            moved = False
            free = free_at[r]  # changes only at this rank's own helper instructions
            while i < n:
                ins = stream[i]
                k = ins[0]
                if free > t and k not in _KV_HELPER:
                    t = free
                if k in _COMPUTE:
                    d = unit_costs[k] if unit_costs is not None else cost(r, ins)
                    if timeline is not None:
                        timeline.append((r, i, t, t + d))
                    t += d
                    b += d
                elif rdv and (k in _RECV or k in _SEND):
                    j = run_end[r]
                    if j < 0:  # post the run: its sends' data and its receives become visible
                        j = i + 1
                        if batch_runs:
                            while j < n and (stream[j].kind in _RECV or stream[j].kind in _SEND):
                                j += 1
                        run_end[r] = j
                        moved = True
                        for x in range(i, j):
                            op = stream[x]
                            if op.kind in _SEND:
                                posted.setdefault((r, op.peer, op.tag), deque()).append(t + p2p_delay(r, op.peer, op))
                                if comm is not None:
                                    comm.append((r, x, t, t + p2p_delay(r, op.peer, op)))
                            else:
                                recv_posted.setdefault((op.peer, r, op.tag), deque()).append(t)
                    blocked = -1
                    for x in range(i, j):
                        op = stream[x]
                        q = recv_posted.get((r, op.peer, op.tag)) if op.kind in _SEND else posted.get((op.peer, r, op.tag))
                        if not q:
                            blocked = x
                            break
                    if blocked >= 0:
                        wait_at[r] = blocked  # reported as the instruction the rank waits at
                        break
                    for x in range(i, j):
                        op = stream[x]
                        key = (r, op.peer, op.tag) if op.kind in _SEND else (op.peer, r, op.tag)
                        a = (recv_posted if op.kind in _SEND else posted)[key].popleft()
                        if a > t:
                            t = a
                    t += comm_cost * (j - i)
                    run_end[r] = -1
                    i = j
                    continue
                elif k in _RECV:
                    q = posted.get((ins[4], r, ins[5]))
                    if not q:
                        break
                    a = q.popleft()
                    if a > t:
                        t = a
                    t += comm_cost
                    if msg_cost is not None:
                        t += msg_cost(r, ins)
                elif k in _SEND:
                    key = (r, ins[4], ins[5])
                    q = posted.get(key)
                    if q is None:
                        q = posted[key] = deque()
                    arrive = t if no_delay else t + p2p_delay(r, ins[4], ins)
                    q.append(arrive)
                    if comm is not None:
                        comm.append((r, i, t, arrive))
                    t += comm_cost
                    if msg_cost is not None:
                        t += msg_cost(r, ins)
                elif k in _KV_OWNER or k in _KV_PARTNER or k in _KV_HELPER:
                    key = (r, ins.peer, ins.tag) if k in _KV_OWNER else (ins.peer, r, ins.tag)
                    rel = release.pop((key, r), None)
                    if rel is not None:
                        if comm is not None:
                            comm.append((r, i, kv_start.pop((r, i), t), rel))
                        t = rel
                    else:
                        w = waiting.get(key)
                        if w is None:
                            waiting[key] = (r, t)
                            if comm is not None:
                                kv_start[(r, i)] = t
                            break
                        if w[0] == r:
                            break
                        del waiting[key]
                        t0 = t
                        t = max(t, w[1]) + kv_delay(key[0], key[1], ins)
                        release[(key, w[0])] = t
                        if comm is not None:
                            comm.append((r, i, t0, t))
                    if k in _KV_HELPER:
                        d = help_cost(r, ins)
                        t0 = max(t, free_at[r])
                        free_at[r] = free = t0 + d
                        b += d
                        if helps is not None:
                            helps.append((r, i, t0, t0 + d))
                elif k not in KINDS:
                    raise _unknown(r, i, ins)
                i += 1
            if i >= n and free_at[r] > t:
                t = free_at[r]
            if i != start or moved:
                progress = True
            pos[r] = i
            clock[r] = t
            busy[r] = b
        if not progress:
            break
    res = Replay(clock, busy, timeline=timeline, comm=comm, helps=helps)
    at = [wait_at[r] if run_end[r] >= 0 else pos[r] for r in range(p)]
    stuck = [Stuck(r, at[r], ranks[r][at[r]], ranks[r][at[r]].peer) for r in range(p) if pos[r] < len(ranks[r])]
    if stuck:
        res.stuck = stuck
        res.cycle = wait_cycle(stuck)
    return res


# _replay_units: what each kind does (0 receive, 1 send, 2 KV owner, 3 KV partner or helper, 4 nothing)
_ACTION = {k: (0 if k in _RECV else 1 if k in _SEND else 2 if k in _KV_OWNER else 3 if k in _KV_PARTNER or k in _KV_HELPER
               else 4) for k in KINDS if k not in _COMPUTE}
_UNIT = {k: UNIT_COST[k] for k in _COMPUTE}


def _replay_units(plan: Plan) -> Replay:
    """replay(plan) with its defaults (the kind table's unit costs, buffered sends, nothing
    recorded), the run `check` and `simulate --unit-costs` make: the same loop with what those
    defaults make constant taken out (no delays; a helper serves in no time, so it never waits for
    its queue), and a message's arrival kept as a number (a queue only where one (src, dst, tag)
    is sent again before it is received)."""
    ranks = plan.ranks
    p = len(ranks)
    pos = [0] * p
    clock = [0.0] * p
    busy = [0.0] * p
    posted: dict = {}  # (src, dst, tag) -> arrival time, or a deque of them while several are in flight
    waiting: dict[tuple[int, int, int], tuple[int, float]] = {}
    release: dict[tuple[tuple[int, int, int], int], float] = {}
    costs = _UNIT
    action = _ACTION
    progress = True
    while progress:
        progress = False
        for r in range(p):
            stream = ranks[r]
            n = len(stream)
            i = pos[r]
            if i >= n:
                continue
            t = clock[r]
            b = busy[r]
            start = i
            while i < n:
                ins = stream[i]
                k = ins[0]
                d = costs.get(k)
                if d is not None:
                    t += d
                    b += d
                    i += 1
                    continue
                a = action.get(k)
                if a == 0:  # a receive
                    key = (ins[4], r, ins[5])
                    x = posted.pop(key, None)
                    if x is None:
                        break
                    if type(x) is deque:
                        q = x
                        x = q.popleft()
                        if q:
                            posted[key] = q
                    if x > t:
                        t = x
                elif a == 1:  # a send
                    key = (r, ins[4], ins[5])
                    x = posted.get(key)
                    if x is None:
                        posted[key] = t
                    elif type(x) is deque:
                        x.append(t)
                    else:
                        posted[key] = deque((x, t))
                elif a == 2 or a == 3:  # a KV rendezvous
                    key = (r, ins[4], ins[5]) if a == 2 else (ins[4], r, ins[5])
                    rel = release.pop((key, r), None)
                    if rel is not None:
                        t = rel
                    else:
                        w = waiting.get(key)
                        if w is None:
                            waiting[key] = (r, t)
                            break
                        if w[0] == r:
                            break
                        del waiting[key]
                        if w[1] > t:
                            t = w[1]
                        release[(key, w[0])] = t
                elif a is None:
                    raise _unknown(r, i, ins)
                i += 1
            if i != start:
                progress = True
            pos[r] = i
            clock[r] = t
            busy[r] = b
    res = Replay(clock, busy)
    stuck = [Stuck(r, pos[r], ranks[r][pos[r]], ranks[r][pos[r]].peer) for r in range(p) if pos[r] < len(ranks[r])]
    if stuck:
        res.stuck = stuck
        res.cycle = wait_cycle(stuck)
    return res


def wait_cycle(stuck: list[Stuck]) -> list[int] | None:
    """The ranks of a cycle in the wait-for graph, if there is one (networkx)."""
    import networkx as nx

    g = nx.DiGraph()
    g.add_edges_from((s.rank, s.peer) for s in stuck)
    try:
        return [u for u, _ in nx.find_cycle(g)]
    except nx.NetworkXNoCycle:
        return None


@gc_paused
def replay_shared(plan: Plan, cost: Callable[[int, Instr], float], processors: int,
                  p2p_delay: Callable[[int, int, Instr], float] = _zero,
                  kv_delay: Callable[[int, int, Instr], float] = _zero,
                  record: bool = False, help_cost: Callable[[int, Instr], float] = _zero,
                  timeslice: float = 0.0, msg_cost: Callable[[int, Instr], float] | None = None) -> Replay:
    """replay() for ranks that share `processors` processors (more CPU ranks than cores). With
    timeslice 0, while k ranks compute at once each runs at min(1, processors / k) of its speed (a
    fair share). With timeslice > 0 (seconds) the OS is modelled as it runs threads: a rank that
    can compute takes a free processor, or joins a first-come queue; one that computes keeps its
    processor for a timeslice while others queue, then goes to the back; a send or receive hands
    its processor on (the rank's threads sleep and wake around a message), an unbroken run of units
    keeps it. A unit shorter than the slice then runs at full speed while its peers wait for a
    processor, which a fair share hides
    (on the 2-core machine this project is built on, 4 ranks: bubbles 24% predicted with a fair
    share, 50% measured; bench/fidelity.py). `busy` is wall time in compute units from the moment a
    unit first got a processor, as a measured trace sees it. `msg_cost(rank, send_or_recv)`:
    processor time a send or receive takes on its rank (a receive's once its data is there), not
    counted busy. A plan that deadlocks here deadlocks in replay() too (use that for the message).
    A helper (KV*_HELP) computes its block right after its rendezvous, as work of its own."""
    ranks = plan.ranks
    p = len(ranks)
    pos = [0] * p
    busy = [0.0] * p
    left = [0.0] * p           # remaining work of the unit a rank is computing (its own seconds)
    started = [0.0] * p
    until = [None] * p         # a rank waiting for a message or rendezvous: the time it is free
    done_at = [None] * p
    computing: set[int] = set()
    helping: dict[int, int] = {}   # rank -> index of the KV*_HELP whose block it computes
    owed = [None] * p              # a helper's (index, seconds) still to compute after its rendezvous
    posted: dict[tuple[int, int, int], deque] = {}
    waiting: dict[tuple[int, int, int], tuple[int, float, int]] = {}
    timeline = [] if record else None
    comm = [] if record else None
    helps = [] if record else None
    T = 0.0
    eps = 1e-12
    runq: deque = deque()      # timeslice > 0: ranks that can compute, waiting for a processor
    running: dict = {}         # timeslice > 0: rank -> end of its slice on a processor
    overhead = [0.0] * p       # processor time still owed for this rank's sends and receives
    in_overhead: set[int] = set()

    def compute(r: int, seconds: float) -> None:
        left[r] = seconds
        computing.add(r)
        if timeslice and r not in running:  # a rank that holds a processor goes on with its slice
            started[r] = None
            runq.append(r)
        else:
            started[r] = T

    def advance(r: int) -> None:
        """Move rank r through instructions at time T until it computes, waits or ends."""
        stream = ranks[r]
        if overhead[r] > 0 and r not in computing and until[r] is None:
            in_overhead.add(r)
            compute(r, overhead[r])
            overhead[r] = 0.0
            return
        if owed[r] is not None and r not in computing and until[r] is None:
            i, seconds = owed[r]
            owed[r] = None
            helping[r] = i
            compute(r, seconds)
            return
        while pos[r] < len(stream) and r not in computing and until[r] is None:
            i = pos[r]
            ins = stream[i]
            k = ins.kind
            if k in _COMPUTE:
                compute(r, cost(r, ins))
                return
            if k in _RECV:
                q = posted.get((ins.peer, r, ins.tag))
                if not q:
                    return
                a = q.popleft()
                pos[r] += 1
                running.pop(r, None)  # a message hands the processor on (the rank's threads sleep and wake)
                if a > T + eps:
                    until[r] = a
                if msg_cost is not None:
                    overhead[r] += msg_cost(r, ins)
                    if until[r] is None:
                        advance(r)
                        return
            elif k in _SEND:
                arrive = T + p2p_delay(r, ins.peer, ins)
                posted.setdefault((r, ins.peer, ins.tag), deque()).append(arrive)
                if comm is not None:
                    comm.append((r, i, T, arrive))
                pos[r] += 1
                running.pop(r, None)
                if msg_cost is not None:
                    overhead[r] += msg_cost(r, ins)
                    advance(r)
                    return
            elif k in _KV_OWNER or k in _KV_PARTNER or k in _KV_HELPER:
                key = (r, ins.peer, ins.tag) if k in _KV_OWNER else (ins.peer, r, ins.tag)
                if k in _KV_HELPER:
                    owed[r] = (i, help_cost(r, ins))
                w = waiting.get(key)
                if w is None:
                    waiting[key] = (r, T, i)
                    pos[r] += 1
                    until[r] = float("inf")  # released by the partner
                    return
                del waiting[key]
                o, t0, oi = w
                end = T + kv_delay(key[0], key[1], ins)
                until[o] = end
                if comm is not None:
                    comm.append((o, oi, t0, end))
                    comm.append((r, i, T, end))
                pos[r] += 1
                if end > T + eps:
                    until[r] = end
                if owed[r] is not None:
                    return
            elif k not in KINDS:
                raise _unknown(r, i, ins)
            else:
                pos[r] += 1

    while True:
        moved = True
        while moved:
            moved = False
            for r in range(p):
                before = (pos[r], r in computing, until[r])
                advance(r)
                if (pos[r], r in computing, until[r]) != before:
                    moved = True
                if done_at[r] is None and pos[r] >= len(ranks[r]) and r not in computing and until[r] is None \
                        and owed[r] is None:
                    done_at[r] = T
        if timeslice:
            for r in [r for r in running if r not in computing]:  # it waits or has ended: frees its processor
                del running[r]
            while runq and len(running) < processors:
                r = runq.popleft()
                running[r] = T + timeslice
                if started[r] is None:
                    started[r] = T
            t_next = min((T + left[r] for r in running), default=float("inf"))
            if runq:
                t_next = min(t_next, max(T, min(running.values())))  # a slice that ran out while nobody waited ends now
            rate = 1.0
        else:
            k = len(computing)
            rate = min(1.0, processors / k) if k else 1.0
            t_next = min((left[r] / rate for r in computing), default=float("inf")) + T
        t_wait = min((u for u in until if u is not None), default=float("inf"))
        t = min(t_next, t_wait)
        if t == float("inf"):
            break
        dt = t - T
        for r in list(computing):
            if r not in in_overhead and started[r] is not None:
                busy[r] += dt
            if timeslice and r not in running:
                continue
            left[r] -= dt * rate
            # done: what is left is below eps, or too small to move the clock at time t (at
            # T = 17668 s a float step is 3.6e-12 s: an absolute eps alone left dt = 0 forever)
            if left[r] <= max(eps * max(1.0, dt), 4 * math.ulp(t) * rate):
                computing.discard(r)  # a rank keeps its processor (and slice) until it has to wait
                if r in in_overhead:
                    in_overhead.discard(r)
                    continue
                if r in helping:  # a helper's block: its instruction was passed at the rendezvous
                    j = helping.pop(r)
                    if helps is not None:
                        helps.append((r, j, started[r], t))
                    continue
                if timeline is not None:
                    timeline.append((r, pos[r], started[r], t))
                pos[r] += 1
            elif timeslice and runq and running[r] <= t + eps:  # its slice is over and others wait
                del running[r]
                runq.append(r)
        T = t
        for r in range(p):
            if until[r] is not None and until[r] <= T + eps:
                until[r] = None
    clock = [T if d is None else d for d in done_at]
    res = Replay(clock, busy, timeline=timeline, comm=comm, helps=helps)
    if any(pos[r] < len(ranks[r]) for r in range(p)):
        res.stuck = [Stuck(r, min(pos[r], len(ranks[r]) - 1), ranks[r][min(pos[r], len(ranks[r]) - 1)],
                           ranks[r][min(pos[r], len(ranks[r]) - 1)].peer) for r in range(p) if pos[r] < len(ranks[r])]
    return res


@gc_paused
def start_times(plan: Plan, weights: list[dict[str, float]], by_start: bool = False):
    """Start time of every compute unit under up to three unit costs at once: weights[k] maps a
    cost class (ir.KINDS column `cost`: forward, backward, backward_input, backward_weight) to a
    duration; communication free. [(rank, index, (start under weights[0], ...))] in replay order,
    or None if the plan deadlocks. One pass: whether an instruction can move never depends on the
    costs (sends do not block), so every weighting follows the same schedule. For plans without
    KV exchanges (the input of the exchange pass).
    `by_start=True` (two weightings): the units grouped instead, {(start under weights[0], start
    under weights[1], kind): [(rank, index), ...] in replay order} (what the exchange pass's
    pairing wants, without a list of every unit to group afterwards)."""
    K = len(weights)
    if not 1 <= K <= 3:
        raise ValueError("start_times takes one to three weightings")
    if by_start and K != 2:
        raise ValueError("start_times(by_start=True) takes two weightings")
    pad = (0.0,) * (3 - K)
    two = K == 2
    dur = {k: tuple(w[KINDS[k].cost] for w in weights) + pad for k in COMPUTE}
    ranks = plan.ranks
    p = len(ranks)
    pos = [0] * p
    clock = [(0.0, 0.0, 0.0)] * p
    posted: dict = {}  # (src, dst, tag) -> the sender's clocks, or a deque of them while several are in flight
    out = {} if by_start else []
    add = None if by_start else out.append
    group = out.setdefault if by_start else None
    recv_kinds, send_kinds = _RECV, _SEND
    progress = True
    while progress:
        progress = False
        for r in range(p):
            stream = ranks[r]
            n = len(stream)
            i = pos[r]
            if i >= n:
                continue
            a, b, c = clock[r]
            start = i
            while i < n:
                ins = stream[i]
                k = ins[0]
                d = dur.get(k)
                if d is not None:
                    if by_start:
                        group((a, b, k), []).append((r, i))
                    else:
                        add((r, i, (a, b) if two else (a, b, c)[:K]))
                    a += d[0]
                    b += d[1]
                    c += d[2]
                elif k in recv_kinds:
                    key = (ins[4], r, ins[5])
                    x = posted.pop(key, None)
                    if x is None:
                        break
                    if type(x) is deque:  # several in flight under one (src, dst, tag): the first
                        q = x
                        x = q.popleft()
                        if q:
                            posted[key] = q
                    x, y, z = x
                    if x > a:
                        a = x
                    if y > b:
                        b = y
                    if z > c:
                        c = z
                elif k in send_kinds:
                    key = (r, ins[4], ins[5])
                    x = posted.get(key)
                    if x is None:
                        posted[key] = (a, b, c)
                    elif type(x) is deque:
                        x.append((a, b, c))
                    else:
                        posted[key] = deque((x, (a, b, c)))
                elif k not in KINDS:
                    raise _unknown(r, i, ins)
                elif ROLE[k] != "optimizer":
                    raise ValueError(f"start_times: {k} is not allowed here (a plan without KV exchanges)")
                i += 1
            if i != start:
                progress = True
            pos[r] = i
            clock[r] = (a, b, c)
    if any(pos[r] < len(ranks[r]) for r in range(p)):
        return None
    return out
