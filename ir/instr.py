"""Instructions: a compact immutable record and a text form that round-trips.

Text grammar (tokens after the kind may come in any order; the canonical order is shown):

    F mb3 s2 c1                 forward unit (micro-batch 3, slice 2, local chunk 1)
    B mb3 s2 c1                 backward unit
    SEND_ACT mb3 s2 c1 to2 t17  send the output activation of unit (mb3, s2, c1) to rank 2
    RECV_ACT mb3 s2 c1 from0 t17  receive the input activation of unit (mb3, s2, c1)
    SEND_GRAD / RECV_GRAD       the same for input gradients (sent to the previous stage)
    KVF_SEND mb3 s5 c0 to2 lo0 hi96 t9  forward KV exchange, owner side: the next compute unit
                                on this rank is (mb3, s5, c0); it ships the K/V of tokens [lo, hi)
                                of its micro-batch (inside the earlier slices' prefix) and its
                                queries to rank 2, which computes that attention block. Several
                                may precede one unit (several partners); their ranges are disjoint
    KVF_RECV mb3 s5 c0 from0 lo0 hi96 t9  partner side: mb/s/c name the *owner's* unit; the
                                partner serves it alongside its own next compute unit
    KVF_HELP mb3 s5 c0 from0 lo0 hi96 t9  helper side: a rank with no unit in that step serves
                                the block as work of its own (no compute unit of its own follows)
    KVB_SEND / KVB_RECV / KVB_HELP  the same for the backward unit
    OPT                         optimizer step

Which fields each kind carries, and what it means, is ir.kinds' table (KINDS).

`chunk` is the local model-chunk index on the rank running the instruction (for KV*_RECV and
KV*_HELP: on the owner rank); the spec's placement maps (rank, chunk) to a global stage.
"""
from __future__ import annotations

import re
from operator import itemgetter
from typing import NamedTuple

from .errors import PlanFormatError


from .kinds import ALL_KINDS, COMPUTE, FIELDS as _FIELDS, KV, KV_OWNER, KV_PARTNER, MATCH, P2P, RECVS, SENDS, Kind, allowed_kinds

_TOKEN_FIELD = {"mb": "mb", "s": "slice", "c": "chunk", "to": "peer", "from": "peer", "lo": "lo", "hi": "hi", "t": "tag"}


class Instr(NamedTuple):
    """One instruction of one rank's stream. Unused fields are -1 (lo, hi: 0).
    lo, hi: a KV exchange's token range [lo, hi) of the micro-batch's sequence."""

    kind: str
    mb: int = -1
    slice: int = -1
    chunk: int = -1
    peer: int = -1
    tag: int = -1
    lo: int = 0
    hi: int = 0

    def __str__(self) -> str:
        return to_text(self)


_SLOT = {name: Instr._fields.index(field) for name, field in _TOKEN_FIELD.items()}  # token -> tuple index
_make = Instr._make


def F(mb: int, s: int, c: int) -> Instr:
    return Instr(Kind.F, mb, s, c)


def B(mb: int, s: int, c: int) -> Instr:
    return Instr(Kind.B, mb, s, c)


def _slots_of(slots):
    if len(slots) > 1:
        return itemgetter(*slots)
    return lambda ins: tuple(ins[i] for i in slots)  # itemgetter of one slot returns the item, not a tuple


# kind -> (%-pattern, the Instr slots it prints), e.g. ('F mb%s s%s c%s', slots 1, 2, 3): millions of
# instructions are written per plan, and %-formatting a tuple is the cheapest way to do it
_FORMAT = {k: (" ".join([k.replace("%", "%%")] + [f"{name}%s" for name in fields]), _slots_of([_SLOT[f] for f in fields]))
           for k, fields in _FIELDS.items()}


def split_units(stream) -> frozenset:
    """(mb, slice, chunk) of the units of one rank's stream whose backward is split (they have an
    I; their W follows): what the executor's stages, the cost model and the memory model treat
    apart. A C-level scan first: most streams have no I."""
    if Kind.I not in map(itemgetter(0), stream):
        return frozenset()
    return frozenset((ins.mb, ins.slice, ins.chunk) for ins in stream if ins.kind == Kind.I)


def to_text(ins: Instr) -> str:
    """Canonical text form, e.g. 'SEND_ACT mb3 s2 c1 to2 t17'; the kind table says which fields."""
    fmt = _FORMAT.get(ins[0])
    if fmt is None:
        raise PlanFormatError(f"unknown instruction kind {_clip(ins[0])}; allowed: {allowed_kinds()}")
    return fmt[0] % fmt[1](ins)


_MAX_DIGITS = 18  # far above any real index; keeps int() fast and inside Python's digit limit


def _clip(x, limit: int = 80) -> str:
    """repr(x), cut short: a hostile plan must not turn an error line into a megabyte."""
    r = repr(x)
    return r if len(r) <= limit else r[:limit] + "...(" + str(len(r)) + " chars)"


def _is_num(d: str) -> bool:
    """ASCII digits only: str.isdigit() also accepts '²' and friends, which int() rejects."""
    return d.isascii() and d.isdigit()


def _int_token(tok: str, prefix: str, text: str) -> int:
    digits = tok[len(prefix):]
    if len(digits) > _MAX_DIGITS:
        raise PlanFormatError(f"instruction {_clip(text)}: token {_clip(tok)} has a number of more than {_MAX_DIGITS} digits")
    return int(digits)


_NUM = "([0-9]{1,%d})" % _MAX_DIGITS
# the canonical forms as one regex each (ASCII digits only): the fast path of `parse`
def _alt(kinds) -> str:
    return "|".join(sorted(kinds))


_CANONICAL = {
    "compute": re.compile(rf"({_alt(k for k in COMPUTE if _FIELDS[k] == ('mb', 's', 'c'))}) mb{_NUM} s{_NUM} c{_NUM}"),
    "send": re.compile(rf"({_alt(SENDS)}) mb{_NUM} s{_NUM} c{_NUM} to{_NUM} t{_NUM}"),
    "recv": re.compile(rf"({_alt(RECVS)}) mb{_NUM} s{_NUM} c{_NUM} from{_NUM} t{_NUM}"),
}
_COMPUTE_RE, _SEND_RE, _RECV_RE = _CANONICAL.values()
# the three as one pattern (groups 0-3 a compute unit, 4-9 a send, 10-15 a receive): one match per instruction
_CANONICAL_RE = re.compile("|".join(r.pattern for r in _CANONICAL.values()))


def parse(text: str, _match=_CANONICAL_RE.fullmatch, _int=int, _new=tuple.__new__) -> Instr:
    """Parse the text form (any token order); raises PlanFormatError naming the bad token."""
    mt = _match(text) if type(text) is str else None
    if mt is not None:
        g = mt.groups()
        if g[0] is not None:  # tuple.__new__: Instr(...) and Instr._make are Python-level calls
            return _new(Instr, (g[0], _int(g[1]), _int(g[2]), _int(g[3]), -1, -1, 0, 0))
        i = 4 if g[4] is not None else 10
        return _new(Instr, (g[i], _int(g[i + 1]), _int(g[i + 2]), _int(g[i + 3]), _int(g[i + 4]), _int(g[i + 5]), 0, 0))
    if not isinstance(text, str):
        raise PlanFormatError(f"instruction {_clip(text)} is not a string like 'F mb0 s0 c0'")
    parts = text.split()
    if not parts:
        raise PlanFormatError("empty instruction; expected e.g. 'F mb0 s0 c0'")
    kind = parts[0]
    fields = _FIELDS.get(kind)
    if fields is None:
        raise PlanFormatError(f"instruction {_clip(text)}: unknown kind {_clip(kind)}; allowed: {allowed_kinds()}")
    # fast path: canonical order, fields straight into their tuple slots
    if len(parts) == len(fields) + 1:
        vals = [kind, -1, -1, -1, -1, -1, 0, 0]
        for tok, name in zip(parts[1:], fields):
            d = tok[len(name):]
            if tok.startswith(name) and d.isascii() and d.isdigit() and len(d) <= _MAX_DIGITS:
                vals[_SLOT[name]] = int(d)
            else:
                break
        else:
            return _make(vals)
    vals = {}
    for tok in parts[1:]:
        # longest prefix first so 'to3' is not read as t + 'o3'
        for name in ("from", "mb", "to", "lo", "hi", "s", "c", "t"):
            if tok.startswith(name) and _is_num(tok[len(name):]):
                break
        else:
            raise PlanFormatError(f"instruction {_clip(text)}: bad token {_clip(tok)}; {kind} takes {' '.join(f + 'N' for f in fields)}")
        if name not in fields:
            raise PlanFormatError(f"instruction {_clip(text)}: {kind} takes no {name!r}; it takes {' '.join(f + 'N' for f in fields)}")
        field = _TOKEN_FIELD[name]
        if field in vals:
            raise PlanFormatError(f"instruction {_clip(text)}: {name!r} given twice")
        vals[field] = _int_token(tok, name, text)
    missing = [f for f in fields if _TOKEN_FIELD[f] not in vals]
    if missing:
        raise PlanFormatError(f"instruction {_clip(text)}: missing {', '.join(missing)}; {kind} takes {' '.join(f + 'N' for f in fields)}")
    return Instr(kind, **vals)


# ---------------------------------------------------------------- a whole stream at once
# A plan file holds millions of instructions, nearly all in canonical form: one regex over a
# rank's joined text proves every line canonical (the kind's fields in table order, ASCII digits),
# then each line is cut at its spaces with no per-line regex. Anything else (another token order,
# extra spaces, a non-string, an unknown kind) takes `parse`, line by line, with its messages.
def _line_pattern() -> str:
    alts = [re.escape(k) + "".join(f" {name}[0-9]{{1,{_MAX_DIGITS}}}" for name in fields) for k, fields in _FIELDS.items()]
    return "(?:" + "|".join(sorted(alts, key=len, reverse=True)) + ")"


_LINE = _line_pattern()
_STREAM_RE = re.compile(f"{_LINE}(?:\n{_LINE})*")
# the Instr slots of a line's fields by its token count: the loop below cuts a line by its count,
# so each count must mean one layout; the kind table has it so (checked here, else no fast path)
_CUT_LAYOUTS = {4: (1, 2, 3), 6: (1, 2, 3, 4, 5), 8: (1, 2, 3, 4, 6, 7, 5)}
_FAST = all(tuple(_SLOT[f] for f in fields) == _CUT_LAYOUTS[len(fields) + 1]
            for fields in _FIELDS.values() if len(fields) + 1 in _CUT_LAYOUTS)
_SMALL: dict[str, int] = {}  # 'mb3' -> 3, ... for the small numbers of mb/s/c/to/from (built on first use)


def parse_stream(stream) -> tuple[Instr, ...]:
    """tuple(map(parse, stream)), faster for a list of canonical texts (a plan file's ranks):
    the same instructions, and the same PlanFormatError for a bad one."""
    try:
        text = "\n".join(stream)
    except TypeError:  # a non-string: parse names it
        return tuple(map(parse, stream))
    if not _FAST or text.count("\n") != len(stream) - 1 or _STREAM_RE.fullmatch(text) is None:
        return tuple(map(parse, stream))
    if not _SMALL:
        _SMALL.update((f"{name}{i}", i) for name in ("mb", "s", "c", "to", "from") for i in range(2048))
    try:
        return _cut(stream, _SMALL)
    except KeyError:  # a number beyond _SMALL (or with leading zeros): parse takes it
        return tuple(map(parse, stream))


def _cut(stream, small, _new=tuple.__new__, _int=int, _parse=parse) -> tuple[Instr, ...]:
    """Canonical lines (proven by _STREAM_RE) to Instr, by token count."""
    out = []
    add = out.append
    for s in stream:
        p = s.split(" ")
        n = len(p)
        if n == 6:  # a send or receive: mb s c to/from t
            add(_new(Instr, (p[0], small[p[1]], small[p[2]], small[p[3]], small[p[4]], _int(p[5][1:]), 0, 0)))
        elif n == 4:  # a compute unit: mb s c
            add(_new(Instr, (p[0], small[p[1]], small[p[2]], small[p[3]], -1, -1, 0, 0)))
        elif n == 8:  # a KV exchange: mb s c to/from lo hi t
            add(_new(Instr, (p[0], small[p[1]], small[p[2]], small[p[3]], small[p[4]], _int(p[7][1:]),
                             _int(p[5][2:]), _int(p[6][2:]))))
        else:
            add(_parse(s))
    return tuple(out)


# ---------------------------------------------------------------- the compact form of a stream
# A large plan's rank is written as {"codes": {char: kind}, "kinds": one char per instruction,
# "fields": "<I or Q>:<base64>"}: the numbers each instruction's kind carries (the kind table's
# fields, in Instr order: mb, slice, chunk, peer, tag, lo, hi), one array of little-endian unsigned
# 32-bit (I) or 64-bit (Q) integers for the rank. It says exactly what the text form says (known
# kinds, the fields the kind carries, numbers of at most 18 digits) and loads without a parse per
# instruction.
_KIND0 = itemgetter(0)
_call = getattr(__import__("operator"), "call", None) or (lambda fn, arg: fn(arg))  # operator.call: Python >= 3.11
_COMPACT_SLOTS = {k: sorted({_SLOT[f] for f in fields}) for k, fields in _FIELDS.items()}
_COMPACT_CODES = dict(zip(_FIELDS, "FBIWsrSRkKhpPHOGabcdefgijlmnoqtuvwxyz"))  # the writer's codes, in kind-table order
_MAX_VALUE = 10 ** _MAX_DIGITS - 1
_WIDTHS = {"I": 4, "Q": 8}


def _compact_getter(slots):
    if not slots:
        return lambda ins: ()
    if len(slots) == 1:
        return lambda ins, i=slots[0]: (ins[i],)
    return itemgetter(*slots)


_COMPACT_GET = {k: _compact_getter(s) for k, s in _COMPACT_SLOTS.items()}


def to_compact(stream) -> dict | None:
    """A stream's compact form (see above), or None where it has none (an unknown kind, a field
    the text form could not write: negative, over 18 digits, not an int)."""
    import array
    import base64
    import sys
    from itertools import chain

    try:
        kinds = list(map(_KIND0, stream))
        chars = "".join(map(_COMPACT_CODES.__getitem__, kinds))
        values = list(chain.from_iterable(map(_call, map(_COMPACT_GET.__getitem__, kinds), stream)))
    except (KeyError, TypeError, IndexError):
        return None
    for code, width in _WIDTHS.items():
        try:
            arr = array.array(code, values)
        except (OverflowError, TypeError):
            continue
        if arr.itemsize == width and (code == "I" or not values or max(values) <= _MAX_VALUE):
            break
    else:
        return None
    if sys.byteorder == "big":
        arr.byteswap()
    present = set(chars)
    return {"codes": {c: k for k, c in _COMPACT_CODES.items() if c in present}, "kinds": chars,
            "fields": f"{code}:{base64.b64encode(arr.tobytes()).decode('ascii')}"}


def from_compact(obj) -> tuple[Instr, ...]:
    """The stream a compact form describes; PlanFormatError naming what is wrong with it."""
    import array
    import base64
    import binascii
    import sys
    from itertools import repeat

    if not isinstance(obj, dict) or set(obj) != {"codes", "kinds", "fields"}:
        raise PlanFormatError("a compact instruction stream is an object with exactly 'codes', 'kinds' and 'fields'")
    codes, chars, fields = obj["codes"], obj["kinds"], obj["fields"]
    if not isinstance(codes, dict) or not all(len(c) == 1 for c in codes):
        raise PlanFormatError("compact stream: 'codes' must map single characters to instruction kinds")
    for c, k in codes.items():
        if not isinstance(k, str) or k not in _FIELDS:
            raise PlanFormatError(f"compact stream: code {_clip(c)} names unknown kind {_clip(k)}; allowed: {allowed_kinds()}")
    if not isinstance(chars, str):
        raise PlanFormatError("compact stream: 'kinds' must be a string of the codes' characters")
    stray = set(chars) - codes.keys()
    if stray:
        raise PlanFormatError(f"compact stream: 'kinds' has {_clip(min(stray))}, which 'codes' does not name")
    code = fields[:1] if isinstance(fields, str) and fields[1:2] == ":" else None
    if code not in _WIDTHS:
        raise PlanFormatError("compact stream: 'fields' must be 'I:<base64>' (unsigned 32-bit) or 'Q:<base64>' (64-bit)")
    arr = array.array(code)
    if arr.itemsize != _WIDTHS[code]:
        raise PlanFormatError(f"compact stream: this platform has no {8 * _WIDTHS[code]}-bit array type {code!r}")
    try:
        raw = base64.b64decode(fields[2:], validate=True)
    except (binascii.Error, ValueError) as e:
        raise PlanFormatError(f"compact stream: 'fields' is not base64 ({e})") from None
    if len(raw) % arr.itemsize:
        raise PlanFormatError("compact stream: 'fields' does not hold whole numbers")
    arr.frombytes(raw)
    if sys.byteorder == "big":
        arr.byteswap()
    width = {c: len(_COMPACT_SLOTS[k]) for c, k in codes.items()}
    need = sum(map(width.__getitem__, chars))
    if len(arr) != need:
        raise PlanFormatError(f"compact stream: its kinds carry {need} numbers, 'fields' holds {len(arr)}")
    values = arr.tolist()
    if code == "Q" and values and max(values) > _MAX_VALUE:
        raise PlanFormatError(f"compact stream: a field above {_MAX_VALUE} (the text form's 18 digits)")
    # one zip per kind, all drawing on one iterator over the numbers: next() of a kind's zip takes
    # that kind's fields in order and fills the others with Instr's defaults
    it = iter(values)
    default = (-1, -1, -1, -1, -1, 0, 0)
    rows = {c: zip(repeat(k), *(it if s in _COMPACT_SLOTS[k] else repeat(default[s - 1]) for s in range(1, 8)))
            for c, k in codes.items()}
    return tuple(map(tuple.__new__, repeat(Instr), map(next, map(rows.__getitem__, chars))))
