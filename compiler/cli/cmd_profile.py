"""slimpipe profile: measure this machine with the executor's own kernels; write a device profile.

The measuring runs in a subprocess, `python -m executor.profile`: the executor owns the kernels
it times (and the p2p test needs processes of its own), while the command line and the compiler
stay free of torch at import; the two meet at the profile JSON, as they meet at the plan JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from ir import SpecError
from passes.costs import load_profile

from .cmd_compile import add_model_args, model_from_args
from .common import add_parser, check_output_path, positive_int, report


def run(args) -> int:
    check_output_path(args.output)
    if args.name is not None and not args.name.strip():
        raise SpecError("--name must not be empty (it names the profile in simulate's output)")
    if not args.scale > 0:
        raise SpecError(f"--scale {args.scale:g} must be > 0 (1 = about a minute)")
    model, _ = model_from_args(args, window=False)  # it measures lengths of its own choosing
    cmd = [sys.executable, "-m", "executor.profile", "--model", model.model_dump_json(), "--device", args.device,
           "--dtype", args.dtype, "--scale", str(args.scale), "-o", args.output, "--prog", "slimpipe profile"]
    if args.name:
        cmd += ["--name", args.name]
    if args.rounds is not None:
        cmd += ["--rounds", str(args.rounds)]
    if args.quiet or args.json:
        cmd.append("--quiet")
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    code = subprocess.call(cmd, env=env)
    if code == 2:  # executor.profile refused an option and said why in one line
        return 2
    if code:
        print(f"slimpipe profile: error: the measurement failed (exit {code}); {args.output} not written", file=sys.stderr)
        return 1
    prof = load_profile(args.output)  # what --device-profile will read: check it loads
    m = prof.measured
    summary = {"output": args.output, "name": prof.name, "device": args.device, "model": model.name,
               "matmul_peak_flops": prof.peak_flops, "attention_flops": prof.peak_flops * prof.attn_efficiency,
               "p2p_bandwidth": prof.p2p_bandwidth, "p2p_latency": prof.p2p_latency,
               "processors": m.processors, "seconds": m.meta.get("seconds"),
               "round_speed": m.meta.get("round_speed")}
    code = report(args, summary,
                  f"wrote {args.output} ({model.name} shapes on {args.device}): matmul up to "
                  f"{prof.peak_flops / 1e9:.3g} GFLOP/s, attention {summary['attention_flops'] / 1e9:.3g} GFLOP/s, "
                  f"p2p {prof.p2p_bandwidth / 1e6:.3g} MB/s + {prof.p2p_latency * 1e6:.0f} us, "
                  f"{m.processors or 'a device per rank'} processors; use --device-profile {args.output}")
    moved = speed_moved(m.meta.get("round_speed") or {})
    if moved and not args.json:
        print(f"note: this machine's speed moved between the profile's rounds ({moved}); each figure is a median "
              f"over them, which a second profile may not repeat: profile again on a quieter machine, or compare two")
    return code


def speed_moved(speed: dict, limit: float = 0.10) -> str:
    """'' when every round ran within `limit` of the median speed, else a phrase naming the spread
    (speed: {"matmul": [per-round seconds / median], "unit": [...]}, as executor.profile writes)."""
    parts = []
    for what, xs in speed.items():
        if xs and max(abs(x - 1.0) for x in xs) > limit:
            parts.append(f"{what} rounds took {min(xs):.2f}-{max(xs):.2f}x their median")
    return "; ".join(parts)


def register(sub) -> None:
    p = add_parser(sub, "profile", "measure this machine with the executor's kernels (matmul, attention, elementwise, "
                   "p2p, memory) and write a device profile for --device-profile (about a minute)",
                   "slimpipe profile --model tiny -o cpu.json && slimpipe simulate plan.json --device-profile cpu.json")
    add_model_args(p)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="what to measure (default cpu)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="kernel dtype (default fp32)")
    p.add_argument("--scale", type=float, default=1.0, help="repetitions relative to the default (0.2: quick, noisier)")
    p.add_argument("--rounds", type=positive_int,
                   help="rounds each figure's runs are spread over, its median taken over all (default 4; a "
                        "machine's speed can move in second-long phases)")
    p.add_argument("--name", help="profile name (default measured-<device>)")
    p.add_argument("-o", "--output", default="profile.json", help="profile to write (default profile.json)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(run=run)
