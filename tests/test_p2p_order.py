"""The p2p semantics NCCL has: per ordered rank pair, messages match in posting order (rule
p2p-order), and sends may block until their receive is posted (check --p2p rendezvous)."""
from compiler import build_spec, compile_plan, resolve_model, schedules
from compiler.schedules.seq1f1b import FAMILY as SEQ1F1B
from ir import RECVS, SENDS, Kind, SpecError
from passes import check, validate
from passes.lower import lower_comm
from compiler import schedule_plan

TINY = resolve_model("tiny")


def _compile(fam, p, m, n=1, v=1, exchange=False):
    model = TINY.model_copy(update={"layers": max(8, p * v)})
    return compile_plan(build_spec(fam, model, pp=p, microbatches=m, slices=n, virtual_stages=v, seq_len=8 * n,
                                   exchange=exchange))


def _pair_orders(plan):
    """{(src, dst): (tags of src's sends to dst, tags of dst's receives from src)} in program order."""
    out = {}
    for r, s in enumerate(plan.ranks):
        for ins in s:
            if ins.kind in SENDS:
                out.setdefault((r, ins.peer), ([], []))[0].append(ins.tag)
            elif ins.kind in RECVS:
                out.setdefault((ins.peer, r), ([], []))[1].append(ins.tag)
    return out


def test_every_family_obeys_the_order_rule_over_a_grid():
    tried = 0
    for fam, family in schedules.FAMILIES.items():
        for p in (2, 3, 4):
            for m in (1, 2, 4, 6):
                for n in ((1, 2, 4) if family.allows_slices else (1,)):
                    for v in ((1, 2, 3) if family.allows_virtual else (1,)):
                        try:
                            plan = _compile(fam, p, m, n, v, exchange=fam == "slimpipe" and n > 1)
                        except SpecError:
                            continue  # a shape the family does not take
                        rep = check(plan)
                        assert rep.ok, (fam, p, m, n, v, rep.problems[:2])
                        for (src, dst), (sends, recvs) in _pair_orders(plan).items():
                            assert sends == recvs, (fam, p, m, n, v, src, dst)
                        tried += 1
    assert tried > 250, tried


def test_interleaved_seq1f1b_needed_its_receives_reordered():
    # n > p: the warm-up runs more forwards than Megatron's formula, and plain lowering put rank 1's
    # receives from rank 0 in another order than rank 0's sends (NCCL would swap the tensors)
    spec = build_spec("seq1f1b", TINY, pp=2, microbatches=2, slices=4, virtual_stages=2, seq_len=32)
    SEQ1F1B.validate(spec)
    plan = lower_comm(schedule_plan(spec))
    assert validate(plan) == []
    # the same streams with each receive right before its consumer break the rule
    naive = []
    for s in plan.ranks:
        recvs = [x for x in s if x.kind in RECVS]
        rest = [x for x in s if x.kind not in RECVS]
        out = []
        for x in rest:
            if x.kind in (Kind.F, Kind.B):
                want = Kind.RECV_ACT if x.kind == Kind.F else Kind.RECV_GRAD
                out += [y for y in recvs if (y.kind, y.mb, y.slice, y.chunk) == (want, x.mb, x.slice, x.chunk)]
            out.append(x)
        naive.append(out)
    rules = {p.rule for p in validate(plan.with_ranks(naive))}
    assert rules == {"p2p-order"}


def test_swapped_receives_are_rejected_naming_rank_action_and_rule():
    plan = _compile("1f1b", 2, 3)
    s = list(plan.ranks[1])
    i0 = s.index(next(x for x in s if x.kind == Kind.RECV_ACT and x.mb == 0))
    i1 = s.index(next(x for x in s if x.kind == Kind.RECV_ACT and x.mb == 1))
    s.insert(i0 + 1, s.pop(i1))  # receive mb1 right after mb0: still legal
    ok = plan.with_ranks([plan.ranks[0], s])
    assert check(ok).ok
    s[i0], s[i0 + 1] = s[i0 + 1], s[i0]  # now swapped: fine on gloo (tags), wrong on NCCL
    rep = check(plan.with_ranks([plan.ranks[0], s]))
    assert [p.rule for p in rep.problems] == ["p2p-order"]
    msg = rep.problems[0].message
    assert msg.startswith("rank 1 #0 'RECV_ACT mb1 s0 c0 from0 t4' is rank 1's 1st receive from rank 0, but rank 0's "
                          "1st send to rank 1 is rank 0 #1 'SEND_ACT mb0 s0 c0 to1 t0'"), msg
    assert "NCCL ignores tags" in msg


def test_rendezvous_sends_find_the_send_before_receive_cycle():
    plan = _compile("1f1b", 2, 2)
    assert check(plan, "rendezvous").ok  # our executor posts each run of sends/receives as one batch
    single = plan.with_ranks(plan.ranks, p2p_batching="single")  # each action alone, as torch's runtime
    assert check(single).ok  # buffered sends: fine
    rep = check(single, "rendezvous")
    assert [p.rule for p in rep.problems] == ["deadlock"]
    msg = rep.problems[0].message
    assert msg.startswith("deadlock when sends block until their receive is posted: wait cycle rank 0 -> rank 1 -> rank 0")
    assert "rank 0 waits at #3 'SEND_ACT mb1 s0 c0 to1 t4' for a rendezvous with rank 1" in msg
    assert "rank 1 waits at #3 'SEND_GRAD mb0 s0 c0 to0 t1' for a rendezvous with rank 0" in msg
