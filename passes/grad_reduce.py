"""Data-parallel gradient reduction placed in the plan: with dp > 1, `REDUCE_GRAD c` right after
the last instruction that adds to chunk c's weight gradients on each rank (and after the sends that
carry that unit's gradient on), so each chunk's all-reduce over the replicas runs while the rest of
the cool-down computes (the idea of torch.distributed.pipelining's REDUCE_GRAD action). The
optimizer step waits for all of them. Pure function: a plan with dp == 1 comes back unchanged."""
from __future__ import annotations

from ir import KINDS, Instr, Kind, Plan

# compute kinds that add to weight gradients: the fused backward, and a split one's weight part
WEIGHT_GRAD = frozenset(k for k, row in KINDS.items() if row.role == "compute"
                        and row.cost in ("backward", "backward_weight"))
SENDS = frozenset(k for k, row in KINDS.items() if row.role == "send")


def last_weight_grad(stream) -> dict[int, int]:
    """chunk -> index of its last weight-gradient unit in `stream`."""
    last: dict[int, int] = {}
    for i, ins in enumerate(stream):
        if ins.kind in WEIGHT_GRAD:
            last[ins.chunk] = i
    return last


def place_grad_reduce(plan: Plan) -> Plan:
    """The plan with REDUCE_GRAD c after each chunk's last weight-gradient unit (and its sends)."""
    if plan.spec.dp == 1:
        return plan
    out = []
    for stream in plan.ranks:
        stream = [ins for ins in stream if ins.kind != Kind.REDUCE_GRAD]  # idempotent
        at: dict[int, list[int]] = {}
        for c, i in last_weight_grad(stream).items():
            j = i + 1
            while j < len(stream) and stream[j].kind in SENDS:
                j += 1
            at.setdefault(j, []).append(c)
        new = []
        for i, ins in enumerate(stream):
            for c in sorted(at.get(i, ())):
                new.append(Instr(Kind.REDUCE_GRAD, -1, -1, c))
            new.append(ins)
        for c in sorted(at.get(len(stream), ())):
            new.append(Instr(Kind.REDUCE_GRAD, -1, -1, c))
        out.append(tuple(new))
    return plan.with_ranks(out)
