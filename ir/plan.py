"""Plan: spec + one instruction stream per rank; versioned JSON I/O with atomic writes."""
from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import ValidationError

from .errors import OutputError, PlanFormatError, SpecError
from .kinds import KV
from .instr import Instr, _clip, from_compact, parse, parse_stream, to_compact, to_text
from .spec import PlanSpec, RuleError
from .gcpause import gc_paused
from .limits import MAX_PLAN_BYTES, file_or_pipe
from .proofs import digest

SCHEMA_VERSION = 1  # a plan whose ranks are lists of instruction texts (the form people read and write)
# schema_version 2: a rank may also be in the compact form (ir.instr.to_compact), which `dumps`
# writes for plans of COMPACT_MIN instructions or more: they load several times faster
COMPACT_SCHEMA_VERSION = 2
SCHEMA_VERSIONS = (SCHEMA_VERSION, COMPACT_SCHEMA_VERSION)
COMPACT_MIN = 100_000


@dataclass(frozen=True)
class Plan:
    """A compiled (or hand-written) pipeline plan. `ranks[r]` is rank r's instruction stream."""

    spec: PlanSpec
    ranks: tuple[tuple[Instr, ...], ...]
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    schema_version: int = SCHEMA_VERSION
    # SHA-256 (hex) of the file bytes this plan was read from (ir.load), None for a plan made in
    # memory; a copy with other streams (with_ranks) has none. Keys the proofs ir.proofs remembers.
    source: str | None = field(default=None, compare=False, hash=False, repr=False)

    def with_ranks(self, ranks, **meta) -> "Plan":
        """A copy with new streams (tuples), extra meta merged in."""
        return Plan(self.spec, tuple(tuple(r) for r in ranks), {**self.meta, **meta}, self.schema_version)

    def num_instructions(self) -> int:
        return sum(len(r) for r in self.ranks)

    def has_kv_exchanges(self) -> bool:
        """Whether any rank holds a KV-exchange instruction (ir.KV: owner, partner or helper side)."""
        return any(ins.kind in KV for stream in self.ranks for ins in stream)


def pydantic_message(err: ValidationError, prefix: str = "", name=None) -> str:
    """First error of a pydantic ValidationError as one line, with the value given when it is one
    field's: 'spec.pp: Input should be greater than or equal to 1 (got -2)'. `name` (field -> the
    user's word for it, e.g. a config.json key) renames the field and the fields a RuleError names."""
    e = err.errors()[0]
    fields = (name(str(e["loc"][0])), *e["loc"][1:]) if name and e["loc"] else e["loc"]
    parts = [x if x.isprintable() and len(x) <= 40 else _clip(x, 40) for x in map(str, (prefix, *fields)) if x != ""]
    loc = ".".join(parts)  # a hostile key name may hold newlines or be huge: keep the message one line
    rule = (e.get("ctx") or {}).get("error")
    msg = rule.render(name) if name and isinstance(rule, RuleError) else e["msg"].removeprefix("Value error, ")
    inp = e.get("input")
    if e["loc"] and (inp is None or isinstance(inp, (bool, int, float, str))):  # a field's own value: name it
        msg += f" (got {_clip(inp, 40)})"
    return f"{loc}: {msg}" if loc else msg


def to_dict(plan: Plan) -> dict:
    return {
        "schema_version": plan.schema_version,
        "spec": {**plan.spec.model_dump(mode="json"), "model": plan.spec.model.to_json()},
        "meta": plan.meta,
        "ranks": [[to_text(i) for i in r] for r in plan.ranks],
    }


@gc_paused
def from_dict(d: Any) -> Plan:
    """Validate a decoded JSON object into a Plan (PlanFormatError naming the first problem)."""
    if not isinstance(d, dict):
        raise PlanFormatError(f"plan must be a JSON object, got {type(d).__name__}")
    extra = set(d) - {"schema_version", "spec", "meta", "ranks"}
    if "traceEvents" in d:
        raise PlanFormatError("this is a trace (Chrome trace events, as the executor's --trace writes), not a plan; "
                              "give the plan.json that `slimpipe compile` wrote (the trace goes to simulate --against)")
    if "peak_flops" in d and "p2p_bandwidth" in d:
        raise PlanFormatError("this is a device profile (as `slimpipe profile` writes), not a plan; give the plan.json "
                              "that `slimpipe compile` wrote (the profile goes to --device-profile)")
    if extra:
        raise PlanFormatError(f"plan has unknown field(s) {_clip(sorted(extra))}; allowed: schema_version, spec, meta, ranks")
    ver = d.get("schema_version")
    if type(ver) is not int or ver not in SCHEMA_VERSIONS:  # not true or 1.0, which compare equal to 1
        raise PlanFormatError(f"plan schema_version {_clip(ver)} is not supported; this slimpipe reads schema_version "
                              f"{' and '.join(map(str, SCHEMA_VERSIONS))}")
    try:
        spec = PlanSpec.model_validate(d.get("spec"))
    except ValidationError as e:
        raise PlanFormatError(f"plan {pydantic_message(e, 'spec')}") from None
    ranks = d.get("ranks")
    if not isinstance(ranks, list) or len(ranks) != spec.pp:
        raise PlanFormatError(f"plan 'ranks' must be a list of {spec.pp} instruction lists (one per rank of pp={spec.pp})")
    out = []
    for r, stream in enumerate(ranks):
        if isinstance(stream, dict) and ver == COMPACT_SCHEMA_VERSION:
            try:
                out.append(from_compact(stream))
            except PlanFormatError as e:
                raise PlanFormatError(f"rank {r}: {e}", r) from None
            continue
        if not isinstance(stream, list):
            compact = " (or, with schema_version 2, a compact stream object)" if ver == COMPACT_SCHEMA_VERSION else ""
            raise PlanFormatError(f"rank {r}: instructions must be a list of strings like 'F mb0 s0 c0'{compact}", r)
        try:
            out.append(parse_stream(stream))
        except PlanFormatError as e:
            i = next(i for i, t in enumerate(stream) if _unparsable(t))
            raise PlanFormatError(f"rank {r} #{i}: {e}", r, i) from None
    meta = d.get("meta", {})
    if not isinstance(meta, dict):
        raise PlanFormatError("plan 'meta' must be a JSON object")
    return Plan(spec, tuple(out), meta, SCHEMA_VERSION)


def _unparsable(text) -> bool:
    try:
        parse(text)
    except PlanFormatError:
        return True
    return False


@gc_paused
def dumps(plan: Plan, compact: bool | None = None) -> str:
    """JSON with one line per rank stream (small, diffs readable). `compact`: write the ranks in
    the compact form (schema_version 2) instead of texts; None = for plans of COMPACT_MIN
    instructions or more (a plan with a field the text form could not write stays text)."""
    if compact is None:
        compact = plan.num_instructions() >= COMPACT_MIN
    forms = [to_compact(r) for r in plan.ranks] if compact else None
    if forms is not None and all(f is not None for f in forms):
        d = {**to_dict(plan.with_ranks(())), "schema_version": COMPACT_SCHEMA_VERSION}
        del d["ranks"]
        lines = [json.dumps(f, separators=(",", ":")) for f in forms]
    else:
        d = to_dict(plan)
        lines = [_texts_json(r) for r in d.pop("ranks")]
    head = json.dumps(d, indent=1)
    body = ",\n".join("  " + line for line in lines)
    return head[:-2] + ',\n "ranks": [\n' + body + "\n ]\n}\n"


def _texts_json(texts: list[str]) -> str:
    """json.dumps(texts, separators=(",", ":")): joined directly when no text needs escaping
    (printable ASCII without quotes or backslashes, as every canonical text is)."""
    out = '["' + '","'.join(texts) + '"]' if texts else "[]"
    if out.isascii() and out.isprintable() and "\\" not in out and out.count('"') == 2 * len(texts):
        return out
    return json.dumps(texts, separators=(",", ":"))


def loads(text: str) -> Plan:
    try:
        d = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PlanFormatError(f"plan is not valid JSON: {e}") from None
    except RecursionError:
        raise PlanFormatError("plan is not usable JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer literal beyond Python's digit limit
        raise PlanFormatError(f"plan is not usable JSON: {e}") from None
    return from_dict(d)


def atomic_write(path: str, data: str | bytes) -> None:
    """Write to a temporary file beside `path`, then rename: never a half-written file. A symbolic
    link is followed (the file it points to is replaced, the link kept); an existing output that
    is not a regular file (/dev/stdout, /dev/null, a FIFO) is written to directly, as open()
    would: renaming over it would replace the device or pipe with a file. A file that cannot be
    made there (its directory missing or refusing new files) is a SpecError naming `path` (not the
    temporary file); one that cannot be written out (a full disk) an OutputError naming `path`."""
    mode = "wb" if isinstance(data, bytes) else "w"
    real = _output_target(path)
    if real is None:
        f = open(path, mode)  # refused (a device we may not open): an OSError naming path, as before
        with _writing(path, "the output may be cut short"), f:
            f.write(data)
        return
    fd, tmp = _temp_beside(path, real)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600: give the file what open() would
        with _writing(path, "nothing was written (a file already there is kept)"), os.fdopen(fd, mode) as f:
            f.write(data)
        try:
            os.replace(tmp, real)
        except OSError as e:  # e.g. `path` is a directory: e names the temporary file and the target
            raise SpecError(f"cannot write {path!r}: {e.strerror}; choose another path") from None
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _writing(path: str, outcome: str):
    """An OSError while the data goes out (ENOSPC, EDQUOT, EIO; it names no file, or the temporary
    one) as an OutputError naming `path` and what became of it. A reader that left a pipe
    (BrokenPipeError) goes through: the CLI says that itself."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as e:
        raise OutputError(f"cannot write {path!r}: {e.strerror or e}; {outcome}") from None


def check_writable(path: str) -> None:
    """Raise what atomic_write(path) would for where its file goes (a missing directory, one no file
    can be made in), before the work that makes the output: a file is made there and removed."""
    real = _output_target(path)
    if real is not None:
        fd, tmp = _temp_beside(path, real)
        os.close(fd)
        os.unlink(tmp)


def _output_target(path: str) -> str | None:
    """The file atomic_write replaces for `path` (links followed), or None: write to `path` itself."""
    try:
        st = os.stat(path)  # through any links (/dev/stdout -> /proc/self/fd/1 -> a pipe)
    except OSError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
        return None
    real = os.path.realpath(path)
    directory = os.path.dirname(real)
    if not os.path.isdir(directory):  # an input error (the path given), and the directory where links lead
        via = "" if directory == os.path.dirname(os.path.abspath(path)) else f" (where {path!r} leads)"
        raise SpecError(f"cannot write {path!r}: directory {directory!r}{via} does not exist; create it or choose "
                        f"another path")
    return real


def _temp_beside(path: str, real: str) -> tuple[int, str]:
    """A new temporary file (fd, name) in the directory of `real`; SpecError naming `path` if the
    file system refuses one there (not writable, read-only, /proc or /sys)."""
    directory = os.path.dirname(real)
    try:
        return tempfile.mkstemp(prefix=".tmp-", dir=directory)
    except OSError as e:
        raise SpecError(f"cannot write {path!r}: no file can be created in {directory!r} ({e.strerror}); "
                        f"choose a path in a directory you can write to") from None


def _umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save(plan: Plan, path: str, compact: bool | None = None) -> None:
    """Write the plan (dumps: the compact form for large plans unless `compact` says otherwise)."""
    atomic_write(path, dumps(plan, compact))


def read_user_json(path: str, flag: str, hint: str):
    """Decode a JSON file the user named with `flag`; SpecError in one line if it is missing or
    malformed (`hint` says what to give instead)."""
    try:
        with open(path, encoding="utf-8") as f:
            if not file_or_pipe(f):
                raise SpecError(f"{flag} {_clip(path, 200)}: not a file (a device or socket); give {hint}")
            return json.load(f)
    except FileNotFoundError:
        raise SpecError(f"{flag} {path!r}: no such file; give {hint}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SpecError(f"{flag} {path!r}: not a readable JSON file ({e})") from None


def load(path: str) -> Plan:
    """The plan in a file; its `source` is the SHA-256 of the bytes read (ir.proofs)."""
    try:
        with open(path, "rb") as f:
            if not file_or_pipe(f):
                raise PlanFormatError(f"plan file {_clip(path, 200)} is not a file (a device or socket); give a plan "
                                      f"file, or a pipe")
            data = f.read(MAX_PLAN_BYTES + 1)
        if len(data) > MAX_PLAN_BYTES:
            raise PlanFormatError(f"plan file {_clip(path, 200)} holds more than {MAX_PLAN_BYTES // 2 ** 30} GiB, more than "
                                  f"any plan slimpipe makes (ir.limits.MAX_UNITS units)")
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise PlanFormatError(f"plan file {_clip(path, 200)} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)  # e's text repeats the path
        raise PlanFormatError(f"plan file {_clip(path, 200)} unreadable: {reason}") from None
    try:
        plan = loads(text)
    except PlanFormatError as e:
        where = path if path.isprintable() and len(path) <= 200 else _clip(path, 200)
        raise PlanFormatError(f"{where}: {e}", e.rank, e.index) from None
    return replace(plan, source=digest(data))
