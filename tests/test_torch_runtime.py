"""Plans exported from slimpipe (1f1b, interleaved-1f1b, zb-v with its I and W) run in
torch.distributed.pipelining's own runtime (_PipelineScheduleRuntime loading our CSV,
PipelineStages built from the executor's model) under torchrun/gloo at p=2 and p=4, with loss and
gradients equal to our executor's on the same plan."""
import json

import pytest

import ir
from compiler import build_spec, compile_plan, resolve_model
from compiler.torchcsv import export_csv, from_rows, torch_order
from ir.torchfmt import parse_action
from tests.test_executor_runs import torchrun

TOL = 1e-5
PLANS = {  # name -> (family, m, v) at each p
    "1f1b": ("1f1b", 4, 1),
    "interleaved-1f1b": ("interleaved-1f1b", 8, 2),
    "zb-v": ("zb-v", 4, 2),
}


def v_shape_gpipe(p, m):
    """A V-placement schedule (rank r holds stages r and 2p-1-r, as ZB-V and DualPipeV place them),
    all forwards then all backwards, from a hand-written CSV: our executor and torch's runtime both
    hand the activation at the V's bottom over locally."""
    rows = []
    for r in range(p):
        a, b = r, 2 * p - 1 - r
        rows.append([f"{a}F{i}" for i in range(m)] + [f"{b}F{i}" for i in range(m)]
                    + [f"{b}B{i}" for i in range(m)] + [f"{a}B{i}" for i in range(m)])
    return from_rows([[parse_action(c) for c in row] for row in rows], seq_len=32)


@pytest.mark.parametrize("p", [2, 4])
def test_exported_plans_run_in_torchs_runtime_like_our_executor(tmp_path, p):
    items = []
    plans = {name: compile_plan(build_spec(fam, resolve_model("tiny"), pp=p, microbatches=m, virtual_stages=v, seq_len=32))
             for name, (fam, m, v) in PLANS.items()}
    plans["v-shape"] = v_shape_gpipe(p, 2)
    for name, plan in plans.items():
        path = tmp_path / f"{name}.json"
        ir.save(plan, str(path))
        for fmt, comms in (("compute_only", False), ("compute_comms", True)):
            csv_path = tmp_path / f"{name}-{fmt}.csv"
            export_csv(torch_order(plan) if comms else plan, str(csv_path), comms=comms)  # as `export` writes
            items.append(f"{path}:{csv_path}:{fmt}")
    res = torchrun(p, ["tests/torch_runtime_driver.py", *items])
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x[len("RESULT "):]) for x in res.stdout.splitlines() if x.startswith("RESULT ")]
    assert len(rows) == len(items)
    for r in rows:
        assert r["max_grad_rel_err"] <= TOL and r["loss_rel_err"] <= TOL, r
        assert 5.0 < r["torch_loss"] < 6.0  # ln(256) = 5.55 at initialisation: a real loss was compared
