"""--post-ahead: which receives a rank posts before each compute unit (gloo, tag-matched). The
interpreter's windows against a plain walk of the stream: K units ahead posts the receives of the
comm runs after the next K compute units, in program order, each once, never past an instruction
that is neither a compute unit nor a send/recv (OPT, a KV exchange)."""
import pytest
import torch

from executor.attention import pick_backend
from executor.interpreter import Rank
from executor.transport import LocalHub
from ir import RECVS, Kind
from tests.executor_plans import matrix

COMPUTE = {Kind.F, Kind.B, Kind.I, Kind.W}
COMM = {Kind.SEND_ACT, Kind.SEND_GRAD, Kind.RECV_ACT, Kind.RECV_GRAD}


def expected(stream, i, k, posted):
    """The receives compute unit i posts with window k: walk k units forward from i."""
    out, j = [], i
    for _ in range(k):
        if j >= len(stream) or stream[j].kind not in COMPUTE:
            break
        j += 1
        while j < len(stream) and stream[j].kind in COMM:
            if stream[j].kind in RECVS and j not in posted:
                out.append(j)
            j += 1
    return out


def posts(plan, rank, ahead):
    """[(unit index, posted receive indices)] as the interpreter posts them over one step."""
    tp = LocalHub(plan.spec.pp, 10.0).endpoint(rank)
    tp.kind, tp.watch, tp.match = "dist", True, "tag"  # as gloo: post_early is on
    got = []
    tp.batch = lambda ops: [object()] * len(ops)
    backend = pick_backend("sdpa", torch.device("cpu"), torch.float32, plan.spec.model.head_dim)
    R = Rank(plan, rank, tp, backend, device="cpu", post_ahead=ahead)
    for i, ins in enumerate(R.stream):
        if ins.kind in COMPUTE:
            before = set(R.early)
            R.post_early(i)
            got.append((i, sorted(set(R.early) - before)))
        elif ins.kind in COMM:
            R.early.pop(i, None)  # the run takes its receives (comm_run)
            R.posted_to = max(R.posted_to, i + 1)
    return R.stream, got


@pytest.mark.parametrize("name", ["interleaved-1f1b-v2", "zb-v", "slimpipe-v1-exchange"])
@pytest.mark.parametrize("ahead", [0, 1, 2, 3])
def test_window_matches_a_walk_of_the_stream(name, ahead):
    plan = matrix(2)[name]
    for rank in range(plan.spec.pp):
        stream, got = posts(plan, rank, ahead)
        posted = set()
        for i, recvs in got:
            assert recvs == expected(stream, i, ahead, posted), (rank, i)
            posted.update(recvs)
        order = [x for _, recvs in got for x in recvs]
        assert order == sorted(order)  # program order: the per-peer watchers rely on it


def test_all_posts_every_receive_at_the_start_of_its_run_of_units():
    plan = matrix(2)["interleaved-1f1b-v2"]
    stream, got = posts(plan, 1, None)
    recvs = [x for x, ins in enumerate(stream) if ins.kind in RECVS]
    first = next(x for x, ins in enumerate(stream) if ins.kind in COMPUTE)
    # rank 1 starts with a receive (taken by its run); every later one is posted before the first unit
    assert recvs[0] < first and got[0] == (first, recvs[1:])
    assert all(not r for _, r in got[1:])
    # stage 1 takes m activations and m gradients, stage 3 m activations (p=2, v=2)
    assert len(recvs) == 3 * plan.spec.microbatches


def test_a_kv_exchange_instruction_ends_the_window():
    plan = matrix(2)["slimpipe-v1-exchange"]
    for rank in range(plan.spec.pp):
        stream, got = posts(plan, rank, None)
        for i, recvs in got:
            stop = next((x for x in range(i + 1, len(stream)) if stream[x].kind not in COMPUTE | COMM), len(stream))
            assert all(x < stop for x in recvs)
    kinds = {ins.kind for s in plan.ranks for ins in s}
    assert kinds - COMPUTE - COMM - {Kind.OPT}  # the plan has KV instructions to stop at
