"""Mutation testing of the checker: every single meaning-changing mutation of a valid plan is
caught with the broken rule (or the deadlock's wait cycle) named; valid plans always pass.

Plans come from every family, the zero-bubble ones (zb-h1, zb-v, interleaved-zb) and slimpipe
--split-backward included; on a split backward the I/W mutations (a missing W, a W before its I,
an I before its output gradient, a duplicated W, a unit with both B and W) are tried too, on the
hypothesis draws and on one fixed plan per split family (so that each is tried on each family)."""
import os
import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compiler import build_spec, compile_plan, resolve_model, schedules
from ir import BACKWARD, KV, KV_PARTNER, RECVS, SENDS, Instr, Kind
from passes import check

TINY = resolve_model("tiny")
TRIED = Counter()


@pytest.fixture(scope="module", autouse=True)
def report_count():
    yield
    print(f"\nmutation testing: {sum(TRIED.values())} mutants tried, all caught: {dict(sorted(TRIED.items()))}")


FAMILIES = ["gpipe", "1f1b", "interleaved-1f1b", "looped-bfs", "seq1f1b", "slimpipe",
            "zb-h1", "zb-v", "interleaved-zb", "slimpipe --split-backward"]
SPLIT_SUFFIX = " --split-backward"


def build(fam, p, m, n, v, exchange):
    name = fam.removesuffix(SPLIT_SUFFIX)
    model = TINY.model_copy(update={"layers": max(p * v, 8)})
    spec = build_spec(name, model, pp=p, microbatches=m, slices=n, virtual_stages=v, seq_len=16 * n, exchange=exchange,
                      split_backward=fam.endswith(SPLIT_SUFFIX))
    return compile_plan(spec)


@st.composite
def plans(draw):
    fam = draw(st.sampled_from(FAMILIES))
    name = fam.removesuffix(SPLIT_SUFFIX)
    p = draw(st.integers(2, 4))
    family = schedules.get(name)
    v = draw(st.integers(1, 2)) if family.allows_virtual else 1
    if name == "interleaved-1f1b":
        v = 2
    v = family.default_virtual if name == "zb-v" else v
    n = draw(st.sampled_from([1, 2, 4])) if family.allows_slices else 1
    if name == "slimpipe" and v > 1:
        n = 4
    m = draw(st.integers(1, 4))
    if name == "interleaved-1f1b":
        m = p * draw(st.integers(1, 2))
    if name == "seq1f1b" and v > 1:
        k = -(-p // n)
        m = k * draw(st.integers(1, 2))
    if name == "looped-bfs":
        m = max(m, p)
    if name == "slimpipe" and n > 1:
        n = draw(st.sampled_from([4, 8]))
    exchange = n > 1 and (name == "slimpipe" or draw(st.booleans()))
    return build(fam, p, m, n, v, exchange)


def mutate(plan, ranks):
    return plan.with_ranks(ranks)


def rules(report):
    return {p.rule for p in report.problems}


def producer_index(stream, ins):
    want = {Kind.F} if ins.kind == Kind.SEND_ACT else BACKWARD  # a gradient comes from B or I
    for i, u in enumerate(stream):
        if u.kind in want and (u.mb, u.slice, u.chunk) == (ins.mb, ins.slice, ins.chunk):
            return i
    return None


def expect(plan, mut, allowed, name, must=None, says=None):
    """The mutant `mut` (ranks) of `plan` is refused with rules within `allowed`, `must` among them
    and `says` in its message; every problem locates itself."""
    rep = check(mutate(plan, mut))
    assert not rep.ok, f"{name} not caught"
    got = rules(rep)
    assert got and got <= allowed, f"{name}: rules {got}, expected within {allowed}"
    if must is not None:
        named = [p for p in rep.problems if p.rule == must]
        assert named, f"{name}: rules {got}, expected {must!r} among them"
        assert says is None or any(says in p.message for p in named), (name, [p.message for p in named])
    assert all(p.message for p in rep.problems)
    for p in rep.problems:  # each problem locates itself as fields, the same place its message names
        assert p.rank is not None, p
        if p.index is not None:
            assert f"rank {p.rank} #{p.index} " in p.message or f"rank {p.rank} waits at #{p.index} " in p.message, p
        else:
            assert p.rule == "coverage" and p.message.startswith(f"rank {p.rank} lacks "), p
    TRIED[name] += 1
    return rep


def unit(ins):
    return (ins.mb, ins.slice, ins.chunk)


def split_mutants(plan, pick, every_source=False):
    """The I/W mutations of a split-backward plan, each checked with its rule; `pick(list)` chooses
    the site (a hypothesis draw, or a seeded random choice); `every_source`: an I moved before its
    output gradient once per source the plan has (a receive, the loss, the next stage's I on the
    same rank), else once. Returns the names tried."""
    ranks = [list(s) for s in plan.ranks]
    at = {}  # (rank, kind, unit) -> index
    for r, s in enumerate(ranks):
        for i, u in enumerate(s):
            at[(r, u.kind, unit(u))] = i
    ws = [(r, i) for r, s in enumerate(ranks) for i, u in enumerate(s) if u.kind == Kind.W]
    if not ws:
        return []

    def copy():
        return [list(s) for s in ranks]

    # a missing W
    r, i = pick(ws)
    mut = copy()
    del mut[r][i]
    expect(plan, mut, {"coverage", "kv"}, "missing-W", "coverage", "lacks 'W")
    # a W before its I (anywhere before it)
    r, i = pick(ws)
    ib = at[(r, Kind.I, unit(ranks[r][i]))]
    k = pick(list(range(ib + 1)))
    mut = copy()
    mut[r].insert(k, mut[r].pop(i))
    expect(plan, mut, {"order", "kv"}, "W-before-its-I", "order", "before its input gradient")
    # a duplicated W (the copy anywhere after the W; between a partner's KV*_RECV and the unit it
    # serves beside, the kv rule names that too, and after the OPT the optimizer rule)
    r, i = pick(ws)
    k = pick(list(range(i + 1, len(ranks[r]) + 1)))
    mut = copy()
    mut[r].insert(k, ranks[r][i])
    expect(plan, mut, {"unique", "kv", "optimizer"}, "duplicated-W", "unique", "repeats")
    # a unit with the fused B and its W (its I read as B)
    r, i = pick(ws)
    ib = at[(r, Kind.I, unit(ranks[r][i]))]
    mut = copy()
    mut[r][ib] = ranks[r][ib]._replace(kind=Kind.B)
    expect(plan, mut, {"coverage", "kv"}, "B-and-W", "coverage", "a weight gradient without the unit's I")
    # an I before its output gradient: the receive that brings it, or the next stage's I on the
    # same rank (V placement), or on the last stage its own F (the loss)
    spec = plan.spec
    last = spec.num_stages - 1
    moves = []
    for r, s in enumerate(ranks):
        for i, u in enumerate(s):
            if u.kind != Kind.I:
                continue
            stage = spec.placement[r][u.chunk]
            if stage == last:
                moves.append((r, i, at[(r, Kind.F, unit(u))], "order", "before its forward", "loss"))
            elif spec.stage_rank()[stage + 1] == r:
                c1 = spec.stage_chunk()[stage + 1]
                moves.append((r, i, at[(r, Kind.I, (u.mb, u.slice, c1))], "order", "before the next stage's", "same rank"))
            else:
                moves.append((r, i, at[(r, Kind.RECV_GRAD, unit(u))], "dependency", "that brings its gradient", "receive"))
    kinds = sorted({mv[-1] for mv in moves}) if every_source else [None]
    for want in kinds:
        r, i, j, must, says, via = pick([mv for mv in moves if want in (None, mv[-1])])
        mut = copy()
        mut[r].insert(j, mut[r].pop(i))
        expect(plan, mut, {"dependency", "order", "kv", "p2p-order", "deadlock"}, f"I-before-its-gradient ({via})",
               must, says)
    return ["missing-W", "W-before-its-I", "duplicated-W", "B-and-W"] + [f"I-before-its-gradient ({k})" for k in kinds]


@settings(max_examples=int(os.environ.get("MUTATION_EXAMPLES", "100")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plans(), st.data())
def test_mutants_are_caught(plan, data):
    assert check(plan).ok, check(plan).problems[:3]  # no valid plan rejected
    ranks = [list(s) for s in plan.ranks]
    sites = [(r, i) for r, s in enumerate(ranks) for i, _ in enumerate(s)]

    def expect_(mut, allowed, name):
        return expect(plan, mut, allowed, name)

    # 1. drop a receive (p2p or the partner side of a KV exchange)
    recvs = [(r, i) for r, i in sites if ranks[r][i].kind in RECVS or ranks[r][i].kind in KV_PARTNER]
    if recvs:
        r, i = data.draw(st.sampled_from(recvs))
        mut = [list(s) for s in ranks]
        del mut[r][i]
        expect_(mut, {"match", "dependency", "kv", "p2p-order"}, "drop-receive")

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
        expect_(mut, {"dependency", "p2p-order"}, "swap-sends")

    # 3. move a backward (B, or a split backward's I) before one of its dependencies (its F, the
    #    later slice's backward, its gradient)
    moves = []
    for r, s in enumerate(ranks):
        for i, u in enumerate(s):
            if u.kind not in BACKWARD:
                continue
            for j in range(i):
                w = s[j]
                if (w.mb, w.chunk) == (u.mb, u.chunk) and (
                        (w.kind == Kind.F and w.slice == u.slice) or (w.kind == u.kind and w.slice == u.slice + 1)
                        or (w.kind == Kind.RECV_GRAD and w.slice == u.slice)):
                    moves.append((r, i, j))
    if moves:
        r, i, j = data.draw(st.sampled_from(moves))
        mut = [list(s) for s in ranks]
        u = mut[r].pop(i)
        mut[r].insert(j, u)
        expect_(mut, {"order", "dependency", "kv"}, "backward-before-dependency")

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
            expect_(mut, {"kv", "range", "p2p-order"}, "break-kv-pairing")

    # 5. wrong tag on a send, receive or exchange (another message's tag, or an unused one)
    comm = [(r, i) for r, i in sites if ranks[r][i].kind in SENDS | RECVS | KV]
    if comm:
        r, i = data.draw(st.sampled_from(comm))
        u = ranks[r][i]
        tags = sorted({w.tag for s in ranks for w in s if w.tag >= 0 and w.tag != u.tag})
        tag = data.draw(st.sampled_from(tags + [10 ** 7]))
        mut = [list(s) for s in ranks]
        mut[r][i] = u._replace(tag=tag)
        expect_(mut, {"match", "dependency", "kv", "p2p-order"}, "wrong-tag")

    # 6. hoist a gradient receive to the front of its stream: locally legal, globally a deadlock
    grads = [(r, i) for r, i in sites if ranks[r][i].kind == Kind.RECV_GRAD]
    if grads:
        r, i = data.draw(st.sampled_from(grads))
        mut = [list(s) for s in ranks]
        mut[r].insert(0, mut[r].pop(i))
        # it may also come before another receive from the same peer: rule p2p-order as well
        rep = expect_(mut, {"deadlock", "p2p-order"}, "hoist-receive-deadlock")
        dl = [p for p in rep.problems if p.rule == "deadlock"]
        assert dl and "wait cycle" in dl[0].message and f"rank {r}" in dl[0].message

    # 7. a split backward's I/W mutations (zero-bubble families, slimpipe --split-backward)
    split_mutants(plan, lambda xs: data.draw(st.sampled_from(xs)))


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


@pytest.mark.parametrize("fam,p,m,n,v,exchange", [
    ("zb-h1", 3, 4, 2, 1, True),
    ("zb-v", 3, 3, 2, 2, True),
    ("interleaved-zb", 2, 4, 1, 2, False),
    ("slimpipe --split-backward", 4, 2, 4, 1, True),
    ("slimpipe --split-backward", 2, 2, 4, 2, True),
])
def test_split_backward_mutants_every_family(fam, p, m, n, v, exchange):
    """Each I/W mutation on each split family (a few sites each, seeded): caught, rule named."""
    plan = build(fam, p, m, n, v, exchange)
    assert check(plan).ok
    rng = random.Random(f"{fam} {p} {m} {n} {v}")
    # the output gradient of an I comes by a receive, from the loss (last stage) and, in a V, from
    # the next stage's I on the same rank: each kind of move is tried on the families that have it
    want = {"receive", "loss"} | ({"same rank"} if fam == "zb-v" else set())
    for _ in range(4):
        tried = split_mutants(plan, rng.choice, every_source=True)
        assert tried == ["missing-W", "W-before-its-I", "duplicated-W", "B-and-W"] + [
            f"I-before-its-gradient ({k})" for k in sorted(want)]
