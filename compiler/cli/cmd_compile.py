"""slimpipe compile: spec -> plan.json."""
from __future__ import annotations

from ir import SpecError
from passes.costs import load_profile
from passes.partition import flops_partition

from .. import compile_plan, schedules
from ..layout import build_spec, check_cp, check_tp, split_layers
from ..models import DEFAULT_SEQ, PRESETS, check_window, resolve_model
from .common import add_parser, add_plan_format_arg, check_output_path, emit_json, exchanges_phrase, nonneg_int, positive_int, save_plan

MODEL_FLAGS = ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab")


def add_model_args(p) -> None:
    """--model and the dimension overrides (shared with other commands that take a model)."""
    p.add_argument("--model", default="tiny", help=f"preset ({', '.join(PRESETS)}) or a Hugging Face config.json path (default tiny)")
    p.add_argument("--seq-len", type=positive_int, help="tokens per sequence (default 128 for tiny, 4096 otherwise)")
    for f in MODEL_FLAGS:
        p.add_argument("--" + f.replace("_", "-"), type=positive_int, help=f"override the model's {f}")


def model_from_args(args, window: bool = True):
    """The model and sequence length of the flags; `window`: refuse a sequence longer than the
    model's attention window (profile, which picks its own lengths, does not ask)."""
    model = resolve_model(args.model, {f: getattr(args, f) for f in MODEL_FLAGS})
    seq = args.seq_len if args.seq_len is not None else DEFAULT_SEQ.get(args.model, 4096)
    if window:
        check_window(args.model, model, seq, args.seq_len is not None)
    return model, seq


def add_shape_args(p, schedule_required: bool = True) -> None:
    p.add_argument("--schedule", required=schedule_required, help=f"one of: {', '.join(schedules.FAMILIES)}")
    p.add_argument("--pp", type=positive_int, required=True, help="pipeline ranks p")
    p.add_argument("--microbatches", type=positive_int, required=True, help="micro-batches m per step")
    p.add_argument("--slices", type=positive_int, default=1, help="sequence slices n per micro-batch (default 1)")
    p.add_argument("--virtual-stages", type=positive_int, default=None,
                   help="model chunks v per rank (default 1; 2 for zb-v)")
    p.add_argument("--placement", default=None,
                   help="stages of each rank: plain (v = 1), looping (chunk c of rank r is stage c*p + r) or v "
                        "(chunk 0 is stage r, chunk 1 stage 2p-1-r); default: the schedule's (v for zb-v, else looping)")
    p.add_argument("--split-backward", action="store_true", default=False,
                   help="split each unit's backward into I (input gradient) and W (weight gradient, deferred into "
                        "the gaps); for " + ", ".join(f.name for f in schedules.FAMILIES.values() if f.split_option)
                        + " (the zero-bubble families always split)")
    p.add_argument("--micro-batch-size", type=positive_int, default=1, help="sequences per micro-batch (default 1)")
    p.add_argument("--seed", type=int, default=0, help="initialisation and data seed the executor uses (default 0)")


def add_pass_args(p) -> None:
    """Pass options: the KV exchange (SlimPipe's attention context exchange)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--exchange", dest="exchange", action="store_true", default=None,
                   help="pair concurrent units for the KV exchange (default: on for "
                        + ", ".join(f.name for f in schedules.FAMILIES.values() if f.default_exchange)
                        + ", off for the others; "
                        "any family with --slices >= 2 may ask for it). The plan keeps only exchanges that make "
                        "it faster in the cost model of --device-profile; on a model too small to level, an "
                        "explicit --exchange keeps the unit-cost pairing")
    g.add_argument("--no-exchange", dest="exchange", action="store_false", help="no KV exchange")
    p.add_argument("--exchange-threshold", type=nonneg_int, default=0,
                   help="cap on the slices shipped per exchange (0 = no cap; default 0)")
    p.add_argument("--device-profile", help="device the exchange pairing costs units with: h100 (default), a100, "
                                            "or a JSON file with every DeviceProfile field")


def add_parallel_args(p) -> None:
    p.add_argument("--partition", default="uniform",
                   help="slice lengths: uniform (S/n each) or flops (Seq1F1B's equal forward FLOPs per slice)")
    p.add_argument("--tp", type=positive_int, default=1, help="tensor parallel degree (cost model only; default 1)")
    p.add_argument("--cp", type=positive_int, default=1, help="context parallel degree (cost model only; default 1)")
    p.add_argument("--dp", type=positive_int, default=1,
                   help="data parallel degree (pipeline replicas: the executor runs pp x dp processes; default 1)")
    p.add_argument("--layer-split", default="uniform",
                   help="decoder layers per stage: uniform (even; the first stages take the extra layers) or "
                        "balanced (minimise the slowest stage under the cost model of --device-profile, embedding, "
                        "LM head and loss included; a stage may hold fewer layers). Default uniform")


def parallel_from_args(args, model, seq: int) -> dict:
    """tp/cp/dp and the slice lengths of --partition, validated."""
    check_tp(args.tp, model)
    out = {"tp": args.tp, "cp": args.cp, "dp": args.dp}
    if args.partition == "flops":
        if args.slices < 2:
            raise SpecError(f"--partition flops needs --slices >= 2 (got {args.slices})")
        check_cp(args.cp, seq)
        out.update(partition="flops", slice_lens=tuple(flops_partition(model, seq, args.slices, cp=args.cp)))
    elif args.partition != "uniform":
        raise SpecError(f"--partition {args.partition!r} is unknown; allowed: uniform, flops")
    else:
        check_cp(args.cp, seq, args.slices)
    return out


def exchange_from_args(args) -> bool:
    on = args.exchange
    if on is None:
        on = schedules.get(args.schedule).exchange_default(args.slices)
    if args.exchange_threshold and not on:
        raise SpecError(f"--exchange-threshold {args.exchange_threshold} caps the KV exchange, which this plan does not "
                        f"run; drop it or add --exchange")
    if args.exchange is None:
        return on
    if args.exchange and args.slices < 2:
        raise SpecError(f"--exchange needs sequence slices (--slices >= 2, got {args.slices}); "
                        f"drop --exchange or slice the sequence")
    return args.exchange


def spec_from_args(args):
    family = schedules.get(args.schedule)  # unknown schedule: fail first, with the list of names
    if args.virtual_stages is None:
        args.virtual_stages = family.default_virtual
    model, seq = model_from_args(args)
    extra = {}
    if getattr(args, "placement", None) is not None:
        extra["placement"] = args.placement
    if getattr(args, "split_backward", False):
        extra["split_backward"] = True
    if hasattr(args, "exchange"):
        extra.update(exchange=exchange_from_args(args), exchange_threshold=args.exchange_threshold)
    if hasattr(args, "partition"):
        extra.update(parallel_from_args(args, model, seq))
    if hasattr(args, "layer_split"):
        extra.update(layer_split_kind=args.layer_split, profile=getattr(args, "device_profile", None))
    return build_spec(args.schedule, model, pp=args.pp, microbatches=args.microbatches, slices=args.slices,
                      virtual_stages=args.virtual_stages, seq_len=seq, micro_batch_size=args.micro_batch_size,
                      seed=args.seed, **extra)


def run(args) -> int:
    check_output_path(args.output)
    profile = load_profile(args.device_profile)  # validated before any work: exit 2, one line
    spec = spec_from_args(args)
    # an explicit --exchange keeps the pairing on a toy model; the default lets the cost model drop it
    plan = compile_plan(spec, profile, keep_pairing=args.exchange is True)
    save_plan(plan, args.output, args.plan_format)
    summary = {"output": args.output, "schedule": spec.schedule, "pp": spec.pp, "microbatches": spec.microbatches,
               "slices": spec.slices, "virtual_stages": spec.virtual_stages, "split_backward": spec.split_backward,
               "partition": spec.partition,
               "slice_lens": list(spec.slice_lens[0]), "layer_split": spec.layer_split,
               "stage_layers": list(spec.stage_layers), "tp": spec.tp, "cp": spec.cp, "dp": spec.dp, "exchange": spec.exchange,
               "exchanges": plan.meta.get("exchanges", 0), "device_profile": plan.meta.get("device_profile"),
               "instructions": plan.num_instructions()}
    if args.json:
        emit_json(summary)
    else:
        print(f"wrote {args.output}: {spec.schedule} p={spec.pp} m={spec.microbatches} n={spec.slices} "
              f"v={spec.virtual_stages}{', split backward' if spec.split_backward else ''}, model {spec.model.name} ({spec.model.layers} layers"
              f"{_split_note(spec)}), seq {spec.seq_len}, "
              f"{summary['instructions']} instructions"
              + (f", {exchanges_phrase(summary['exchanges'])}" if spec.exchange else "")
              + (f" (none is faster on {summary['device_profile']} in the cost model)"
                 if spec.exchange and not summary["exchanges"] else ""))
    return 0


def _split_note(spec) -> str:
    """'; balanced split, layers per stage 5 x2, 4 x5, 2' for a split other than uniform."""
    if spec.layer_split == "uniform":
        return ""
    runs: list[list[int]] = []
    for x in spec.stage_layers:
        if runs and runs[-1][0] == x:
            runs[-1][1] += 1
        else:
            runs.append([x, 1])
    same = spec.layer_split == "balanced" and tuple(spec.stage_layers) == split_layers(spec.model.layers, len(spec.stage_layers))
    return (f"; {spec.layer_split} split, layers per stage " + ", ".join(f"{x} x{k}" if k > 1 else f"{x}" for x, k in runs)
            + (" (the uniform split's)" if same else ""))


def register(sub) -> None:
    p = add_parser(sub, "compile", "compile a schedule into per-rank instruction streams (plan.json)",
                   "slimpipe compile --schedule slimpipe --pp 4 --microbatches 4 --slices 4 --model tiny -o plan.json")
    add_shape_args(p)
    add_model_args(p)
    add_pass_args(p)
    add_parallel_args(p)
    p.add_argument("-o", "--output", required=True, help="plan file to write (written atomically)")
    add_plan_format_arg(p)
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(run=run)
