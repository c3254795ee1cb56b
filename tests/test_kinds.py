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
        if row.match and row.side != "helper":
            assert KINDS[row.match].match == name  # counterparts point at each other
        elif row.match:  # a helper matches its owner kind, which names the partner as its counterpart
            owner = KINDS[row.match]
            assert owner.side == "owner" and owner.phase == row.phase and KINDS[owner.match].side == "partner"
    assert ir.UNIT_COST[ir.Kind.F] == 1.0 and ir.UNIT_COST[ir.Kind.B] == 2.0


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_round_trips_with_its_fields(kind):
    vals = dict(zip(("mb", "s", "c", "to", "from", "lo", "hi", "t"), (3, 2, 1, 5, 5, 1, 7, 9)))
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
    assert rec.search_choices((2, 4), (1, 2))
    p, m, n, v = rec.fitted(4, 5, 8, 2)
    assert rec.accepts(p, m, n, v)


# ---------------------------------------------------------------- split backward: I and W

def split(plan):
    """Every B of `plan` replaced by its I and, right after it, its W."""
    out = []
    for s in plan.ranks:
        r = []
        for i in s:
            r += [Instr("I", i.mb, i.slice, i.chunk), Instr("W", i.mb, i.slice, i.chunk)] if i.kind == "B" else [i]
        out.append(r)
    return plan.with_ranks(out)


def test_split_backward_text_and_rules():
    """I and W round-trip as text; a hand-split plan (each W right after its I) is valid. The rules
    an I/W mutant breaks (a missing W, a W before its I, a duplicated W, an I before its output
    gradient, a B with a W) are checked on every split family in tests/test_mutations.py."""
    assert ir.parse("I mb3 s2 c1") == Instr("I", 3, 2, 1) and ir.to_text(Instr("W", 3, 2, 1)) == "W mb3 s2 c1"
    plan = split(compile_plan(build_spec("slimpipe", TINY, pp=2, microbatches=2, slices=2, seq_len=32,
                                         exchange=False)))
    assert check(plan).ok


def test_split_backward_costs_memory_and_executor_accepts():
    from passes import executor_problems
    from passes.costs import PROFILES, CostModel
    from passes.memory import rank_memory
    from passes.simulate import simulate_units

    spec = build_spec("1f1b", resolve_model("llama-7b"), pp=2, microbatches=2, seq_len=4096)
    fused = compile_plan(spec)
    plan = split(fused)
    # unit costs: I = W = 1, B = 2: the same makespan as fused when each W follows its I
    assert simulate_units(plan)["makespan"] == simulate_units(fused)["makespan"]
    cm = CostModel(spec, PROFILES["h100"])
    for r in range(2):
        b = cm.unit_time(r, Instr("B", 0, 0, 0))
        i, w = cm.unit_time(r, Instr("I", 0, 0, 0)), cm.unit_time(r, Instr("W", 0, 0, 0))
        assert i + w == pytest.approx(b, rel=1e-12) and 0 < w < i
    # what W needs stays from I to W: more peak memory than fused, shown in its own category
    for r in range(2):
        mf, ms = rank_memory(fused, r), rank_memory(plan, r)
        assert ms["peak"] > mf["peak"] and ms["breakdown"]["weight_grad_inputs"] > 0
        assert mf["breakdown"]["weight_grad_inputs"] == 0
    # the executor has handlers for I and W (tests/test_split_backward_executor.py runs them)
    assert not executor_problems(plan) and not executor_problems(fused)
