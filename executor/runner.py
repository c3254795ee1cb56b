"""Run a plan: the step loop of one rank (run_rank: a runtime per rank, step-end collectives, rank 0's
report) and the two launches, under torchrun (one process per rank) or in one process (one thread
per rank, in-process transport). Device and backend: device.py; collectives: collectives.py;
what is printed: report.py. A failure's exit code comes from its type (errors.py).

Failures: under torchrun the rank runs in a worker thread while the main thread supervises it:
it turns SIGTERM/SIGINT (torchrun stopping the job after another rank failed) into the rank's one
line, and ends the process if a wait overruns the timeout by a grace period (a blocking call that
ignores its own timeout). In-process, the first failing rank aborts the hub; every rank prints its
line and run_local returns non-zero."""
from __future__ import annotations

import math
import os
import signal
import socket
import sys
import threading
import time
from types import SimpleNamespace

import torch

from ir import SlimpipeError

from . import checkpoint
from .collectives import gather
from .data import make_source
from .errors import ExecError, PeerGone
from .device import DTYPES, choose_backend, choose_device
from .faults import Watch, cause, die, end_stopped_peers, fault_from_env, line, write_line
from .interpreter import Rank
from .metrics import peak_rss_mib
from .reference import loss_rel_err
from .report import TOLERANCE, Progress, reference_failed, summarize
from .transport import LocalHub, init_dist

__all__ = ["DTYPES", "TOLERANCE", "abandoned_threads", "grace_s", "run_dist", "run_local", "run_rank"]


INTERRUPT_GRACE_S = 0.5  # how long a rank that lost a peer waits for its own Ctrl-C before reporting the loss


def grace_s(timeout: float) -> float:
    """How long past a wait's deadline the supervisor lets the rank report it itself."""
    return 5.0 + 0.05 * timeout


def run_rank(plan, rank: int, transport, opts, out=sys.stdout, watch: Watch | None = None,
             fault=None) -> tuple[int, dict | None]:
    """Run opts.steps steps on global rank `rank` (pipeline rank rank % pp of replica rank // pp;
    the transport's world is pp x replicas). Returns (exit code, summary on rank 0 else None).
    `fault` is (Fault, index) or None: then SLIMPIPE_FAULT is read. The attention backend is
    opts.attention_backend when the command line chose it (cli.pick_attention), else chosen here."""
    device = choose_device(opts, transport, rank)
    backend = getattr(opts, "attention_backend", None) or choose_backend(opts, device, plan.spec.model.head_dim)
    watch = watch or Watch(rank)
    f, at = fault if fault is not None else fault_from_env(plan)
    if f is not None and f.rank != rank:
        f = at = None
    spec = plan.spec
    replicas = transport.world // spec.pp
    source = getattr(opts, "data_source", None)
    if source is None or getattr(source, "dp", replicas) != replicas:
        source = make_source(spec, opts.data, replicas, opts.tokenizer, opts.shuffle_seed, opts.data_dtype)
    R = Rank(plan, rank % spec.pp, transport, backend, device=device, dtype=DTYPES[opts.dtype], lr=opts.lr,
             timeout=opts.timeout, check_reference=opts.check_reference, watch=watch, fault=f, fault_at=at,
             source=source, hf_model=opts.hf_model, replica=rank // spec.pp, replicas=replicas, train=training(opts),
             autocast=opts.autocast, post_ahead=getattr(opts, "post_ahead", None))
    tokens = spec.microbatches * spec.micro_batch_size * spec.seq_len * replicas
    dist_mode = transport.kind == "dist"
    first = 0
    if opts.resume:
        path, meta = checkpoint.find(opts.resume, spec, opts.steps)
        watch.block(f"loading checkpoint {path}", "every rank", opts.timeout)
        try:
            checkpoint.load(path, R.params, dist=dist_mode)
        finally:
            watch.unblock()
        first = meta["step"]
    bar = Progress(opts, first, tokens, out) if rank == 0 else None
    times, losses, peaks, cuda_peaks, timed = [], [], [], [], []
    watch.steps = opts.steps
    try:
        for step in range(first, opts.steps):
            watch.step = step
            st = R.run_step(step)
            timed.append((st["events"], st["span"], st["cpu"], st["served_after"]))
            mem = st["cuda_max_memory_allocated"] / 2**20 if "cuda_max_memory_allocated" in st else peak_rss_mib()
            rows = gather(transport, watch, opts.timeout, [st["loss"], st["seconds"], mem],
                          "the step-end exchange of losses and times")
            loss = sum(r[0] for r in rows) / replicas  # each replica's loss is the mean over its micro-batches
            if not math.isfinite(loss):  # every rank has the same figure and stops here
                if step == 0:  # no optimizer step has run: not the learning rate's doing
                    raise ExecError(f"step 1: the loss is {loss}, not a finite number, before any update: the model "
                                    f"or its data give it (its config, e.g. rope_theta or rms_eps, or the tokens); "
                                    f"nothing is saved")
                raise ExecError(f"step {step + 1}: the loss is {loss}, not a finite number: training diverged "
                                f"(--lr {opts.lr:g}; try a smaller one); the step's parameters are not saved")
            secs = max(r[1] for r in rows)
            if step == 0 and "ref_loss" in R.report and R.holds_last:
                R.report["loss_rel_err"] = loss_rel_err(loss, R.report["ref_loss"])
            times.append(secs)
            losses.append(loss)
            peaks.append(st["peak_activation_bytes"])
            cuda_peaks.append(st.get("cuda_max_memory_allocated", 0))
            if bar is not None:
                bar.update(step, loss, secs, max(r[2] for r in rows), lr=st.get("lr"), grad_norm=st.get("grad_norm"))
            done = step + 1
            if opts.save and (done == opts.steps or (opts.save_every and done % opts.save_every == 0)):
                save_checkpoint(R, rank, transport, watch, spec, done, opts)
        watch.step = opts.steps
    finally:
        if bar is not None:
            bar.close()
    if opts.export_hf:
        from .hf import export_rank, raw_config

        what = "the listing of the exported shards"
        if rank < spec.pp:  # replica 0 writes; the other replicas hold the same weights
            export_rank(opts.export_hf, spec, rank, R.params.chunks,
                        lambda obj: [x for x in gather(transport, watch, opts.timeout, obj, what) if x is not None],
                        raw_config(opts.hf_model) if opts.hf_model else None)
        else:
            gather(transport, watch, opts.timeout, None, what)
    mine = {"peak_activation_bytes": max(peaks), "peak_rss_mib": peak_rss_mib(), **R.report}
    if opts.trace or opts.json:
        mine["timed"] = timed
    if device.type == "cuda":
        mine["cuda_max_memory_allocated"] = max(cuda_peaks)
    reports = gather(transport, watch, opts.timeout, mine, "the exchange of the final reports")
    bad = opts.check_reference and reference_failed(reports)
    summary = None
    if rank == 0:
        summary = summarize(spec, opts, reports, times, losses, tokens, backend=backend.name,
                            transport=transport.kind, device=device, bad=bad, out=out, plan=plan)
    return (1 if bad else 0), summary


def save_checkpoint(R, rank, transport, watch, spec, done: int, opts) -> None:
    """Save every rank's parameters and optimizer state after step `done` (DIR/step-NNNNNN)."""
    path = checkpoint.step_dir(opts.save, done)
    sd = checkpoint.rank_state(R.params)
    watch.block(f"saving checkpoint {path}", "every rank", opts.timeout)
    try:
        if transport.kind == "dist":
            checkpoint.save(path, sd, spec, done, opts, dist=True, write_meta=rank == 0)
        else:
            states = transport.all_gather(sd)  # in-process: the ranks' dicts themselves, no copy
            if rank == 0:
                checkpoint.save(path, states, spec, done, opts, dist=False, write_meta=True)
            transport.all_gather(None)  # no rank changes its parameters before the save is done
    finally:
        watch.unblock()


def training(opts):
    """The optimizer schedule of the options (None: constant --lr, no clipping, as before)."""
    if not (opts.warmup or opts.lr_decay != "constant" or opts.clip):
        return None
    return SimpleNamespace(warmup=opts.warmup, lr_decay=opts.lr_decay, min_lr=opts.min_lr, clip=opts.clip,
                           decay_steps=opts.decay_steps or opts.steps)


def _failure(rank: int, e: BaseException, watch: Watch) -> tuple[int, str]:
    """(exit code, message) for an exception that ended a rank: its type says the code."""
    if isinstance(e, SlimpipeError):
        return e.exit_code, str(e)
    if watch.what is not None:  # it failed inside a bounded wait outside the interpreter (init, collectives)
        return 1, f"{watch.where()}: failed {watch.doing()}: {cause(e)}"
    return 1, f"{watch.where()}: {cause(e)}"


def match_mode(opts, device: str) -> str:
    """--p2p-match: "order" (NCCL's tagless matching) or "tag"; auto is order on CUDA, tag on CPU."""
    m = getattr(opts, "p2p_match", "auto")
    if m != "auto":
        return m
    cuda = str(device) == "cuda" or (str(device) == "auto" and torch.cuda.is_available())
    return "order" if cuda else "tag"


def wait_mode(opts, kv: bool) -> str:
    """--p2p-wait: "direct" (the rank's thread waits its gloo messages itself) or "watcher" (a thread
    per peer waits and wakes the rank, which serves KV requests meanwhile); auto is direct unless the
    plan has KV exchanges (`kv`). (cli refuses direct with KV exchanges before any rank starts.)"""
    m = getattr(opts, "p2p_wait", "auto")
    if m != "auto":
        return m
    return "watcher" if kv else "direct"


def run_local(plan, opts) -> tuple[int, dict | None]:
    """All ranks of the plan in this process, one thread each. A failing rank aborts the others
    (they stop at their next wait); each failed rank's line is printed in rank order. A rank still
    busy a grace period after the first failure (a sleep, a long kernel) is abandoned and named."""
    pp = plan.spec.pp
    p = pp * plan.spec.dp  # every rank of every data-parallel replica
    hub = LocalHub(p, opts.timeout, match=match_mode(opts, opts.device))
    fault = fault_from_env(plan)
    codes: list = [None] * p
    errors: list = [None] * p
    summary: list = [None]
    watches = [Watch(r) for r in range(p)]
    if opts.device == "cpu" and opts.threads:
        torch.set_num_threads(opts.threads)

    def body(r):
        try:
            code, s = run_rank(plan, r, hub.endpoint(r, pp), opts, watch=watches[r], fault=fault)
            codes[r] = code
            if r == 0:
                summary[0] = s
        except BaseException as e:  # noqa: BLE001 - reported below, others aborted
            codes[r], errors[r] = _failure(r, e, watches[r])
            if os.environ.get("SLIMPIPE_TRACEBACK"):
                import traceback

                traceback.print_exc()
            hub.abort(f"rank {r} failed")

    threads = [threading.Thread(target=body, args=(r,), name=f"slimpipe-rank{r}", daemon=True) for r in range(p)]
    for t in threads:
        t.start()
    give_up = None
    try:
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(0.1)
            if give_up is None and hub.error is not None:
                give_up = time.monotonic() + grace_s(opts.timeout)
            if give_up is not None and time.monotonic() > give_up:
                break
    except KeyboardInterrupt:  # Ctrl-C: one line, exit 130; the rank threads are abandoned (the caller exits)
        hub.abort("interrupted (Ctrl-C)")
        write_line(f"executor: interrupted {watches[0].in_step()} (Ctrl-C)")
        return 130, None
    for r, t in enumerate(threads):
        if t.is_alive():
            codes[r] = 1
            errors[r] = f"{watches[r].where()}: abandoned {watches[r].doing()}: {hub.error}"
    for r, msg in enumerate(errors):
        if msg is not None:
            write_line(line(r, msg))
    return max(codes), summary[0]


def abandoned_threads() -> bool:
    """True if run_local left rank threads running (the caller should os._exit, not return)."""
    return any(t.name.startswith("slimpipe-rank") and t.is_alive() for t in threading.enumerate())


def run_dist(plan, opts) -> int:
    """This process's rank under torchrun. The rank runs in a worker thread; this (main) thread
    supervises: signals and overdue waits end the process with the rank's one line."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda" if opts.device == "cuda" else "cpu")
    fault = fault_from_env(plan)  # malformed: exit 2 before any communication
    watch = Watch(rank)
    result: list = []
    procs: list = []  # (host, pid) of every rank, once they joined

    def body():
        try:
            watch.block("the other ranks to join (init_process_group)", "every rank", opts.timeout)
            kv = plan.has_kv_exchanges()
            tp = init_dist(rank, world, device, opts.timeout, match_mode(opts, device.type), kv=kv,
                           pp=plan.spec.pp, wait=wait_mode(opts, kv))
            procs.extend(tuple(x) for x in tp.all_gather([socket.gethostname(), os.getpid()]))
            watch.unblock()
            code, _ = run_rank(plan, rank, tp, opts, watch=watch, fault=fault)
            watch.block("the other ranks to finish (shutdown barrier)", "every rank", opts.timeout)
            tp.close()
            watch.unblock()
            result.append(code)
        except BaseException as e:  # noqa: BLE001 - one line, then out: peers may be blocked on us
            code, msg = _failure(rank, e, watch)
            if isinstance(e, PeerGone):  # a Ctrl-C ends every rank at once: let this rank's SIGINT say so
                time.sleep(INTERRUPT_GRACE_S)
            die(rank, msg + end_stopped_peers(procs, rank), code)

    def on_signal(signum, _frame):
        if signum == signal.SIGINT:  # the user's Ctrl-C reaches every process of the job
            die(rank, f"interrupted {watch.in_step()} (Ctrl-C) at {watch.where()} {watch.doing()}", 130,
                from_signal=True, label="")
        name = signal.Signals(signum).name
        die(rank, f"{watch.where()}: stopped by {name} {watch.in_step()} (the launcher ends the job, usually "
                  f"because another rank failed or the job was interrupted) {watch.doing()}", 1, from_signal=True)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    worker = threading.Thread(target=body, name=f"slimpipe-rank{rank}", daemon=True)
    worker.start()
    grace = grace_s(opts.timeout)
    while worker.is_alive():
        worker.join(0.25)
        if watch.overdue(grace):
            die(rank, f"{watch.where()}: timed out after {opts.timeout:g} s (+{grace:g} s grace) {watch.doing()}; "
                      "the blocking call ignored its timeout" + end_stopped_peers(procs, rank), 1)
    return result[0] if result else 1
