"""slimpipe IR: the vocabulary every other package speaks. Imports nothing from them."""
from .errors import OutputError, PlanFormatError, PlanInvalidError, SlimpipeError, SpecError
from .instr import B, F, Instr, parse, parse_stream, split_units, to_text
from .kinds import (ALL_KINDS, BACKWARD, COMPUTE, FORWARD, KINDS, KV, KV_FWD, KV_HELPER, KV_OWNER, KV_PARTNER, KV_SERVER,
                    MATCH, P2P, RECVS, ROLE, SENDS, SPLIT_BACKWARD, UNIT_COST, WEIGHT, Kind, KindInfo, allowed_kinds, info,
                    kinds_where, kv_kind)
from .plan import COMPACT_MIN, COMPACT_SCHEMA_VERSION, SCHEMA_VERSION, SCHEMA_VERSIONS, Plan, atomic_write, check_writable, dumps, from_dict, load, loads, pydantic_message, read_user_json, save, to_dict
from .spec import ModelConfig, PlanSpec

__all__ = [
    "ALL_KINDS", "BACKWARD", "COMPUTE", "FORWARD", "KINDS", "KV", "KV_FWD", "KV_HELPER", "KV_OWNER", "KV_PARTNER",
    "KV_SERVER", "MATCH", "P2P", "RECVS", "ROLE", "SENDS", "SPLIT_BACKWARD", "UNIT_COST", "WEIGHT", "Kind", "KindInfo",
    "allowed_kinds", "info", "kinds_where", "kv_kind",
    "B", "F", "Instr", "parse", "parse_stream", "split_units", "to_text",
    "COMPACT_MIN", "COMPACT_SCHEMA_VERSION", "SCHEMA_VERSION", "SCHEMA_VERSIONS", "Plan", "atomic_write", "check_writable", "dumps", "from_dict", "load", "loads", "pydantic_message", "read_user_json", "save", "to_dict",
    "ModelConfig", "PlanSpec", "OutputError", "PlanFormatError", "PlanInvalidError", "SlimpipeError", "SpecError",
]
