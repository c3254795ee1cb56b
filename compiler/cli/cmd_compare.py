"""slimpipe compare: every schedule family's best plan on one model, context and layout (p, tp, cp, dp,
m fixed), found by tune's own search over the same n, v, partitions and exchange settings."""
from __future__ import annotations

import math
import re

from ir import SlimpipeError, SpecError
from passes.costs import load_profile

from ..layout import check_cp, check_tp
from ..search import Candidate, Problem, SearchResult, Space, candidate_spec, evaluate, rank_rows, search
from .cmd_compile import add_model_args, model_from_args
from .. import schedules
from .common import DTYPE_HELP, add_parser, chosen_dtype, emit_json, families_arg, human_bytes, limit_seconds, positive_int
from .tables import family_table

_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2 ** 10, "mib": 2 ** 20,
          "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(text: str, flag: str = "--memory-budget") -> float:
    """'80GiB', '80GB', '8.5e10B' -> bytes. A unit is required: a bare '80' is refused rather than
    read as 80 bytes (or silently as GiB)."""
    units = "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
    mt = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+]?[0-9]+)?)\s*([a-zA-Z]*)\s*", text or "")
    if mt and not mt.group(2):
        raise SpecError(f"{flag} {text!r} has no unit; write it with one, e.g. {mt.group(1)}GiB "
                        f"(GiB = 2^30 bytes; allowed units: {units})")
    if not mt or mt.group(2).lower() not in _UNITS or float(mt.group(1)) <= 0:
        raise SpecError(f"{flag} {text!r} is not a size; allowed: a positive number with a unit "
                        f"({units}), e.g. 80GiB")
    size = float(mt.group(1)) * _UNITS[mt.group(2).lower()]
    if not math.isfinite(size):  # '1e400GiB' overflows to inf: not a size either
        raise SpecError(f"{flag} {text!r} is too large to be a size; allowed: a finite positive number with a "
                        f"unit ({units}), e.g. 80GiB")
    return size


def best_per_family(problem: Problem, space: Space, time_limit: float | None = None) -> tuple[list[dict], SearchResult]:
    """tune's search over one layout (p, tp, cp, dp, m fixed): each family's best plan over the same
    n, v, partitions and exchange as tune (stopped after `time_limit` seconds, when given: the rows
    are then marked not proven). A family with no plan under the budget is shown by its
    least-memory candidate, simulated and marked oom, with the reason."""
    res = search(problem, space, top_k=1, keep_plan=False, time_limit=time_limit)
    rows = []
    for f in res.families:
        if f.row is not None:
            rows.append({**f.row, "oom": False, "proven": f.proven, "why_none": None})
            continue
        fc = f.counts
        over = fc["pruned_memory_bound"] + fc["oom_exact"]
        left = fc["unexplored"] + fc["pruned_time_bound"]
        if not f.proven and left:  # the time limit stopped it: its other candidates may fit
            short = (f"the time limit stopped its search with {left} candidates not simulated; the least-memory "
                     f"plan of those it reached is shown, over budget (--time-limit 0 finishes the search)")
        elif not f.proven and res.listing_cut:
            short = ("the time limit stopped its search with the space not all listed" + (
                     "; the least-memory plan of those it reached is shown, over budget" if f.least_memory else "")
                     + " (--time-limit 0 finishes the search)")
        elif over and f.least_memory:
            short = f"its least-memory plan; all {over} that obey the rules are over budget"
        else:
            short = f.why
        row = {"schedule": f.family, "oom": True, "proven": f.proven, "why_none": short}
        lm = f.least_memory
        if lm is None:
            row["why_none"] = f.why
        else:
            cand = Candidate(**{k: lm[k] for k in Candidate.__dataclass_fields__})
            try:
                sim, _plan = evaluate(candidate_spec(problem, cand), problem.profile, problem.dtype_bytes)
                row.update({**cand.fields(), **sim, "_cand": cand})
            except SlimpipeError:
                pass
        rows.append(row)
    return rows, res


def run(args) -> int:
    if args.microbatches is None:
        args.microbatches = args.pp
    profile = load_profile(args.device_profile)
    dtype_name, dtype = chosen_dtype(args.dtype, profile)
    budget = parse_bytes(args.memory_budget) if args.memory_budget else profile.memory_bytes
    model, seq = model_from_args(args)
    check_tp(args.tp, model)
    check_cp(args.cp, seq)  # each candidate's slices too: the search skips those cp does not divide
    gpus = args.pp * args.tp * args.cp * args.dp
    problem = Problem(model, seq, gpus, budget, args.microbatches * args.dp, profile, dtype)
    kw = {"families": families_arg(args.schedules)} if args.schedules is not None else {}
    space = Space(tp=(args.tp,), cp=(args.cp,), pp=(args.pp,), **kw)
    table, res = best_per_family(problem, space, args.time_limit or None)
    tried = res.counts["candidates"]
    if args.json:
        emit_json({"model": model.name, "seq_len": seq, "pp": args.pp, "microbatches": args.microbatches,
                   "tp": args.tp, "cp": args.cp, "dp": args.dp, "device_profile": profile.name, "dtype": dtype_name,
                   "memory_budget_bytes": budget, "configurations_tried": tried, "counts": res.counts,
                   "proven": res.proven,
                   "space": {"slices": list(space.slices), "virtual_stages": list(space.virtual_stages)},
                   "rows": [{k: v for k, v in r.items() if not k.startswith("_")} for r in table]})
        return 0 if any(not r["oom"] for r in table) else 1  # as tune: no plan that fits is an answer, exit 1
    print(f"{model.name}, seq {seq}, pp={args.pp} m={args.microbatches} tp={args.tp} cp={args.cp} dp={args.dp} on "
          f"{profile.name}, {dtype_name}; budget {human_bytes(budget)}")
    print(f"best plan of each family over tune's space at this layout (n in {','.join(map(str, space.slices))} and 1 "
          f"for the zero-bubble families, "
          f"v in {','.join(map(str, space.virtual_stages))}, every partition and exchange setting; {tried} candidates):")
    fitting = [r for r in table if not r["oom"]]
    pick = rank_rows(fitting)[0] if fitting else None
    for line in family_table([_Fam(r) for r in table], pick):
        print(line)
    over = [r for r in table if r["oom"] and "step_s" in r]
    if over:
        print(f"OOM rows: the family's least-memory plan, simulated; it needs more than {human_bytes(budget)}")
    if not res.proven:
        print(f"NOT PROVEN: the search stopped at --time-limit {args.time_limit:g} s with {res.stop_phrase()}"
              f"; a row marked not proven may not be its family's best (--time-limit 0 finishes the proof)")
    if not fitting:  # as tune: an answer, not an input error (exit 1)
        print("no plan found before the time limit at this layout (the rows say how far each family got)" if not res.proven
              else "no plan fits at this layout: no family has one that obeys its rules and fits the budget (the rows say why)")
        return 1
    return 0


class _Fam:
    """A compare row in the shape family_table reads."""

    def __init__(self, r: dict):
        self.family = r["schedule"]
        self.row = r if "step_s" in r else None
        self.proven = r["proven"]
        self.why = r["why_none"]
        self.oom = r["oom"]
        self.oom_label = "OOM" if r["proven"] else "NOT PROVEN"  # an unfinished search may still find one under budget


def register(sub) -> None:
    p = add_parser(sub, "compare", "compare the schedule families at one layout, each at its best plan over tune's "
                   "space (n, v, partition, exchange, layer split): step time, bubble, peak memory, tokens/s, OOM against a budget",
                   "slimpipe compare --model llama-70b --seq-len 524288 --pp 16 --tp 8 --cp 4 --memory-budget 80GiB")
    add_model_args(p)
    p.add_argument("--pp", type=positive_int, required=True, help="pipeline ranks p")
    p.add_argument("--microbatches", type=positive_int, help="micro-batches m per step (default: pp)")
    p.add_argument("--tp", type=positive_int, default=1, help="tensor parallel degree (default 1)")
    p.add_argument("--cp", type=positive_int, default=1, help="context parallel degree (default 1)")
    p.add_argument("--dp", type=positive_int, default=1, help="data parallel degree (default 1)")
    p.add_argument("--memory-budget", help="memory per GPU with a unit, e.g. 80GiB or 85.9GB (default: the device "
                   "profile's)")
    p.add_argument("--device-profile", help="h100 (default), a100, or a JSON file")
    p.add_argument("--dtype", help=DTYPE_HELP)
    p.add_argument("--schedules", help=f"comma-separated families to compare (default all: {','.join(schedules.FAMILIES)})")
    p.add_argument("--time-limit", type=limit_seconds, default=120.0,
                   help="seconds before the search stops; rows not proven are marked (default 120, as tune; 0 = none)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)
