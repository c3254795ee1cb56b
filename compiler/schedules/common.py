"""Shared pieces of the schedule generators."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable

from ir import B, F, Instr, Kind, PlanSpec, SpecError

Order = list[list[Instr]]  # per rank: compute units only, in program order
Sizes = Callable[[int, int, int, int], object]  # f(p, m, n, v)


def _always(p: int, m: int, n: int, v: int) -> bool:
    return True


class _SizesShape:
    """The attributes Family.validate reads, from bare sizes (no PlanSpec)."""

    def __init__(self, p: int, m: int, n: int, v: int):
        self.pp, self.microbatches, self.slices, self.virtual_stages = p, m, n, v


@dataclass(frozen=True)
class Family:
    """Everything known about a schedule family, in one record: its generator, what it accepts,
    its closed forms, its choices in `slimpipe tune` / `compare`, its default KV exchange.
    closed_forms, search, compare, tune and the tests read this record instead of naming families.

    inflight      the in-flight limit of rank r, in words (what the generator enforces)
    bubble        closed-form unit-cost bubble fraction f(p, m, n, v) (F = 1, B = 2, free comm)
    peak_units    closed-form forward units in flight at rank 0's peak f(p, m, n, v)
    exact         where both closed forms are exact (tests hold the generator to them there)
    peak_exact    where peak_units is exact; elsewhere (inside `exact`'s domain for the bubble)
                  it is a lower bound (tune only needs a bound)
    fit           the nearest sizes to (p, m, n, v) that it accepts and where its closed forms are
                  exact, for property tests
    search_slices   tune tries the space's n (else n = 1)
    search_unsliced tune tries n = 1 as well, whatever the space's n: the family unsliced is a
                  schedule of its own (ZB-H1, ZB-V), where seq1f1b or slimpipe at n = 1 is 1F1B
    search_virtual  v choices in tune: "one" (v = 1), "above_one" (the space's v > 1), "any", "two" (v = 2)
    partitions    slice partitions searched when n > 1 ("uniform", and "flops" for Seq1F1B)
    default_exchange  the KV exchange is on by default when n > 1 (compile); tune and compare try both
    (compare runs tune's search at one layout: one search space, read from these choices)
    split_backward  its orders use I and W (zero-bubble families) instead of the fused B
    split_option  it takes --split-backward (spec.split_backward): its fused B become I and W
                  (the zero-bubble families take the flag too: they split anyway)
    split_bubble  closed-form unit-cost bubble with --split-backward (F = I = W = 1) f(p, m, n, v)
    split_exact   where split_bubble is exact (peak_units does not change with the split)
    placements    the placements it accepts (the first is its default): plain (v = 1), looping
                  (chunk c of rank r is stage c*p + r), v (chunk 0 stage r, chunk 1 stage 2p-1-r)
    default_virtual  --virtual-stages when not given
    """

    name: str
    summary: str
    generate: Callable[[PlanSpec], Order]
    allows_slices: bool = True
    allows_virtual: bool = True
    check: Callable[[PlanSpec], None] | None = None
    inflight: str = ""
    bubble: Callable[[int, int, int, int], float] | None = None
    peak_units: Callable[[int, int, int, int], int] | None = None
    exact: Callable[[int, int, int, int], bool] = _always
    peak_exact: Callable[[int, int, int, int], bool] = _always
    fit: Callable[[int, int, int, int], tuple[int, int, int, int]] | None = None
    search_slices: bool = True
    search_unsliced: bool = False
    search_virtual: str = "any"
    partitions: tuple[str, ...] = ("uniform",)
    default_exchange: bool = False
    split_backward: bool = False
    split_option: bool = False
    split_bubble: Callable[[int, int, int, int], float] | None = None
    split_exact: Callable[[int, int, int, int], bool] = _always
    placements: tuple[str, ...] = ("looping",)
    default_virtual: int = 1

    def accepts(self, p: int, m: int, n: int, v: int) -> bool:
        """Whether validate() takes these sizes."""
        try:
            self.validate(_SizesShape(p, m, n, v))
        except SpecError:
            return False
        return True

    def fitted(self, p: int, m: int, n: int, v: int) -> tuple[int, int, int, int]:
        """(p, m, n, v) moved to sizes the family accepts (n = 1 / v = 1 where it has none, then its
        own rule)."""
        n = n if self.allows_slices else 1
        v = v if self.allows_virtual else 1
        return self.fit(p, m, n, v) if self.fit is not None else (p, m, n, v)

    def search_choices(self, slices: Iterable[int], virtual_stages: Iterable[int]) -> list[tuple[int, int, str, bool]]:
        """(n, v, partition, exchange) that `slimpipe tune` tries for this family."""
        ns = list(slices) if self.allows_slices and self.search_slices else [1]
        if self.search_unsliced and 1 not in ns:
            ns = [1, *ns]
        vs = {"one": [1], "above_one": [v for v in virtual_stages if v > 1], "any": list(virtual_stages),
              "two": [2]}[self.search_virtual]
        out = []
        for n in ns:
            for v in vs:
                for part in (self.partitions if n > 1 else ("uniform",)):
                    out.append((n, v, part, False))
                if self.default_exchange and n > 1:
                    out.append((n, v, "uniform", True))
        return out

    def exchange_default(self, slices: int) -> bool:
        return self.default_exchange and slices > 1

    def validate(self, spec: PlanSpec) -> None:
        if not self.allows_slices and spec.slices != 1:
            raise SpecError(f"--slices {spec.slices}: {self.name} does not slice the sequence (allowed: 1); "
                            f"use seq1f1b or slimpipe for sequence slicing")
        if not self.allows_virtual and spec.virtual_stages != 1:
            raise SpecError(f"--virtual-stages {spec.virtual_stages}: {self.name} has one stage per rank (allowed: 1); "
                            f"use interleaved-1f1b, looped-bfs, seq1f1b or slimpipe for virtual stages")
        if getattr(spec, "split_backward", False) and not (self.split_option or self.split_backward):
            raise SpecError(f"--split-backward: {self.name} runs a fused backward; the families that split it are "
                            f"{', '.join(split_families())}")
        if self.check is not None:
            self.check(spec)


def split_families() -> list[str]:
    """Names of the families that take --split-backward (from their records)."""
    from . import FAMILIES

    return [f.name for f in FAMILIES.values() if f.split_option or f.split_backward]


def flat_bubble(p: int, m: int, n: int, v: int) -> float:
    """(p-1)/(m*n + p-1): one chunk's work per rank (GPipe, 1F1B)."""
    return (p - 1) / (m * n + p - 1)


def chunked_bubble(p: int, m: int, n: int, v: int) -> float:
    """(p-1)/(v*m*n + p-1): v chunks' work per rank, the fill paid once."""
    return (p - 1) / (v * m * n + p - 1)


def all_units(p: int, m: int, n: int, v: int) -> int:
    return m * n * v


def bounded_inflight(fwd: list[Instr], bwd: list[Instr], limit: int) -> list[Instr]:
    """Run forwards while fewer than `limit` units are in flight, else the next backward;
    then drain. limit=p-r gives 1F1B, a limit >= len(fwd) gives all-forward-then-backward.
    A backward whose forward has not run yet waits: forwards run until it has (this only
    matters where a warm-up formula undershoots, e.g. interleaved Seq1F1B with n > p)."""
    out: list[Instr] = []
    done: set[tuple[int, int, int]] = set()
    fi = bi = inflight = 0
    nf, nb = len(fwd), len(bwd)
    while fi < nf or bi < nb:
        if fi < nf and (inflight < limit or bi >= nb or (bwd[bi].mb, bwd[bi].slice, bwd[bi].chunk) not in done):
            f = fwd[fi]
            out.append(f)
            done.add((f.mb, f.slice, f.chunk))
            fi += 1
            inflight += 1
        else:
            out.append(bwd[bi])
            bi += 1
            inflight -= 1
    return out


def lexicographic(spec: PlanSpec, chunk: int = 0) -> tuple[list[Instr], list[Instr]]:
    """Forward (mb, slice) ascending; backward FIFO over micro-batches, slices descending."""
    m, n = spec.microbatches, spec.slices
    fwd = [F(mb, j, chunk) for mb in range(m) for j in range(n)]
    bwd = [B(mb, j, chunk) for mb in range(m) for j in reversed(range(n))]
    return fwd, bwd


def rounds(m: int, k: int) -> list[int]:
    """Micro-batches per round of an interleaved order: m split into max(1, m div k) rounds whose
    sizes differ by at most one, the larger first (m = 10, k = 4: [5, 5]; m = 11: [6, 5]; m = 3:
    [3]). Every round holds at least k micro-batches when m >= k, so a rank's next chunk never
    waits for the previous chunk to come round the ring; where k divides m every round is k."""
    r = max(1, m // k)
    size, extra = divmod(m, r)
    return [size + 1] * extra + [size] * (r - extra)


def megatron_interleaved(spec: PlanSpec, units: list[tuple[int, int]], bwd_units: list[tuple[int, int]],
                         groups: list[int]) -> tuple[list[Instr], list[Instr]]:
    """Megatron's virtual-pipeline order over a sequence of (mb, slice) 'units', in rounds of
    `groups[i]` units: within a round of G units, forward step u runs chunk u div G on unit
    u mod G of the round; backward walks the same rounds with the chunks reversed. With every
    round of p units this is forward step u -> chunk (u mod pv) div p on unit (u div pv)*p + u mod p."""
    v = spec.virtual_stages
    fwd, bwd = [], []
    start = 0
    for g in groups:
        for chunk in range(v):
            for k in range(start, start + g):
                mb, j = units[k]
                fwd.append(F(mb, j, chunk))
                mb, j = bwd_units[k]
                bwd.append(B(mb, j, v - 1 - chunk))
        start += g
    return fwd, bwd


def fill_weight_gradients(spec: PlanSpec, order: Order, limit_w: list[int]) -> Order:
    """A fused order (F and B) with each B split into I and W, the W placed by a greedy rule in a
    unit-cost replay (F = I = W = 1, communication free; the F and I of every rank keep their order):

    an idle rank runs its next F or I if it is ready (its input activation, or its output gradient,
    has arrived), except an F while `limit_w[r]` of its units are between F and W (then the oldest
    deferred W goes first, so what W keeps stays bounded); otherwise (next unit not ready) it runs
    its oldest deferred W, if any, else it waits; after its last I it runs the W still deferred
    (the cool-down). With unit costs every start is an integer and a unit not ready at t is ready
    at t + 1 at the earliest, so a W put in a wait never delays the F and I of any rank."""
    p = spec.pp
    stages = spec.placement
    last = spec.num_stages - 1
    seq = [[Instr(Kind.I, *u[1:]) if u.kind == Kind.B else u for u in s] for s in order]
    pos = [0] * p
    f_end: dict[tuple[int, int, int], int] = {}
    i_end: dict[tuple[int, int, int], int] = {}
    pending: list[deque] = [deque() for _ in range(p)]
    in_w = [0] * p  # units between F and W
    free_at = [0] * p
    out: Order = [[] for _ in range(p)]
    t = 0
    idle_rounds = 0
    while any(pos[r] < len(seq[r]) or pending[r] for r in range(p)):
        moved = False
        for r in range(p):
            if free_at[r] > t:
                continue
            u = seq[r][pos[r]] if pos[r] < len(seq[r]) else None
            ready = False
            if u is not None:
                s = stages[r][u.chunk]
                if u.kind == Kind.F:
                    ready = s == 0 or f_end.get((u.mb, u.slice, s - 1), t + 1) <= t
                else:
                    ready = s == last or i_end.get((u.mb, u.slice, s + 1), t + 1) <= t
            if ready and not (u.kind == Kind.F and in_w[r] >= limit_w[r] and pending[r]):
                out[r].append(u)
                pos[r] += 1
                s = stages[r][u.chunk]
                if u.kind == Kind.F:
                    f_end[(u.mb, u.slice, s)] = t + 1
                    in_w[r] += 1
                else:
                    i_end[(u.mb, u.slice, s)] = t + 1
                    pending[r].append(Instr(Kind.W, u.mb, u.slice, u.chunk))
            elif pending[r]:
                out[r].append(pending[r].popleft())
                in_w[r] -= 1
            else:
                continue
            free_at[r] = t + 1
            moved = True
        t += 1
        idle_rounds = 0 if moved else idle_rounds + 1
        if idle_rounds > 1:  # nothing ran and nothing is running: the fused order was not valid
            raise SpecError(f"{spec.schedule}: its order deadlocks in the unit-cost replay (p={p})")
    return out
