"""bench/zero_bubble.py on a tiny case (seconds): its rows go through the command line's parser and
compile_plan, a refused configuration keeps its row with the line `slimpipe compile` prints, and the
unit-cost figures it records are the families' closed forms. No timings are asserted."""
from pytest import approx

from bench.zero_bubble import ROWS, run_row, table, unit_times

TINY = dict(case="tiny p=2 m=2", model="tiny", seq_len=128, pp=2, tp=1, microbatches=2, slices=2)


def test_rows_closed_forms_and_refusal():
    rows = {label: run_row(TINY, label, flags) for label, flags in ROWS}
    assert rows["1f1b sliced"]["refused"] == ("slimpipe compile: error: --slices 2: 1f1b does not slice the sequence "
                                              "(allowed: 1); use seq1f1b or slimpipe for sequence slicing")
    p, m, n = 2, 2, 2
    assert rows["1f1b"]["unit_cost"]["bubble_fraction"] == approx((p - 1) / (m + p - 1), rel=1e-12)
    assert rows["zb-v"]["unit_cost"]["bubble_fraction"] == approx((p - 1) / (6 * m + p - 1), rel=1e-12)  # m = p: exact
    # slimpipe with its exchange: the unit-cost figure is the schedule's own, exchanges left out
    assert rows["slimpipe"]["exchange"] and rows["slimpipe"]["unit_cost"]["bubble_fraction"] == approx(
        (p - 1) / (m * n + p - 1), rel=1e-12)
    assert rows["zb-v sliced"]["split_backward"] and not rows["seq1f1b flops"]["split_backward"]
    split, plain = rows["slimpipe split-backward no-exchange"], rows["slimpipe no-exchange"]
    assert split["split_backward"] and not split["exchange"] and not plain["split_backward"]
    assert rows["zb-v"]["command"].startswith("slimpipe compile --model tiny --seq-len 128 --pp 2 --tp 1 "
                                              "--microbatches 2 --schedule zb-v --device-profile h100")
    for r in rows.values():
        if "refused" not in r:
            assert r["peak_memory_gib"] == max(r["peak_memory_gib_per_rank"])
    md = table({"device_profile": "h100", "cases": [{**TINY, "rows": list(rows.values()),
                                                          "unit_times": unit_times(TINY)}]})
    assert "| 1f1b sliced | refused (1) |" in md and "(1) `slimpipe compile: error: --slices 2: 1f1b does not" in md
    assert md.count("| tiny 128 tokens | ") == 3  # F, I, W of the whole sequence, the first and the last slice
