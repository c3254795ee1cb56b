"""Mutation testing of the checker: every single meaning-changing mutation of a valid plan is
caught with the broken rule (or the deadlock's wait cycle) named; valid plans always pass."""
import os
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compiler import build_spec, compile_plan, resolve_model, schedules
from ir import KV, KV_PARTNER, RECVS, SENDS, Instr, Kind
from passes import check

TINY = resolve_model("tiny")
TRIED = Counter()


@pytest.fixture(scope="module", autouse=True)
def report_count():
    yield
    print(f"\nmutation testing: {sum(TRIED.values())} mutants tried, all caught: {dict(sorted(TRIED.items()))}")


@st.composite
def plans(draw):
    fam = draw(st.sampled_from(["gpipe", "1f1b", "interleaved-1f1b", "looped-bfs", "seq1f1b", "slimpipe"]))
    p = draw(st.integers(2, 4))
    family = schedules.get(fam)
    v = draw(st.integers(1, 2)) if family.allows_virtual else 1
    if fam == "interleaved-1f1b":
        v = 2
    n = draw(st.sampled_from([1, 2, 4])) if family.allows_slices else 1
    if fam == "slimpipe" and v > 1:
        n = 4
    m = draw(st.integers(1, 4))
    if fam == "interleaved-1f1b":
        m = p * draw(st.integers(1, 2))
    if fam == "seq1f1b" and v > 1:
        k = -(-p // n)
        m = k * draw(st.integers(1, 2))
    if fam == "looped-bfs":
        m = max(m, p)
    if fam == "slimpipe" and n > 1:
        n = draw(st.sampled_from([4, 8]))
    exchange = n > 1 and (fam == "slimpipe" or draw(st.booleans()))
    layers = p * v
    model = TINY.model_copy(update={"layers": max(layers, 8)})
    spec = build_spec(fam, model, pp=p, microbatches=m, slices=n, virtual_stages=v, seq_len=16 * n, exchange=exchange)
    return compile_plan(spec)


def mutate(plan, ranks):
    return plan.with_ranks(ranks)


def rules(report):
    return {p.rule for p in report.problems}


def producer_index(stream, ins):
    want = Kind.F if ins.kind == Kind.SEND_ACT else Kind.B
    for i, u in enumerate(stream):
        if u.kind == want and (u.mb, u.slice, u.chunk) == (ins.mb, ins.slice, ins.chunk):
            return i
    return None


@settings(max_examples=int(os.environ.get("MUTATION_EXAMPLES", "60")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plans(), st.data())
def test_mutants_are_caught(plan, data):
    assert check(plan).ok, check(plan).problems[:3]  # no valid plan rejected
    ranks = [list(s) for s in plan.ranks]
    sites = [(r, i) for r, s in enumerate(ranks) for i, _ in enumerate(s)]

    def expect(mut, allowed, name):
        rep = check(mutate(plan, mut))
        assert not rep.ok, f"{name} not caught"
        got = rules(rep)
        assert got and got <= allowed, f"{name}: rules {got}, expected within {allowed}"
        assert all(p.message for p in rep.problems)
        for p in rep.problems:  # each problem locates itself as fields, the same place its message names
            assert p.rank is not None, p
            if p.index is not None:
                assert f"rank {p.rank} #{p.index} " in p.message or f"rank {p.rank} waits at #{p.index} " in p.message, p
            else:
                assert p.rule == "coverage" and p.message.startswith(f"rank {p.rank} lacks "), p
        TRIED[name] += 1
        return rep

    # 1. drop a receive (p2p or the partner side of a KV exchange)
    recvs = [(r, i) for r, i in sites if ranks[r][i].kind in RECVS or ranks[r][i].kind in KV_PARTNER]
    if recvs:
        r, i = data.draw(st.sampled_from(recvs))
        mut = [list(s) for s in ranks]
        del mut[r][i]
        expect(mut, {"match", "dependency", "kv", "p2p-order"}, "drop-receive")

    # 2. swap two sends to different peers, where a send then precedes the unit producing its data
    swaps = []
    for r, s in enumerate(ranks):
        idx = [i for i, u in enumerate(s) if u.kind in SENDS]
        for a in range(len(idx)):
            for b in range(a + 1, min(a + 6, len(idx))):
                i, j = idx[a], idx[b]
                if s[i].peer != s[j].peer and producer_index(s, s[j]) > i:
                    swaps.append((r, i, j))
    if swaps:
        r, i, j = data.draw(st.sampled_from(swaps))
        mut = [list(s) for s in ranks]
        mut[r][i], mut[r][j] = mut[r][j], mut[r][i]
        # sends to the same peer may lie between the two: their pair's order changes too
        expect(mut, {"dependency", "p2p-order"}, "swap-sends")

    # 3. move a backward before one of its dependencies (its F, the later slice's B, its gradient)
    moves = []
    for r, s in enumerate(ranks):
        for i, u in enumerate(s):
            if u.kind != Kind.B:
                continue
            for j in range(i):
                w = s[j]
                if (w.mb, w.chunk) == (u.mb, u.chunk) and (
                        (w.kind == Kind.F and w.slice == u.slice) or (w.kind == Kind.B and w.slice == u.slice + 1)
                        or (w.kind == Kind.RECV_GRAD and w.slice == u.slice)):
                    moves.append((r, i, j))
    if moves:
        r, i, j = data.draw(st.sampled_from(moves))
        mut = [list(s) for s in ranks]
        u = mut[r].pop(i)
        mut[r].insert(j, u)
        expect(mut, {"order", "dependency", "kv"}, "backward-before-dependency")

    # 4. break a KV-exchange pairing: change the range, the named unit or the peer on one side
    kvs = [(r, i) for r, i in sites if ranks[r][i].kind in KV]
    if kvs:
        r, i = data.draw(st.sampled_from(kvs))
        u = ranks[r][i]
        how = data.draw(st.sampled_from(["range", "slice", "peer"]))
        if how == "range":
            new = u._replace(hi=u.hi + 1 if u.hi + 1 <= plan.spec.slice_offsets(u.mb)[u.slice] else u.hi - 1)
        elif how == "slice":
            new = u._replace(slice=(u.slice + 1) % plan.spec.slices)
        else:
            others = [q for q in range(plan.spec.pp) if q not in (r, u.peer)]
            new = u._replace(peer=others[0]) if others else u._replace(tag=u.tag + 10 ** 6)
        if new != u:
            mut = [list(s) for s in ranks]
            mut[r][i] = new
            expect(mut, {"kv", "range", "p2p-order"}, "break-kv-pairing")

    # 5. wrong tag on a send, receive or exchange (another message's tag, or an unused one)
    comm = [(r, i) for r, i in sites if ranks[r][i].kind in SENDS | RECVS | KV]
    if comm:
        r, i = data.draw(st.sampled_from(comm))
        u = ranks[r][i]
        tags = sorted({w.tag for s in ranks for w in s if w.tag >= 0 and w.tag != u.tag})
        tag = data.draw(st.sampled_from(tags + [10 ** 7]))
        mut = [list(s) for s in ranks]
        mut[r][i] = u._replace(tag=tag)
        expect(mut, {"match", "dependency", "kv", "p2p-order"}, "wrong-tag")

    # 6. hoist a gradient receive to the front of its stream: locally legal, globally a deadlock
    grads = [(r, i) for r, i in sites if ranks[r][i].kind == Kind.RECV_GRAD]
    if grads:
        r, i = data.draw(st.sampled_from(grads))
        mut = [list(s) for s in ranks]
        mut[r].insert(0, mut[r].pop(i))
        # it may also come before another receive from the same peer: rule p2p-order as well
        rep = expect(mut, {"deadlock", "p2p-order"}, "hoist-receive-deadlock")
        dl = [p for p in rep.problems if p.rule == "deadlock"]
        assert dl and "wait cycle" in dl[0].message and f"rank {r}" in dl[0].message


def test_deadlock_message_names_the_cycle():
    plan = compile_plan(build_spec("1f1b", TINY, pp=2, microbatches=2, seq_len=32))
    ranks = [list(s) for s in plan.ranks]
    i = next(i for i, u in enumerate(ranks[0]) if u.kind == Kind.RECV_GRAD)
    ranks[0].insert(0, ranks[0].pop(i))
    rep = check(plan.with_ranks(ranks))
    msg = rep.problems[0].message
    assert (rep.problems[0].rule, rep.problems[0].rank, rep.problems[0].index) == ("deadlock", 0, 0)
    assert msg.startswith("deadlock: wait cycle rank 0 -> rank 1 -> rank 0")
    assert "rank 0 waits at #0 'RECV_GRAD mb0 s0 c0 from1 t1' for data from rank 1" in msg
