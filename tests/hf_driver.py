"""Run several (plan, Hugging Face dir) pairs with --hf-model --check-reference in one torchrun
launch (the launch and the transformers import are paid once). Rank 0 prints one 'RESULT {json}'
line per job.

    torchrun --nproc-per-node P tests/hf_driver.py '[{"plan": ..., "hf": ..., "export": ... or null}]'
"""
import io
import json
import os
import sys

import torch

import ir
from executor.cli import exit_process
from executor.cli import options as executor_options
from executor.runner import run_rank
from executor.transport import init_dist


def main(jobs):
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    tp = init_dist(rank, world, torch.device("cpu"), 120.0)
    for job in jobs:
        plan = ir.load(job["plan"])
        opts = executor_options(check_reference=True, quiet=True, device="cpu", timeout=120.0, hf_model=job["hf"],
                                export_hf=job.get("export"), steps=job.get("steps", 1))
        code, summary = run_rank(plan, rank, tp, opts, out=io.StringIO())
        if rank == 0:
            print("RESULT " + json.dumps({**summary, **job, "code": code}), flush=True)
    tp.close()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
    exit_process(0)  # as the executor does (issue 15.5: a normal exit can abort in torch's C++ teardown)
