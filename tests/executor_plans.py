"""Plans the executor tests run: every schedule family at p=2 and p=4 on the tiny model."""
import dataclasses

from compiler import compile_plan, resolve_model
from compiler.layout import build_spec
from passes.costs import PROFILES

# a device slow enough that the tiny model's units outweigh the rendezvous: the exchange pass then
# levels every step (several partners per unit, token ranges, idle-rank helpers), as it does for
# real models on real devices
LEVELLING = dataclasses.replace(PROFILES["h100"], name="levelling-toy", peak_flops=1e9, p2p_latency=1e-6)

SEQ = 64
# a Seq1F1B-style computation-wise partition (later slices shorter), different per micro-batch
FLOPS_LIKE = [(24, 16, 14, 10), (22, 18, 13, 11), (26, 15, 13, 10), (24, 16, 14, 10)]


def spec(schedule, p, m, n=1, v=1, slice_lens=None, exchange=False, model=None, **kw):
    lens = None
    partition = "uniform"
    if slice_lens is not None:
        lens, partition = [slice_lens[i % len(slice_lens)] for i in range(m)], "custom"
    return build_spec(schedule, model or resolve_model("tiny"), pp=p, microbatches=m, slices=n, virtual_stages=v,
                      seq_len=SEQ, slice_lens=lens, partition=partition, exchange=exchange, **kw)


def matrix(p):
    """name -> compiled plan, every family of the issue at pipeline size p."""
    c = {
        "gpipe": spec("gpipe", p, p),
        "1f1b": spec("1f1b", p, p + 1),
        "interleaved-1f1b-v2": spec("interleaved-1f1b", p, p, v=2),
        # m not a multiple of p: rounds of micro-batches (p=2: m=5 in rounds 3+2; p=4: m=10 in 5+5),
        # one round of m = 3 (p=2: more micro-batches than ranks; p=4: fewer)
        "interleaved-1f1b-v2-rounds": spec("interleaved-1f1b", p, 5 * p // 2, v=2),
        "interleaved-1f1b-v2-m3": spec("interleaved-1f1b", p, 3, v=2),
        "looped-bfs-v2": spec("looped-bfs", p, p, v=2),
        "seq1f1b-v1-uniform": spec("seq1f1b", p, 2, n=4),
        "seq1f1b-v1-flops": spec("seq1f1b", p, 2, n=4, slice_lens=FLOPS_LIKE),
        "seq1f1b-v2-uniform": spec("seq1f1b", p, p, n=4, v=2),
        "seq1f1b-v2-flops": spec("seq1f1b", p, p, n=4, v=2, slice_lens=FLOPS_LIKE),
        "seq1f1b-v2-n2-m3": spec("seq1f1b", p, 3, n=2, v=2),  # p=4: m=3 is no multiple of ceil(p/n)=2
        "seq1f1b-v1-flops-exchange": spec("seq1f1b", p, 2, n=4, slice_lens=FLOPS_LIKE, exchange=True),
        "slimpipe-v1": spec("slimpipe", p, 2, n=4),
        "slimpipe-v1-exchange": spec("slimpipe", p, 2, n=4, exchange=True),
        "slimpipe-v2": spec("slimpipe", p, p, n=4, v=2),
        "slimpipe-v2-exchange": spec("slimpipe", p, p, n=4, v=2, exchange=True),
        # the split backward (I and W): zero-bubble families, with slices and with the KV exchange
        "zb-h1": spec("zb-h1", p, p + 1),
        "zb-h1-sliced": spec("zb-h1", p, 2, n=4),
        "zb-v": spec("zb-v", p, p, v=2),
        "zb-v-sliced": spec("zb-v", p, 2, n=4, v=2),
        "zb-v-sliced-exchange": spec("zb-v", p, 2, n=4, v=2, exchange=True),
        "interleaved-zb-v2": spec("interleaved-zb", p, p, v=2),
        "interleaved-zb-v2-sliced": spec("interleaved-zb", p, p, n=2, v=2),
        "interleaved-zb-v2-m3": spec("interleaved-zb", p, 3, v=2),  # p=2: m % p = 1; p=4: m < p
        # slimpipe --split-backward with the KV exchange: slices = p (levelled: token ranges, helpers at p=4)
        # and slices = 2p > p (interleaved, the unit-cost pairing)
        "slimpipe-split-v1-exchange": (spec("slimpipe", p, 2, n=p, exchange=True, split_backward=True), LEVELLING),
        "slimpipe-split-v2-exchange": spec("slimpipe", p, 2, n=2 * p, v=2, exchange=True, split_backward=True),
        # a large vocabulary makes the LM head worth several layers: uneven stages
        "1f1b-balanced": spec("1f1b", p, p, model=resolve_model("tiny", {"vocab": 8192}), layer_split_kind="balanced"),
        "slimpipe-levelled-v1": (spec("slimpipe", p, 2, n=8, exchange=True), LEVELLING),
        "slimpipe-levelled-v2": (spec("slimpipe", p, 2, n=8, v=2, exchange=True), LEVELLING),
    }
    return {name: compile_plan(*s) if isinstance(s, tuple) else compile_plan(s) for name, s in c.items()}
