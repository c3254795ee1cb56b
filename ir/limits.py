"""Limits of the runtime a plan is written for, shared by the checker (passes.validate) and the
executor, so a plan is refused by `slimpipe check` for exactly what would stop the executor; and
of what slimpipe reads (sizes, counts, which files)."""
from __future__ import annotations

import os
import stat

# torch.distributed's point-to-point tags are C ints
WIRE_TAG_LIMIT = 2 ** 31

# the largest count (sizes, layers, steps, ranks) slimpipe takes: a C int, what torch's and NCCL's
# counts hold; anything above is a typo, and would fail in the executor or exhaust memory first
INT_MAX = 2 ** 31 - 1

# the most compute units (pp x microbatches x slices x virtual stages) a plan may have: the
# 1.6M-instruction plan of bench/scale_1m.py (262,144 units) takes 0.45 GiB to compile, so this
# many (64x as many) take about 29 GiB; a plan beyond it would exhaust a workstation's memory
# before the compiler could say why
MAX_UNITS = 2 ** 24

# the largest plan file ir.load reads: a plan of MAX_UNITS units holds about 100M instructions, 2.5
# GB in the compact form (25 bytes each) and a little more as text
MAX_PLAN_BYTES = 4 * 2 ** 30


# The executor attends the K/V of earlier slices kept on its rank in blocks of contiguous tokens of
# at most this many query lengths, one attention call each (executor.stage.LayerCtx.local_blocks);
# the measured cost model prices the same calls (passes.costs)
GATHER_SLICES = 4


def gather_blocks(pieces, q_len: int) -> list[tuple[int, int]]:
    """[(lo, hi)]: the token ranges `pieces` (ascending, each a slice's tokens or the part of one an
    exchange does not ship) gathered into blocks: a piece joins the block before it when it starts
    where that block ends and the block stays within GATHER_SLICES * q_len tokens (a piece longer
    than that stands alone). One attention call per block."""
    cap = GATHER_SLICES * q_len
    blocks: list[list[int]] = []
    for lo, hi in pieces:
        last = blocks[-1] if blocks else None
        if last is not None and last[1] == lo and hi - last[0] <= cap:
            last[1] = hi
        else:
            blocks.append([lo, hi])
    return [(lo, hi) for lo, hi in blocks]


def wire_stride(stage_layers) -> int:
    """Transport tags per plan tag: the instruction's own message, then a request and a reply,
    forward and backward, for every layer of a stage (the KV exchange's per-layer messages)."""
    return 4 * max(stage_layers) + 1


def tag_limit(spec) -> int:
    """Plan tags must be below this for every transport tag (tag * stride + sub < 2**31) to fit."""
    return WIRE_TAG_LIMIT // wire_stride(spec.stage_layers)


def file_or_pipe(f) -> bool:
    """Whether an open file `f` is one an input may be: a regular file or a pipe (`<(cat
    plan.json)`), not a device or socket, which /dev/zero shows can be read forever."""
    mode = os.fstat(f.fileno()).st_mode
    return stat.S_ISREG(mode) or stat.S_ISFIFO(mode)
