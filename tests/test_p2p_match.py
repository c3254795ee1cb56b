"""The executor's tagless transport (--p2p-match order: messages of a rank pair match in posting
order, as on NCCL): every family passes the reference check under it, and it catches a plan
whose receives come in another order than its sends, which matching by tag runs right."""
import pytest

from compiler import build_spec, compile_plan, resolve_model, schedule_plan
from executor.cli import options
from executor.runner import run_local
from ir import RECVS, Instr, Kind
from passes import validate
from passes.lower import lower_comm
from tests.executor_plans import matrix

TOL = 1e-4


def run(plan, match):
    return run_local(plan, options(local=True, check_reference=True, quiet=True, p2p_match=match, device="cpu",
                                   timeout=60.0))


@pytest.mark.parametrize("name,plan", sorted(matrix(2).items()))
def test_every_family_passes_the_reference_check_with_tagless_matching(name, plan):
    code, s = run(plan, "order")
    assert code == 0 and s["max_grad_rel_err"] < TOL and s["loss_rel_err"] < TOL, (name, s)


@pytest.mark.parametrize("name", ["interleaved-1f1b-v2", "seq1f1b-v2-flops", "slimpipe-v2-exchange"])
def test_interleaved_families_at_p4_with_tagless_matching(name):
    code, s = run(matrix(4)[name], "order")
    assert code == 0 and s["max_grad_rel_err"] < TOL, (name, s)


def test_tagless_matching_catches_receives_out_of_send_order():
    # interleaved seq1f1b with n > p, each receive right before its consumer (the lowering before
    # receives were ordered by send): gloo's tag matching runs it right, NCCL's order matching
    # hands rank 1 other micro-batches' activations
    spec = build_spec("seq1f1b", resolve_model("tiny"), pp=2, microbatches=2, slices=4, virtual_stages=2, seq_len=32)
    plan = lower_comm(schedule_plan(spec))
    plan = plan.with_ranks([r + (Instr(Kind.OPT),) for r in plan.ranks])  # what compile_plan appends
    naive = []
    for s in plan.ranks:
        recvs = [x for x in s if x.kind in RECVS]
        out = []
        for x in s:
            if x.kind in (Kind.F, Kind.B):
                want = Kind.RECV_ACT if x.kind == Kind.F else Kind.RECV_GRAD
                out += [y for y in recvs if (y.kind, y.mb, y.slice, y.chunk) == (want, x.mb, x.slice, x.chunk)]
            if x.kind not in RECVS:
                out.append(x)
        naive.append(out)
    bad = plan.with_ranks(naive)
    assert {p.rule for p in validate(bad)} == {"p2p-order"}
    code, s = run(bad, "tag")
    assert code == 0 and s["max_grad_rel_err"] < TOL
    code, s = run(bad, "order")
    assert code == 1 and s["max_grad_rel_err"] > 1.0  # 7.6 when written: swapped activations
    code, s = run(plan, "order")  # the plan as compiled today
    assert code == 0 and s["max_grad_rel_err"] < TOL
