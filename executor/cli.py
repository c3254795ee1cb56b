"""Command line of the executor. Plan and launch are checked before any communication: an unusable
plan or launch prints one line on every rank and exits 2, a plan that breaks a rule or deadlocks
exits 1 (the same checks as `slimpipe check`). At run time every wait is bounded by --timeout, and
a failure ends every rank non-zero with one line each (see runner.py, faults.py)."""
from __future__ import annotations

import argparse
import os
import sys

import ir
from ir.options import (glue_negative_values, nonneg_float, nonneg_int, positive_float, positive_int, reopen_closed_streams,
                        thread_count, timeout_seconds)

from ir.version import version

from .faults import FAULT_HELP, fault_from_env, line, write_line

EPILOG = """examples:
  torchrun --nproc-per-node 4 -m executor plan.json --check-reference
  python -m executor plan.json --local --steps 3 --json
  python -m executor plan.json --check-only

failures: every wait (a message from a peer rank, a step-end collective, joining and leaving the
process group) gives up after --timeout seconds. A failing rank prints one line, e.g.
  executor: rank 2: error: rank 2 #17 'F mb3 s1 c0': RuntimeError: ...
and exits 1; the others print whom they were waiting for and exit 1; torchrun exits non-zero.
SLIMPIPE_TRACEBACK=1 adds the Python traceback.

""" + FAULT_HELP


def load_plan(path: str, check: bool = True):
    """Read a plan and prove it runnable: ir.SlimpipeError with a one-line message otherwise
    (exit_code 2: unusable file; 1: breaks a rule or deadlocks, like `slimpipe check`). Checking
    first means a wrong plan fails here, on every rank, instead of hanging until the timeout.
    Without `check` (--no-check) the spec's executability rules still run: they cost nothing."""
    from passes import executor_problems, require_valid, spec_problems

    if path.lower().endswith(".csv"):
        raise ir.PlanFormatError(f"{path!r} is a torch schedule CSV, not a plan: import it first "
                                 f"(`slimpipe import {path} -o plan.json`), then run plan.json")
    plan = ir.load(path)
    for problem in executor_problems(plan):  # kinds without a handler here (ir.KINDS column `executor`)
        raise ir.PlanInvalidError(f"plan cannot be run, not run: {problem}")
    if check:
        require_valid(plan, "not run", path)
    else:
        for problem in spec_problems(plan.spec):
            raise ir.PlanInvalidError(f"plan cannot be run, not run: {problem}")
    return plan


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are the executor's one line (exit 2), not a usage block."""

    def error(self, message: str):
        write_line(line(os.environ.get("RANK"), f"{message} (see python -m executor --help)"))
        self.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m executor", description="Run a slimpipe plan: one interpreter per "
                                "pipeline rank (torchrun), or every rank in this process (--local).",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"slimpipe executor {version()}")
    p.add_argument("plan", help="plan.json written by `slimpipe compile` (or by hand)")
    p.add_argument("--local", action="store_true", help="run all ranks in this process (threads, in-process transport)")
    p.add_argument("--steps", type=positive_int, default=1, help="training steps (default 1)")
    p.add_argument("--json", action="store_true", help="last line on rank 0: a JSON summary (progress goes to stderr)")
    p.add_argument("--check-reference", action="store_true",
                   help="compare loss and gradients of step 1 with the unsliced single-process model; exit 1 if > 1e-4 (in bf16/fp16 or with --autocast: 1e-4 + 2x what that precision costs the unsliced model itself)")
    p.add_argument("--attention", choices=["auto", "sdpa", "flash", "math"], default="auto",
                   help="attention backend (auto: flash-attn on CUDA when importable, else torch SDPA)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda if available")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="parameter/activation dtype (default fp32, exact for --check-reference; `slimpipe simulate` "
                        "models bf16 unless given --dtype fp32 or a profile measured in fp32)")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--autocast", action="store_true",
                   help="bf16 autocast (mixed precision): fp32 parameters, optimizer and residual stream (with the "
                        "default --dtype fp32), matmuls and attention in bf16; meant for CUDA (works on CPU, slowly)")
    t = p.add_argument_group("training schedule (defaults: constant --lr, no clipping)")
    t.add_argument("--warmup", type=nonneg_int, default=0, help="linear learning-rate warm-up over this many steps")
    t.add_argument("--lr-decay", choices=["constant", "cosine"], default="constant",
                   help="after warm-up: constant, or cosine decay to --min-lr at --decay-steps")
    t.add_argument("--decay-steps", type=positive_int, default=None,
                   help="step at which the cosine reaches --min-lr (default: --steps)")
    t.add_argument("--min-lr", type=nonneg_float, default=0.0, help="learning rate at the end of the decay (default 0)")
    t.add_argument("--clip", type=nonneg_float, default=0.0,
                   help="clip gradients to this global norm (over all pipeline and data-parallel ranks); 0: off")
    p.add_argument("--timeout", type=timeout_seconds, default=300.0,
                   help="seconds any single wait may take (default 300: it covers the peer's compute between two "
                        "messages, the reference check and a slow NCCL start; not the step)")
    p.add_argument("--p2p-match", choices=["auto", "order", "tag"], default="auto",
                   help="how a receive finds its message: order (per rank pair in posting order, tags ignored, as NCCL "
                        "does), tag (as gloo does); auto (default): order on CUDA, tag on CPU. order on CPU emulates NCCL")
    p.add_argument("--p2p-wait", choices=["auto", "direct", "watcher"], default="auto",
                   help="how a rank blocks on a gloo message: direct (its own thread waits the message), watcher (a "
                        "thread per peer waits it and wakes the rank, which serves KV-exchange requests meanwhile); "
                        "auto (default): direct unless the plan has KV exchanges. No effect on CUDA")
    p.add_argument("--post-ahead", type=post_ahead, default=None, metavar="UNITS|all",
                   help="on gloo under torchrun, post each receive this many compute units before the instruction "
                        "that takes it; all (default): when the run of compute units and sends/receives it belongs "
                        "to starts (an OPT or a KV-exchange instruction ends a run). A receive posted after its send "
                        "stalls the receiver while the busy sender's gloo thread pushes the data "
                        "(bench/results/post_ahead.json); a receive posted early holds its buffer from then. 0: at "
                        "the receive. No effect with --local, --p2p-match order or on CUDA")
    p.add_argument("--malloc-arenas", type=nonneg_int, default=1, metavar="N",
                   help="on glibc, at most N malloc arenas for the rank's threads (default 1: one heap, so peak RSS "
                        "repeats from run to run; with an arena per thread it jumped by 30-350 MiB in some runs); "
                        "0: the C library's default")
    p.add_argument("--threads", type=thread_count, default=1, help="torch CPU threads with --local (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-step lines")
    p.add_argument("--trace", metavar="FILE.json",
                   help="write a Chrome/Perfetto trace of what ran: one event per executed instruction per rank and "
                        "step, named like `slimpipe trace`'s (compare: slimpipe simulate plan.json --against FILE.json)")
    c = p.add_argument_group("checkpoints and logs")
    c.add_argument("--save", metavar="DIR", help="save parameters and optimizer state (torch.distributed.checkpoint) "
                   "to DIR/step-NNNNNN after the last step (and every --save-every steps)")
    c.add_argument("--save-every", type=positive_int, default=None, metavar="K", help="also save every K steps")
    c.add_argument("--resume", metavar="DIR", help="continue from a checkpoint: a step-NNNNNN directory or a --save "
                   "directory (its latest complete step); --steps stays the total number of steps")
    c.add_argument("--metrics", metavar="FILE", help="append one JSON object per step (loss, step_s, tokens_per_s, "
                   "peak_mem_mib, lr, grad_norm) to FILE, e.g. metrics.jsonl (rank 0). Not --log: torchrun would take that "
                   "for an abbreviation of its own --log-dir")
    p.add_argument("--check-only", action="store_true", help="load and check the plan (and SLIMPIPE_FAULT), run nothing")
    p.add_argument("--hf-model", metavar="DIR", default=None,
                   help="start from a Hugging Face Llama/Mistral/Qwen2/Qwen3 directory (config.json + safetensors); "
                        "its config must be the plan's model (compile with --model DIR/config.json); each rank reads "
                        "only its own layers. With --check-reference the reference is transformers' own model")
    p.add_argument("--export-hf", metavar="DIR", default=None,
                   help="after the last step write the weights as a Hugging Face directory (from_pretrained loads it)")
    p.add_argument("--data", metavar="PATH", default=None,
                   help="train on a token file (.bin uint16/uint32 as nanoGPT/Megatron write them, .npy) or text "
                        "(.txt/.jsonl with --tokenizer); default: synthetic tokens. Order: see executor/data.py")
    p.add_argument("--tokenizer", metavar="FILE", default=None, help="tokenizer.json (tokenizers library) for text --data")
    p.add_argument("--shuffle-seed", type=int, default=None,
                   help="visit the --data windows in a seeded random order per epoch (default: file order)")
    p.add_argument("--data-dtype", choices=["uint16", "uint32"], default=None,
                   help=".bin token width (default: from Megatron's .idx, else uint16 if the vocabulary fits)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the plan check before running (huge plans; a wrong plan then fails at run time). Without "
                        "it, a plan file whose bytes `slimpipe check` proved is not proved again (SLIMPIPE_NO_CACHE=1: "
                        "always proved)")
    return p


def post_ahead(text: str) -> int | None:
    """--post-ahead: an integer >= 0, or all (None: no bound)."""
    if text == "all":
        return None
    try:
        return nonneg_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; give an integer from 0 to 2147483647, or all") from None


def options(**overrides) -> argparse.Namespace:
    """The executor's options at their command-line defaults, with `overrides`: for running a Plan
    object from Python (runner.run_local / run_rank) exactly as the command line would."""
    ns = build_parser().parse_args(["<plan>"])
    for key, value in overrides.items():
        if not hasattr(ns, key):
            raise TypeError(f"unknown executor option {key!r}")
        setattr(ns, key, value)
    return ns


def ignored_parallelism(plan) -> str:
    """A note when the plan asks for tp/cp > 1, which this executor does not run (yet): the plan
    still runs, as pipeline (x data) parallelism; '' when there is nothing to say."""
    spec = plan.spec
    extra = [f"{k}={getattr(spec, k)}" for k in ("tp", "cp") if getattr(spec, k) > 1]
    if not extra:
        return ""
    return (f"plan has {' '.join(extra)}; this executor runs pipeline parallelism only, so it runs on "
            f"pp={spec.pp} processes with {', '.join(e.split('=')[0] for e in extra)} ignored (the cost model "
            f"in `slimpipe simulate` still prices them)")


def prepare_inputs(plan, opts) -> None:
    """Check --hf-model, --export-hf and --data before any rank starts (a SpecError, exit 2, on
    every rank alike, so none waits for another): the checkpoint's config is the plan's model and
    its shards exist, the data's ids fit the vocabulary. The opened data goes to opts.data_source."""
    from .data import make_source

    if opts.hf_model is not None:
        from .hf import Checkpoint, check_matches

        check_matches(plan.spec, opts.hf_model)
        Checkpoint(opts.hf_model)
    if opts.export_hf is not None:
        from .hf import _need_libs, check_export_dir

        _need_libs("--export-hf")
        check_export_dir(opts.export_hf)
    opts.data_source = make_source(plan.spec, opts.data, 1, opts.tokenizer, opts.shuffle_seed, opts.data_dtype)
def replicas_mismatch(spec, world: int) -> str:
    """'' if `world` processes can run the plan: pp x dp with the plan's dp, or any multiple of pp
    when the plan says dp=1 (then WORLD_SIZE / pp replicas); else the one-line reason."""
    p, dp = spec.pp, spec.dp
    if dp > 1 and world != p * dp:
        return (f"plan has pp={p} x dp={dp} = {p * dp} ranks but torchrun started {world} process(es); "
                f"launch with --nproc-per-node {p * dp} (over all nodes)")
    if world % p:
        return (f"plan has pp={p} ranks but torchrun started {world} process(es); "
                f"launch with --nproc-per-node {p}")
    return ""


def _numpy() -> bool:
    try:
        import numpy  # noqa: F401
    except ImportError:
        return False
    return True


def check_files(opts, plan) -> str:
    """'' or the one line saying why --resume/--save/--metrics cannot be used (before any rank starts),
    or why SLIMPIPE_FAULT names a step that --resume skips."""
    from .checkpoint import CheckpointError, find

    if opts.autocast and opts.dtype != "fp32":
        return f"--autocast with --dtype {opts.dtype}: autocast keeps parameters in fp32 and computes in bf16; use --dtype fp32"
    if opts.save_every and not opts.save:
        return f"--save-every {opts.save_every} needs --save DIR"
    if opts.lr_decay != "cosine" and (opts.decay_steps is not None or opts.min_lr):
        given = "--decay-steps" if opts.decay_steps is not None else f"--min-lr {opts.min_lr:g}"
        return f"{given} shapes the cosine decay, which is off: add --lr-decay cosine (or drop it)"
    if opts.lr_decay == "cosine" and opts.min_lr > opts.lr:
        return f"--min-lr {opts.min_lr:g} is above --lr {opts.lr:g}: the decay ends at --min-lr, so it must be <= --lr"
    if opts.data_dtype is not None and not opts.data:
        return f"--data-dtype {opts.data_dtype} is the width of a --data token file: add --data PATH (or drop it)"
    if opts.p2p_wait == "direct" and plan.has_kv_exchanges():
        return ("--p2p-wait direct: the plan has KV exchanges, whose ranks serve requests while they wait; "
                "use --p2p-wait auto or watcher")
    if (opts.save or opts.resume) and os.environ.get("WORLD_SIZE", "1") != "1" and not _numpy():
        return ("--save/--resume under torchrun need NumPy (torch.distributed.checkpoint's object collectives): "
                "pip install 'slimpipe[train]'")
    if opts.resume:
        try:
            _, meta = find(opts.resume, plan.spec, opts.steps)
            fault_from_env(plan, opts.steps, first=meta["step"])  # a fault in a step before the resumed one
        except (CheckpointError, ir.SpecError) as e:
            return str(e)
    if opts.save:
        if os.path.exists(opts.save) and not os.path.isdir(opts.save):
            return f"--save {opts.save}: exists and is not a directory"
        up = os.path.abspath(opts.save)
        while not os.path.exists(up):  # created at the first save; its nearest existing parent must be writable
            up = os.path.dirname(up)
        if not os.path.isdir(up) or not os.access(up, os.W_OK):
            return f"--save {opts.save}: cannot be created ({up} is not a writable directory)"
    if opts.metrics:
        parent = os.path.dirname(os.path.abspath(opts.metrics))
        if os.path.isdir(opts.metrics) or not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            return f"--metrics {opts.metrics}: not a writable file path (its directory must exist)"
    return ""


def nccl_note(plan) -> str | None:
    """What to say before a CUDA (NCCL) run of a checked plan that has a wait cycle when sends block
    until their receive is posted, as NCCL's large messages do (`slimpipe check --p2p rendezvous`);
    None when it has none. A note, not a refusal: small messages go eagerly and such plans may finish."""
    from passes import rendezvous_cycle

    cycle = rendezvous_cycle(plan)
    return None if cycle is None else (f"NCCL can hang on this plan with large messages (sends that block until "
                                       f"their receive is posted): {cycle}")


def pick_attention(opts, plan, dist: bool) -> None:
    """Choose and self-test the --attention backend once, before any rank starts, into
    opts.attention_backend (run_rank takes it from there): a choice this machine cannot honour
    (flash without CUDA or without flash_attn, a failed self-test) is one line, exit 2
    (errors.BackendUnavailable), instead of one line per in-process rank. Under torchrun each
    process decides for its own GPU, since nodes may differ in what they have installed."""
    from .device import choose_backend, process_device

    device = process_device(opts, dist, int(os.environ.get("RANK", "0")))  # the GPU its rank will take
    opts.attention_backend = choose_backend(opts, device, plan.spec.model.head_dim)


def _fail(msg: str, code: int = 2) -> int:
    write_line(line(os.environ.get("RANK"), msg))
    return code


def main(argv=None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before the ranks start (loading, checking, importing torch)
        write_line("executor: interrupted before the first step (Ctrl-C)")
        return 130


def exit_process(code: int):
    """End a torchrun worker process at once, once its output is flushed: torch's C++ static
    destructors at a normal exit() destroy a thread still joinable about 1 run in 20-40 on a loaded
    machine and abort ('terminate called without an active exception', SIGABRT after 'reference
    check ok'; faulthandler shows no Python frame left: the interpreter had finished). Call it
    only when the run is over: process groups destroyed, files written and closed. Issue 15.5."""
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:  # noqa: BLE001 - a closed pipe: nothing more to say
            pass
    os._exit(code)


def entry(argv=None) -> None:
    """The process entry point (`python -m executor`): run main, then end the process with
    exit_process, except for a failing run under torchrun, which exits normally (it fails either
    way, and the normal exit leaves its peers the moment they need to print their own line before
    torchrun stops them). An in-process run (--local) that was interrupted (Ctrl-C) aborted at exit
    the same way (CI, 1 of 783 tests). A process started with stdout or stderr closed writes that
    stream to /dev/null (Python leaves sys.stdout None there, and the first print would fail)."""
    reopen_closed_streams()
    code = main(argv)
    if code != 0 and os.environ.get("WORLD_SIZE") is not None:
        if code == 2 and not _GROUP_STARTED:
            wait_for_peers_to_refuse(int(os.environ["WORLD_SIZE"]))
        sys.exit(code)
    exit_process(code)


_GROUP_STARTED = False  # set once this rank goes on to join the process group (runner.run_dist)


def wait_for_peers_to_refuse(world: int, limit_s: float = 10.0) -> None:
    """A rank that refused its inputs under torchrun (before any process group) waits until every
    rank has refused, so that each prints its own line: the first to exit makes torchrun SIGTERM
    the rest, and a rank still reading a checkpoint then said nothing (CI, 1 run of many). Counts
    on torchrun's agent store (TORCHELASTIC_USE_AGENT_STORE=True, at MASTER_ADDR:MASTER_PORT); a
    launch without that agent, or a peer that does not refuse (it waits in init_process_group),
    costs at most limit_s seconds. Shape: world = WORLD_SIZE ranks; units: seconds."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or world <= 1:
        return
    import time
    from datetime import timedelta

    try:
        from torch.distributed import TCPStore

        store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size=world,
                         is_master=False, timeout=timedelta(seconds=limit_s))
        key = "slimpipe/refused/" + os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        end = time.monotonic() + limit_s
        n = store.add(key, 1)
        while n < world and time.monotonic() < end:
            time.sleep(0.05)
            n = store.add(key, 0)
    except (RuntimeError, OSError, KeyError, ValueError):  # no store to count on: exit as before
        return


def _main(argv=None) -> int:
    global _GROUP_STARTED
    opts = build_parser().parse_args(glue_negative_values(argv))
    if opts.trace:
        d = os.path.dirname(os.path.abspath(opts.trace))
        if not os.path.isdir(d) or os.path.isdir(opts.trace):
            return _fail(f"--trace {opts.trace!r}: " + (f"{opts.trace!r} is a directory" if os.path.isdir(opts.trace)
                         else f"directory {d!r} does not exist") + "; give a file path such as measured.json")
    try:
        plan = load_plan(opts.plan, check=not opts.no_check)
        fault_from_env(plan, opts.steps)
    except ir.SlimpipeError as e:
        return _fail(str(e), e.exit_code)
    try:
        prepare_inputs(plan, opts)
    except ir.SlimpipeError as e:
        return _fail(str(e), e.exit_code)
    ignored = ignored_parallelism(plan)
    if ignored and os.environ.get("RANK", "0") == "0":
        write_line(f"executor: note: {ignored}")
    bad = check_files(opts, plan)
    if bad:
        return _fail(bad)
    if opts.check_only:
        print(f"plan ok: {plan.spec.schedule}, pp={plan.spec.pp}, "
              f"{sum(len(r) for r in plan.ranks)} instructions", flush=True)
        return 0
    from .metrics import limit_malloc_arenas

    limit_malloc_arenas(opts.malloc_arenas)  # before torch, gloo or the runner start a thread
    import torch

    if opts.device == "auto":
        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    if opts.device == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda but no CUDA device is available")
    # rank 0 speaks for all: the others need not replay the plan again
    note = nccl_note(plan) if opts.device == "cuda" and not opts.no_check and os.environ.get("RANK", "0") == "0" \
        else None
    if note:
        write_line(f"executor: note: {note}")
    p = plan.spec.pp
    world = os.environ.get("WORLD_SIZE")
    from . import runner

    try:
        if opts.local or world is None:
            n = p * plan.spec.dp
            if world is not None and int(world) > 1:
                return _fail(f"--local runs all {n} ranks in one process; do not start it under torchrun with {world} processes")
            if not opts.local and n > 1:
                return _fail(f"plan has pp={p} x dp={plan.spec.dp} ranks: launch with `torchrun --nproc-per-node {n} "
                             f"-m executor ...` or pass --local")
            pick_attention(opts, plan, dist=False)
            code, _ = runner.run_local(plan, opts)
            if runner.abandoned_threads():  # a rank still busy after a failure: do not wait for it
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
            return code
        bad = replicas_mismatch(plan.spec, int(world))
        if bad:
            return _fail(bad)
        pick_attention(opts, plan, dist=True)
        _GROUP_STARTED = True
        return runner.run_dist(plan, opts)
    except ir.SlimpipeError as e:  # e.g. errors.BackendUnavailable (exit 2)
        return _fail(str(e), e.exit_code)
