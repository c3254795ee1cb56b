"""A receive posted after its send: how long gloo then takes to hand over the data. Two processes
(torchrun, gloo, one thread each); rank 0 posts isend of 1 MiB, rank 1 posts the matching irecv
100 ms later and times it to completion, while rank 0 sleeps or computes (matmuls). What the
executor sees when it reaches a RECV whose data its peer sent long before; `slimpipe profile`'s
ping-pong (receiver first) measures the other case.

    torchrun --nproc-per-node 2 bench/p2p_late_post.py [--reps 5]
Rank 1 prints JSON and writes bench/results/p2p_late_post.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.machine import machine  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--bytes", type=int, default=1 << 20)
    a = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    r = dist.get_rank()
    x = torch.randn(a.bytes // 4)
    mat = torch.randn(512, 512)
    got: dict[str, list[float]] = {"sender_idle": [], "sender_computing": []}
    tag = 0
    for _ in range(a.reps):
        for case in got:
            tag += 1
            dist.barrier()
            if r == 0:
                w = dist.isend(x, 1, tag=tag)
                t0 = time.monotonic()
                while time.monotonic() - t0 < 0.3:
                    if case == "sender_computing":
                        mat @ mat
                    else:
                        time.sleep(0.01)
                w.wait()
            else:
                time.sleep(0.1)  # the send was posted 100 ms ago
                buf = torch.empty_like(x)
                t0 = time.perf_counter()
                dist.irecv(buf, 0, tag=tag).wait()
                got[case].append(time.perf_counter() - t0)
    if r == 1:
        out = {"benchmark": "p2p_late_post", "machine": machine(), "bytes": a.bytes, "reps": a.reps,
               "post_delay_s": 0.1, "receive_s": {k: {"median": statistics.median(v), "min": min(v), "max": max(v)}
                                                  for k, v in got.items()}}
        with open(os.path.join(ROOT, "bench", "results", "p2p_late_post.json"), "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")
        print(json.dumps(out["receive_s"]))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
