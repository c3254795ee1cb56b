"""Shared pieces of the schedule generators."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ir import B, F, Instr, PlanSpec, SpecError

Order = list[list[Instr]]  # per rank: compute units only, in program order


@dataclass(frozen=True)
class Family:
    """A schedule family: its name, what it accepts, and its per-rank generator."""

    name: str
    summary: str
    generate: Callable[[PlanSpec], Order]
    allows_slices: bool = True
    allows_virtual: bool = True
    check: Callable[[PlanSpec], None] | None = None

    def validate(self, spec: PlanSpec) -> None:
        if not self.allows_slices and spec.slices != 1:
            raise SpecError(f"--slices {spec.slices}: {self.name} does not slice the sequence (allowed: 1); "
                            f"use seq1f1b or slimpipe for sequence slicing")
        if not self.allows_virtual and spec.virtual_stages != 1:
            raise SpecError(f"--virtual-stages {spec.virtual_stages}: {self.name} has one stage per rank (allowed: 1); "
                            f"use interleaved-1f1b, looped-bfs, seq1f1b or slimpipe for virtual stages")
        if self.check is not None:
            self.check(spec)


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


def megatron_interleaved(spec: PlanSpec, units: list[tuple[int, int]], bwd_units: list[tuple[int, int]],
                         group: int | None = None) -> tuple[list[Instr], list[Instr]]:
    """Megatron's virtual-pipeline order over a sequence of (mb, slice) 'units', in groups of
    G units (default G = p): forward step u runs chunk (u mod G*v) div G on unit
    (u div G*v)*G + (u mod G); backward uses the reversed chunk."""
    v = spec.virtual_stages
    g = group or spec.pp
    span = g * v
    fwd, bwd = [], []
    for u in range(len(units) * v):
        chunk = (u % span) // g
        idx = (u // span) * g + (u % g)
        mb, j = units[idx]
        fwd.append(F(mb, j, chunk))
        mb, j = bwd_units[idx]
        bwd.append(B(mb, j, v - 1 - chunk))
    return fwd, bwd
