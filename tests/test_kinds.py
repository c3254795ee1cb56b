"""The kind table (ir.KINDS) and the family records: every pass reads them, unknown kinds are refused."""
import pytest

import ir
from compiler import build_spec, compile_plan, resolve_model, schedules
from ir import KINDS, Instr, PlanFormatError
from ir.kinds import COST_CLASSES, MEMORY_EFFECTS, ROLES
from passes import check, replay, validate
from passes.simulate import peak_units

TINY = resolve_model("tiny")


def test_table_rows_are_complete():
    for name, row in KINDS.items():
        assert row.name == name and row.role in ROLES
        if row.role == "compute":
            assert row.cost in COST_CLASSES and row.unit_cost > 0
        else:
            assert row.cost is None and row.unit_cost == 0
        assert row.memory is None or row.memory in MEMORY_EFFECTS
        if row.match:
            assert KINDS[row.match].match == name  # counterparts point at each other
    assert ir.UNIT_COST[ir.Kind.F] == 1.0 and ir.UNIT_COST[ir.Kind.B] == 2.0


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_round_trips_with_its_fields(kind):
    vals = dict(zip(("mb", "s", "c", "to", "from", "x", "t"), (3, 2, 1, 5, 5, 1, 9)))
    text = " ".join([kind] + [f"{f}{vals[f]}" for f in KINDS[kind].fields])
    ins = ir.parse(text)
    assert ins.kind == kind and ir.to_text(ins) == text


def _plan_with(extra):
    plan = compile_plan(build_spec("1f1b", TINY, pp=2, microbatches=2, seq_len=32))
    r0 = list(plan.ranks[0])
    r0.insert(1, extra)
    return plan.with_ranks([r0, plan.ranks[1]])


def test_unknown_kind_built_in_memory_is_refused():
    plan = _plan_with(Instr("JUMP", 0, 0, 0))
    problems = validate(plan)
    assert [p.rule for p in problems] == ["kind"]
    assert "unknown instruction kind" in problems[0].message and "rank 0 #1" in problems[0].message
    assert not check(plan).ok
    with pytest.raises(PlanFormatError, match="rank 0 #1: unknown instruction kind 'JUMP'"):
        replay(plan)
    with pytest.raises(PlanFormatError, match="unknown instruction kind"):
        ir.to_text(Instr("JUMP", 0, 0, 0))


def test_passes_read_the_table():
    plan = compile_plan(build_spec("slimpipe", TINY, pp=2, microbatches=2, slices=4, seq_len=32))
    # unit-cost replay charges each compute unit its table cost
    res = replay(plan)
    assert res.busy == [sum(ir.UNIT_COST[i.kind] for i in s) for s in plan.ranks]
    assert peak_units(plan.ranks[0]) == 4 + 2 * (2 - 1)  # slimpipe: n*v + 2(p-1) in flight on rank 0


@pytest.mark.parametrize("fam", list(schedules.FAMILIES))
def test_family_records_are_complete(fam):
    rec = schedules.get(fam)
    assert rec.name == fam and rec.inflight and rec.bubble is not None and rec.peak_units is not None
    assert rec.compare is not None and rec.search_choices((2, 4), (1, 2))
    p, m, n, v = rec.fitted(4, 5, 8, 2)
    assert rec.accepts(p, m, n, v)
