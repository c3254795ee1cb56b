"""Run several plans with --check-reference in one torchrun launch (one process group), so the
executor tests pay the launch cost once. Rank 0 prints one 'RESULT {json}' line per plan.

    torchrun --nproc-per-node P tests/executor_driver.py a.json b.json ...

P is pp times the number of data-parallel replicas (the same pp for every plan).
"""
import io
import json
import os
import sys

import ir
from executor.cli import exit_process
from executor.cli import options as executor_options
from executor.runner import run_rank
from executor.transport import init_dist

import torch


POST_AHEAD = (None, 0, 1, 2)  # --post-ahead all (the default), 0, 1, 2


def options(**kw):
    return executor_options(check_reference=True, quiet=True, device="cpu", timeout=120.0, **kw)


def main(paths):
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    plans = [ir.load(path) for path in paths]
    kv = any(plan.has_kv_exchanges() for plan in plans)
    # every plan of a launch has the same pp; world / pp data-parallel replicas (a (dp, pp) mesh)
    tp = init_dist(rank, world, torch.device("cpu"), 120.0, kv=kv, pp=plans[0].spec.pp)
    for i, (path, plan) in enumerate(zip(paths, plans)):
        # as the executor's --p2p-wait auto: the rank blocks on its own messages unless it must serve KV requests
        tp.direct = not plan.has_kv_exchanges()
        ahead = POST_AHEAD[i % len(POST_AHEAD)]
        code, summary = run_rank(plan, rank, tp, options(post_ahead=ahead), out=io.StringIO())
        if rank == 0:
            print("RESULT " + json.dumps({"plan": os.path.basename(path), "code": code, "post_ahead": ahead, **summary}),
                  flush=True)
    tp.close()


if __name__ == "__main__":
    main(sys.argv[1:])
    exit_process(0)  # as the executor does (issue 15.5: a normal exit can abort in torch's C++ teardown)
