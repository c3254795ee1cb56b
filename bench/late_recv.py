"""A gloo receive posted after its send, with the sender computing, blocks in the receiver's own
irecv call: two processes on this machine, one thread each, 30 messages of 256 KiB. The sender
posts its isend, then computes (or sleeps); the receiver computes, then posts its irecv (late:
10 ms after the send; early: before it) and times the post and the wait that follows. This is
what executor --post-ahead avoids (bench/post_ahead.py measures the executor itself).

    PYTHONPATH=$PWD python bench/late_recv.py      # launches the runs with torchrun
Writes bench/results/late_recv.json and prints one line per case.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fidelity import RESULTS, free_port  # noqa: E402

CASES = [("late", "busy"), ("late", "sleep"), ("early", "busy")]  # (receive posted, sender meanwhile)
N, MESSAGES = 256 * 1024, 30


def worker(order: str, sender: str) -> None:
    import torch
    import torch.distributed as dist
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    a, b = torch.randn(512, 512), torch.randn(512, 512)

    def busy(s):
        t = time.monotonic()
        while time.monotonic() - t < s:
            a @ b

    post, wait = [], []
    for it in range(MESSAGES):
        dist.barrier()
        if rank == 0:
            busy(0.005 if order == "early" else 0.0)
            w = dist.isend(torch.ones(N, dtype=torch.uint8), 1, tag=it)
            busy(0.03) if sender == "busy" else time.sleep(0.03)
            w.wait()
        else:
            busy(0.0 if order == "early" else 0.01)
            buf = torch.empty(N, dtype=torch.uint8)
            t0 = time.monotonic()
            w = dist.irecv(buf, 0, tag=it)
            post.append(time.monotonic() - t0)
            busy(0.012)
            t0 = time.monotonic()
            w.wait()
            wait.append(time.monotonic() - t0)
    if rank == 1:
        print(json.dumps({"post_ms": [round(x * 1e3, 3) for x in post], "wait_ms": [round(x * 1e3, 3) for x in wait]}))
    dist.destroy_process_group()


def main() -> int:
    rows = []
    for rnd in range(2):
        for order, sender in CASES:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                   "--master-port", str(free_port()), __file__, "--worker", order, sender]
            r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
            if r.returncode:
                print(f"{order}/{sender}: exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                return 1
            got = json.loads(r.stdout.strip().splitlines()[-1])
            p = got["post_ms"]
            row = {"receive_posted": order, "sender": sender, "round": rnd, "post_ms_median": statistics.median(p),
                   "post_ms_max": max(p), "posts_over_1ms": sum(x > 1 for x in p), "messages": len(p),
                   "wait_ms_median": statistics.median(got["wait_ms"]), **got}
            rows.append(row)
            print(f"receive {order:<5} sender {sender:<5}: irecv post median {row['post_ms_median']:.2f} ms, max "
                  f"{row['post_ms_max']:.2f} ms, {row['posts_over_1ms']} of {len(p)} over 1 ms; wait after it median "
                  f"{row['wait_ms_median']:.3f} ms", file=sys.stderr, flush=True)
    out = {"benchmark": "late_recv", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "method": __doc__.split("\n\n")[0].replace("\n", " "), "load_end": os.getloadavg()[0], "rows": rows}
    (RESULTS / "late_recv.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        sys.exit(main())
