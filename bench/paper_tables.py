"""Paper tables from the passes: our predicted memory and throughput beside the published figures.

- Seq1F1B throughput (TFLOPS per GPU, 7B on 32 A100s, 8 micro-batches, 64K and 128K context):
  1F1B 107.5, 1F1B-I 120.0, Seq1F1B 124.6 at 64K; Seq1F1B 136.7 at 128K (both 1F1B variants OOM).
- Seq1F1B memory table and the SlimPipe artifact row: from bench/memory.py (same models/layouts).
Writes bench/results/paper_tables.json and two PNG pictures; prints JSON.

    PYTHONPATH=. python bench/paper_tables.py
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.memory import MODELS, artifact, seq1f1b_table  # noqa: E402
from compiler import build_spec, compile_plan  # noqa: E402
from ir import atomic_write  # noqa: E402
from passes.costs import load_profile  # noqa: E402
from passes.partition import flops_partition  # noqa: E402
from passes.simulate import simulate_timed  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results")
GIB = 2 ** 30
# (schedule label, family, v, n) and the published TFLOPS/GPU per context length (None = OOM there)
THROUGHPUT = [("1F1B", "1f1b", 1, 1), ("1F1B-I", "interleaved-1f1b", 2, 1), ("Seq1F1B", "seq1f1b", 1, 4)]
PUBLISHED_TFLOPS = {65536: {"1F1B": 107.5, "1F1B-I": 120.0, "Seq1F1B": 124.6},
                    131072: {"1F1B": None, "1F1B-I": None, "Seq1F1B": 136.7}}


def throughput_table(profile_name: str = "a100") -> list[dict]:
    """Predicted TFLOPS/GPU = MFU x peak, and peak memory, for the 7B runs of the Seq1F1B paper."""
    prof = load_profile(profile_name)
    model, gpus, par = MODELS["7B"]
    rows = []
    for seq, published in PUBLISHED_TFLOPS.items():
        for label, family, v, n in THROUGHPUT:
            extra = dict(tp=par["tp"], dp=par["dp"])
            if n > 1:
                extra.update(partition="flops", slice_lens=tuple(flops_partition(model, seq, n)))
            plan = compile_plan(build_spec(family, model, pp=par["pp"], microbatches=8, slices=n, virtual_stages=v,
                                           seq_len=seq, **extra))
            out = simulate_timed(plan, prof)
            peak = max(r["peak_memory_bytes"] for r in out["ranks"])
            rows.append({"seq_len": seq, "schedule": label, "gpus": gpus, **par, "microbatches": 8, "slices": n,
                         "virtual_stages": v, "ours_tflops_per_gpu": round(out["mfu"] * prof.peak_flops / 1e12, 1),
                         "ours_peak_gib": round(peak / GIB, 1), "ours_oom_at_80": peak > 80 * GIB,
                         "theirs_tflops_per_gpu": published[label] if published[label] is not None else "OOM"})
    return rows


def paired_bar(ax, x, ours, theirs, oom_y, first, ours_color="tab:blue", fontsize=8):
    """Our bar left of x, the published one right of it (or 'OOM' written where it ran out)."""
    ax.bar(x - 0.2, ours, 0.4, color=ours_color, label="slimpipe model" if first else None)
    if theirs == "OOM":
        ax.text(x + 0.2, oom_y, "OOM", rotation=90, ha="center", va="bottom", fontsize=fontsize, color="tab:red")
    else:
        ax.bar(x + 0.2, theirs, 0.4, color="tab:orange", label="Seq1F1B paper" if first else None)


def save(fig, name: str) -> str:
    path = os.path.join(RESULTS, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot(memory_rows, tput_rows) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    labels = ["1F1B", "1F1B-I", "Seq1F1B", "Seq1F1B-I"]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    xs, names = [], []
    for i, row in enumerate(memory_rows):
        for j, lab in enumerate(labels):
            x = i * 5 + j
            paired_bar(ax, x, min(row["ours_gib"][lab], 120), row["theirs_gib"][lab], 82, x == 0, fontsize=7)
            xs.append(x)
            names.append(f"{row['model']} {row['seq_len'] // 1024}K {lab}")
    ax.axhline(80, color="gray", ls="--", lw=1)
    ax.set_xticks(xs, names, rotation=90, fontsize=6)
    ax.set_ylabel("peak GiB per GPU")
    ax.set_title("Seq1F1B memory table: our memory model vs published (80 GiB line; bars capped at 120)")
    ax.legend()
    written.append(save(fig, "paper_memory.png"))
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, row in enumerate(tput_rows):
        paired_bar(ax, i, row["ours_tflops_per_gpu"], row["theirs_tflops_per_gpu"], 5, i == 0,
                   ours_color="tab:red" if row["ours_oom_at_80"] else "tab:blue")
    ax.set_xticks(range(len(tput_rows)), [f"{r['schedule']}\n{r['seq_len'] // 1024}K" for r in tput_rows], fontsize=8)
    ax.set_ylabel("TFLOPS per GPU (A100)")
    ax.set_title("7B on 32 GPUs, 8 micro-batches (red bar: our model predicts OOM)")
    ax.legend()
    written.append(save(fig, "paper_throughput.png"))
    plt.close(fig)
    return written


def main() -> None:
    memory_rows = seq1f1b_table()
    tput = throughput_table()
    res = {"bench": "paper_tables", "device_profile_throughput": "a100", "seq1f1b_throughput_7b": tput,
           "seq1f1b_memory": memory_rows, "slimpipe_artifact": artifact()}
    res["pictures"] = [os.path.relpath(p, ROOT) for p in plot(memory_rows, tput)]
    text = json.dumps(res, indent=1)
    print(text)
    atomic_write(os.path.join(RESULTS, "paper_tables.json"), text + "\n")


if __name__ == "__main__":
    main()
