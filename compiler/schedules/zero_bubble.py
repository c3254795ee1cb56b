"""Zero-bubble families: the split backward (I, then W any time later) ordered by a greedy list
scheduler over unit costs (F = I = W = 1; communication free).

Each rank, whenever it is idle, runs (1) the next ready F, if fewer than `limit_i` of its units
are between F and I and fewer than `limit_w` between F and W, else (2) the first ready I (its
output gradient has arrived, its later slices' I have run), else (3) the oldest pending W, else
it waits. Forwards run per chunk in (micro-batch, slice ascending) order, input gradients per chunk
in (micro-batch, slice descending) order; among chunks the deeper stage goes first for F and I.
The W passes thus fill what would be idle time (the 1F1B cool-down, the gaps at the ends of the
V), and the `limit_w` cap keeps the memory they hold bounded.

- zb-h1 (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024, ZB-H1): plain placement,
  limit_i = p - r + n - 1 (1F1B's in-flight limit, Seq1F1B's with n slices), limit_w = p + n - 1
  (rank 0's 1F1B peak). Unit-cost bubble (p-1)/(3m + p-1) for m >= p, n = 1
  (tests/test_zero_bubble.py); with slices it stays within a few units of (p-1)/(3mn + p-1).
- zb-v (same paper, ZB-V): V placement (chunk 0 of rank r is stage r, chunk 1 stage 2p-1-r),
  v = 2, limit_i = limit_w = min(2p + 2(n - 1), mn + n + r) chunk units on rank r (n = 1: 1F1B's
  peak activation memory, 2p half-size chunks = p whole-rank units; fewer when m is small). Unit-cost bubble exactly
  (p-1)/(6m + p-1) for n = 1 and m = p (any p), or p <= 4 and m >= p + 2 (tests/test_zero_bubble.py);
  elsewhere a few units more (p = 5, m >= p + 2: one unit).
- interleaved-zb (torch's ScheduleInterleavedZeroBubble, "ZB1P"): looping placement, v chunks,
  interleaved 1F1B's in-flight limit min(2(p-r-1) + (v-1)p, m v) + 1 (+ n - 1 with slices) for I;
  limit_w = v p + n - 1 (what torch's order peaks at on every rank). Unit-cost bubble exactly
  (p-1)/(3vm + p-1), rank-0 peak v p, for n = 1, any m >= p (a multiple of p or not) and p <= 4
  (not always from p = 5: p = 5, v = 2, m = 6 takes 41 units, 1 over). With m < p (n = 1) the
  ready I goes before F; exact figures and torch's own order in tests/test_zero_bubble.py.
"""
from __future__ import annotations

from collections import deque

from ir import Instr, Kind, PlanSpec, SpecError

from .common import Family, Order


def greedy_order(spec: PlanSpec, limit_i: list[int], limit_w: list[int], split: bool = True,
                 i_first: bool = False, chunk_limit: list[list[int]] | None = None) -> Order:
    """Per-rank compute order from the list scheduler in the module docstring (split: I and W;
    else fused B of cost 2 and limit_w is ignored)."""
    p, m, n, v = spec.pp, spec.microbatches, spec.slices, spec.virtual_stages
    owner = spec.stage_rank()
    chunk_of = spec.stage_chunk()
    last = spec.num_stages - 1
    stages = spec.placement
    # per rank, chunks by depth (deeper stage first)
    chunk_order = [sorted(range(v), key=lambda c, r=r: -stages[r][c]) for r in range(p)]
    fq = [[[(mb, j) for mb in range(m) for j in range(n)] for _ in range(v)] for _ in range(p)]
    bq = [[[(mb, j) for mb in range(m) for j in reversed(range(n))] for _ in range(v)] for _ in range(p)]
    fpos = [[0] * v for _ in range(p)]
    bpos = [[0] * v for _ in range(p)]
    f_end: dict[tuple[int, int, int], int] = {}   # (mb, j, stage) -> end time of its F
    i_end: dict[tuple[int, int, int], int] = {}
    pending_w: list[deque] = [deque() for _ in range(p)]
    n_i = [0] * p  # units between F and I
    n_w = [0] * p  # units between F and W
    n_c = [[0] * v for _ in range(p)]  # per chunk: units between F and I
    cap = chunk_limit or [[m * n] * v for _ in range(p)]
    free_at = [0] * p
    out: Order = [[] for _ in range(p)]
    total = m * n * v * (3 if split else 2)
    left = [total] * p
    bwd_cost = 1 if split else 2
    kind_b = Kind.I if split else Kind.B
    def _ready_i(r):
        for c in chunk_order[r]:
            k = bpos[r][c]
            if k >= m * n:
                continue
            mb, j = bq[r][c][k]
            s = stages[r][c]
            fe = f_end.get((mb, j, s))
            if fe is None or fe > t:
                continue
            if s < last:
                ie = i_end.get((mb, j, s + 1))
                if ie is None or ie > t:
                    continue
            return ("I", c, mb, j)
        return None

    t = 0
    guard = 0
    while any(left):
        moved = False
        for r in range(p):
            if free_at[r] > t or not left[r]:
                continue
            chosen = None
            if i_first:
                chosen = _ready_i(r)
            if chosen is None and n_i[r] < limit_i[r] and (not split or n_w[r] < limit_w[r]):
                for c in chunk_order[r]:  # (1) the next ready forward, within the limits
                    k = fpos[r][c]
                    if k >= m * n or n_c[r][c] >= cap[r][c]:
                        continue
                    mb, j = fq[r][c][k]
                    s = stages[r][c]
                    if s > 0:
                        fe = f_end.get((mb, j, s - 1))
                        if fe is None or fe > t:
                            continue
                    chosen = ("F", c, mb, j)
                    break
            if chosen is None:  # (2) a ready input gradient
                chosen = _ready_i(r)
            if chosen is None and pending_w[r]:  # (3) the oldest deferred weight gradient
                chosen = ("W",) + pending_w[r].popleft()
            if chosen is None:
                continue
            moved = True
            what, c, mb, j = chosen
            s = stages[r][c]
            if what == "F":
                out[r].append(Instr(Kind.F, mb, j, c))
                f_end[(mb, j, s)] = t + 1
                free_at[r] = t + 1
                fpos[r][c] += 1
                n_c[r][c] += 1
                n_i[r] += 1
                n_w[r] += 1
            elif what == "I":
                out[r].append(Instr(kind_b, mb, j, c))
                i_end[(mb, j, s)] = t + bwd_cost
                free_at[r] = t + bwd_cost
                bpos[r][c] += 1
                n_c[r][c] -= 1
                n_i[r] -= 1
                if split:
                    pending_w[r].append((c, mb, j))
                else:
                    n_w[r] -= 1
            else:
                out[r].append(Instr(Kind.W, mb, j, c))
                free_at[r] = t + 1
                n_w[r] -= 1
            left[r] -= 1
        # nothing started and nothing running: no unit can end, so no rank will ever move
        stuck = not moved and all(free_at[r] <= t for r in range(p))
        t += 1
        guard += 1
        if stuck or guard > 4 * total * p + 16:  # every rank waits on another: the limits cannot be met
            raise SpecError(f"{spec.schedule}: no order fits the in-flight limits for p={p} m={m} n={n} v={v} "
                            f"(every rank waits on another from unit time {t - 1})")
    del owner, chunk_of
    return out


def with_slack(spec: PlanSpec, limit_i: list[int], limit_w: list[int], i_first: bool = False) -> Order:
    """greedy_order with the limits raised by the least slack (0, 1, ...) that lets every rank
    finish (tight limits with slices can leave every rank waiting on another)."""
    most = spec.microbatches * spec.slices * spec.virtual_stages
    for extra in range(most + 1):
        try:
            return greedy_order(spec, [x + extra for x in limit_i], [x + extra for x in limit_w], i_first=i_first)
        except SpecError:
            continue
    raise SpecError(f"{spec.schedule}: no order for p={spec.pp} m={spec.microbatches} n={spec.slices} "
                    f"v={spec.virtual_stages}")


def _check_v(spec: PlanSpec) -> None:
    if spec.virtual_stages != 2:
        raise SpecError(f"--virtual-stages {spec.virtual_stages}: zb-v places 2 chunks per rank in a V (allowed: 2)")


def zb_h1(spec: PlanSpec) -> Order:
    p, n = spec.pp, spec.slices
    return with_slack(spec, [p - r + n - 1 for r in range(p)], [p + n - 1] * p)


def zb_v(spec: PlanSpec) -> Order:
    p, m, n = spec.pp, spec.microbatches, spec.slices
    lim = [min(2 * p + 2 * (n - 1), m * n + n + r) for r in range(p)]
    return with_slack(spec, lim, lim)


def interleaved_limits(p: int, m: int, n: int, v: int) -> list[int]:
    return [min(2 * (p - r - 1) + (v - 1) * p, m * v) + 1 + n - 1 for r in range(p)]


def interleaved_zb(spec: PlanSpec) -> Order:
    """With fewer micro-batches than ranks (n = 1, m < p) a ready input gradient runs before the
    next forward: the chain of I through every stage is then the critical path. This gives torch's
    step counts there, 1 to 3 units fewer than F first (tests/test_zero_bubble.py); with slices
    F first stays better."""
    p, m, n, v = spec.pp, spec.microbatches, spec.slices, spec.virtual_stages
    return with_slack(spec, interleaved_limits(p, m, n, v), [v * p + n - 1] * p, i_first=n == 1 and m < p)


def zb_bubble(p: int, m: int, n: int, v: int) -> float:
    """(p-1)/(3 v m n + p-1) with F = I = W = 1: each rank idles p-1 units."""
    return (p - 1) / (3 * v * m * n + p - 1)


def ZB_V_EXACT(p: int, m: int, n: int, v: int) -> bool:  # noqa: N802
    """Where zb-v's unit-cost bubble is exactly (p-1)/(6m + p-1) (checked on the test grid)."""
    return n == 1 and m >= p and (m == p or p <= 2 or (p <= 4 and m >= p + 2))


ZB_H1 = Family("zb-h1", "ZB-H1 zero bubble: 1F1B's in-flight limit, W fills the cool-down (Qi et al. 2024)", zb_h1,
               allows_virtual=False, split_backward=True, search_unsliced=True,
               inflight="I: p - r + n - 1; W: p + n - 1", bubble=zb_bubble,
               peak_units=lambda p, m, n, v: min(p + n - 1, m * n),
               exact=lambda p, m, n, v: m >= p and n == 1, fit=lambda p, m, n, v: (p, max(m, p), 1, 1),
               search_virtual="one")
ZB_V = Family("zb-v", "ZB-V zero bubble: V placement, 2 chunks, 1F1B's peak memory (Qi et al. 2024)", zb_v,
              check=_check_v, split_backward=True, search_unsliced=True, placements=("v",), default_virtual=2,
              inflight="I and W: min(2p + 2(n - 1), mn + n + r) chunk units", bubble=zb_bubble,
              peak_units=lambda p, m, n, v: min(2 * p + 2 * (n - 1), m * n + n, m * n * 2),
              exact=ZB_V_EXACT,
              fit=lambda p, m, n, v: (p, m if ZB_V_EXACT(p, m, 1, 2) else p, 1, 2),
              search_virtual="two")
INTERLEAVED_ZB = Family("interleaved-zb", "interleaved 1F1B with a split backward (torch's InterleavedZeroBubble)",
                        interleaved_zb, split_backward=True, search_unsliced=True,
                        inflight="I: min(2(p-r-1) + (v-1)p, m v) + 1 + n - 1; W: v p + n - 1",
                        bubble=zb_bubble,
                        peak_units=lambda p, m, n, v: min(v * p, m * v) if n == 1 else min(p, m * n * v),
                        peak_exact=lambda p, m, n, v: n == 1 and m >= p and p <= 4,
                        exact=lambda p, m, n, v: n == 1 and m >= p and v > 1 and p <= 4,
                        fit=lambda p, m, n, v: (min(p, 4), max(m, min(p, 4)), 1, max(v, 2)))
