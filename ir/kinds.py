"""The table of instruction kinds: what each kind is, in one place.

Every pass (replay, validate, memory, costs, simulate, trace, lower, grid, exchange) reads this
table instead of testing kinds by hand, so adding a kind is one row here plus its handler.
A kind that is not in the table is unknown: `parse` refuses it, `validate` reports it (rule
"kind") and `replay` raises.

Columns (KindInfo):
    role       compute | send | receive | kv | collective | optimizer
    fields     the text tokens it carries, in canonical order (mb, s, c, to/from, lo, hi, t)
    cost       unit-cost class of a compute kind: forward | backward (fused: input and weight
               gradients) | backward_input | backward_weight; None for the others
    unit_cost  its duration in unit-cost simulation (F = 1, B = 2; communication free)
    memory     its effect on the rank's memory: save (the unit's activations are kept) | free
               (all of the unit's saved state is released) | free_input (split backward, I: what
               only the input gradient needs is released, what the weight gradient needs -- its
               matmuls' inputs and output gradients -- is kept) | free_rest (W: that is released) | None
    attention  a compute kind that runs the unit's attention (a KV exchange can serve it)
    executor   the executor has a handler for it (a plan with other kinds is refused there)
    phase      compute: forward | backward (B, I) | weight (W); p2p: the stream it carries (activation forward,
               gradient backward); kv: the compute phase it serves
    side       kv: owner | partner (serves beside its own next unit) | helper (a rank with no unit
               in that step: serves as work of its own)
    match      send <-> receive and kv owner <-> partner counterpart (a helper's: its owner kind)
    receives   compute: the receive kind that brings its input from another rank
    sends      compute: the send kind that carries its output to another rank
"""
from __future__ import annotations

from dataclasses import dataclass

ROLES = ("compute", "send", "receive", "kv", "collective", "optimizer")
COST_CLASSES = ("forward", "backward", "backward_input", "backward_weight")
MEMORY_EFFECTS = ("save", "free", "free_input", "free_rest")


class Kind:
    """Instruction kinds (plain strings: cheap to compare in hot loops, readable in JSON)."""

    F = "F"
    B = "B"
    I = "I"  # noqa: E741  (split backward: the input gradient)
    W = "W"  # split backward: the weight gradient
    SEND_ACT = "SEND_ACT"
    RECV_ACT = "RECV_ACT"
    SEND_GRAD = "SEND_GRAD"
    RECV_GRAD = "RECV_GRAD"
    KVF_SEND = "KVF_SEND"
    KVF_RECV = "KVF_RECV"
    KVB_SEND = "KVB_SEND"
    KVB_RECV = "KVB_RECV"
    KVF_HELP = "KVF_HELP"
    KVB_HELP = "KVB_HELP"
    OPT = "OPT"
    REDUCE_GRAD = "REDUCE_GRAD"


@dataclass(frozen=True)
class KindInfo:
    name: str
    role: str
    fields: tuple[str, ...]
    summary: str
    cost: str | None = None
    unit_cost: float = 0.0
    memory: str | None = None
    phase: str | None = None
    side: str | None = None
    match: str | None = None
    receives: str | None = None
    sends: str | None = None
    attention: bool = False
    executor: bool = True

    @property
    def is_compute(self) -> bool:
        return self.role == "compute"


_UNIT = ("mb", "s", "c")
_ROWS = (
    KindInfo(Kind.F, "compute", _UNIT, "forward unit", cost="forward", unit_cost=1.0, memory="save",
             phase="forward", receives=Kind.RECV_ACT, sends=Kind.SEND_ACT, attention=True),
    KindInfo(Kind.B, "compute", _UNIT, "backward unit (input and weight gradients)", cost="backward", unit_cost=2.0,
             memory="free", phase="backward", receives=Kind.RECV_GRAD, sends=Kind.SEND_GRAD, attention=True),
    KindInfo(Kind.I, "compute", _UNIT, "backward for the unit's input only (attention backward included): the "
             "gradient sent upstream; keeps what W needs", cost="backward_input", unit_cost=1.0, memory="free_input",
             phase="backward", receives=Kind.RECV_GRAD, sends=Kind.SEND_GRAD, attention=True),
    KindInfo(Kind.W, "compute", _UNIT, "the unit's weight gradient (after its I)", cost="backward_weight",
             unit_cost=1.0, memory="free_rest", phase="weight"),
    KindInfo(Kind.SEND_ACT, "send", _UNIT + ("to", "t"), "send a unit's output activation to the next stage's rank",
             phase="forward", match=Kind.RECV_ACT),
    KindInfo(Kind.RECV_ACT, "receive", _UNIT + ("from", "t"), "receive a unit's input activation",
             phase="forward", match=Kind.SEND_ACT),
    KindInfo(Kind.SEND_GRAD, "send", _UNIT + ("to", "t"), "send a unit's input gradient to the previous stage's rank",
             phase="backward", match=Kind.RECV_GRAD),
    KindInfo(Kind.RECV_GRAD, "receive", _UNIT + ("from", "t"), "receive a unit's output gradient",
             phase="backward", match=Kind.SEND_GRAD),
    KindInfo(Kind.KVF_SEND, "kv", _UNIT + ("to", "lo", "hi", "t"), "forward KV exchange, owner side",
             phase="forward", side="owner", match=Kind.KVF_RECV),
    KindInfo(Kind.KVF_RECV, "kv", _UNIT + ("from", "lo", "hi", "t"), "forward KV exchange, partner side",
             phase="forward", side="partner", match=Kind.KVF_SEND),
    KindInfo(Kind.KVF_HELP, "kv", _UNIT + ("from", "lo", "hi", "t"), "forward KV exchange, helper side",
             phase="forward", side="helper", match=Kind.KVF_SEND),
    KindInfo(Kind.KVB_SEND, "kv", _UNIT + ("to", "lo", "hi", "t"), "backward KV exchange, owner side",
             phase="backward", side="owner", match=Kind.KVB_RECV),
    KindInfo(Kind.KVB_RECV, "kv", _UNIT + ("from", "lo", "hi", "t"), "backward KV exchange, partner side",
             phase="backward", side="partner", match=Kind.KVB_SEND),
    KindInfo(Kind.KVB_HELP, "kv", _UNIT + ("from", "lo", "hi", "t"), "backward KV exchange, helper side",
             phase="backward", side="helper", match=Kind.KVB_SEND),
    KindInfo(Kind.OPT, "optimizer", (), "optimizer step"),
    KindInfo(Kind.REDUCE_GRAD, "collective", ("c",), "start averaging chunk c's weight gradients over the "
             "data-parallel replicas (after the chunk's last backward; the optimizer step waits for it)",
             phase="backward"),
)

KINDS: dict[str, KindInfo] = {k.name: k for k in _ROWS}


def info(kind: str) -> KindInfo | None:
    """The table row of `kind`, None if unknown."""
    return KINDS.get(kind)


def kinds_where(**want) -> frozenset[str]:
    """Kinds whose row has every given column value, e.g. kinds_where(role="send")."""
    return frozenset(k for k, row in KINDS.items() if all(getattr(row, c) == v for c, v in want.items()))


# derived views (frozensets / dicts: what the hot loops test against)
ROLE: dict[str, str] = {k: row.role for k, row in KINDS.items()}
UNIT_COST: dict[str, float] = {k: row.unit_cost for k, row in KINDS.items()}
FIELDS: dict[str, tuple[str, ...]] = {k: row.fields for k, row in KINDS.items()}
COMPUTE = kinds_where(role="compute")
FORWARD = kinds_where(role="compute", phase="forward")
BACKWARD = kinds_where(role="compute", phase="backward")  # B and I: what produces the input gradient
WEIGHT = kinds_where(role="compute", phase="weight")
SPLIT_BACKWARD = frozenset({Kind.I, Kind.W})
SENDS = kinds_where(role="send")
RECVS = kinds_where(role="receive")
P2P = SENDS | RECVS
KV_OWNER = kinds_where(role="kv", side="owner")
KV_PARTNER = kinds_where(role="kv", side="partner")
KV_HELPER = kinds_where(role="kv", side="helper")
KV_SERVER = KV_PARTNER | KV_HELPER  # the side that computes the shipped block
KV_FWD = kinds_where(role="kv", phase="forward")
KV = KV_OWNER | KV_SERVER
ALL_KINDS = frozenset(KINDS)
# send kind -> the receive kind it matches, and back (kv owner <-> partner likewise)
MATCH: dict[str, str] = {k: row.match for k, row in KINDS.items() if row.match}


_KV_KINDS = {(row.phase, row.side): k for k, row in reversed(KINDS.items()) if row.role == "kv"}  # the first row wins


def kv_kind(phase: str, side: str) -> str:
    """The KV-exchange kind serving a compute unit of `phase` (forward/backward), on `side`
    (owner/partner/helper)."""
    return _KV_KINDS[(phase, side)]


def allowed_kinds() -> str:
    return ", ".join(KINDS)
