"""Training runtime: learning-rate schedule (closed forms), clipping by the global norm and AdamW
against a single-process torch reference, exact resume from a checkpoint (bitwise on CPU fp32),
--metrics, and checkpoints that cannot be used (one line, exit 2)."""
import json
import math
import os
import warnings

import pytest
import torch

import ir
from compiler import compile_plan
from executor import model as M
from executor.params import lr_at
from tests.executor_plans import spec
from tests.test_executor_runs import local_opts, torchrun


def test_lr_schedule_closed_forms():
    assert [lr_at(s, 1.0, warmup=4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    # cosine from 1e-3 to 1e-4 between step 2 (end of warm-up) and step 10
    f = [lr_at(s, 1e-3, warmup=2, decay="cosine", decay_steps=10, min_lr=1e-4) for s in range(12)]
    assert f[:2] == [5e-4, 1e-3] and f[2] == 1e-3
    assert f[6] == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.5)), rel=1e-12)
    assert f[10] == f[11] == pytest.approx(1e-4, rel=1e-12)


def test_clipped_adamw_steps_match_torch_reference(tmp_path):
    """pp=2 x dp=2 in-process, warm-up, cosine decay and clipping to a norm below the gradient's:
    the global gradient norm of each step and the step-3 loss equal torch's own clip_grad_norm_ +
    AdamW on the unpipelined model over the global batch."""
    from executor.runner import run_local

    plan = compile_plan(spec("1f1b", 2, 2, dp=2))
    sp, lr, clip, steps = plan.spec, 3e-2, 0.5, 3
    log = str(tmp_path / "m.jsonl")
    sched = dict(lr=lr, warmup=2, lr_decay="cosine", decay_steps=4)
    code, s = run_local(plan, local_opts(check_reference=False, steps=steps, clip=clip, metrics=log, **sched))
    assert code == 0
    rows = [json.loads(line) for line in open(log)]
    P = {n: M.init_param(sp.model, n, sp.seed) for n in M.all_param_names(sp)}
    # the global batch: replica d's micro-batch mb is the step's micro-batch d * m + mb
    sp = sp.model_copy(update={"microbatches": 2 * sp.microbatches})
    opt = torch.optim.AdamW(P.values(), lr=lr)
    for step in range(steps - 1):
        opt.zero_grad()
        M.reference_loss(sp, P, step).backward()
        norm = float(torch.nn.utils.clip_grad_norm_(P.values(), clip))
        # step 0 agrees to ~1e-7; later steps carry AdamW's first update, lr * g / (|g| + eps), which
        # turns fp32 rounding differences of near-zero gradients into whole steps of lr: changing only
        # how the loss head rounds its softmax moved both sides' step-1 norm by 1e-5, so 5e-5 there
        assert norm > clip and abs(rows[step]["grad_norm"] - norm) / norm < (1e-6 if step == 0 else 5e-5)
        lr_s = lr_at(step, lr, 2, "cosine", 4)
        assert rows[step]["lr"] == lr_s
        opt.param_groups[0]["lr"] = lr_s
        opt.step()
    with torch.no_grad():
        ref = float(M.reference_loss(sp, P, steps - 1))
    assert abs(s["loss"] - ref) / ref < 1e-5
    # the same run without clipping ends measurably elsewhere: the comparison can fail
    code, s2 = run_local(plan, local_opts(check_reference=False, steps=steps, **sched))
    assert abs(s2["loss"] - ref) / ref > 1e-4


def _dcp_tensors(path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(path).read_metadata()
    sd = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in md.state_dict_metadata.items()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(sd, checkpoint_id=path, no_dist=True)
    return sd


def _losses(path):
    with open(path) as f:
        return [json.loads(line)["loss"] for line in f]


TRAIN = ["--lr", "3e-3", "--warmup", "2", "--lr-decay", "cosine", "--clip", "1.0", "--device", "cpu", "--quiet"]


def _resume_pair(tmp, launch):
    a, b = os.path.join(tmp, "a"), os.path.join(tmp, "b")
    launch(["--steps", "6", "--save", a, "--save-every", "3", "--metrics", os.path.join(tmp, "a.jsonl")])
    launch(["--steps", "6", "--resume", os.path.join(a, "step-000003"), "--save", b,
            "--metrics", os.path.join(tmp, "b.jsonl")])
    la, lb = _losses(os.path.join(tmp, "a.jsonl")), _losses(os.path.join(tmp, "b.jsonl"))
    assert len(la) == 6 and len(lb) == 3
    assert lb == la[3:]  # bitwise: the same floats
    wa, wb = _dcp_tensors(os.path.join(a, "step-000006")), _dcp_tensors(os.path.join(b, "step-000006"))
    assert set(wa) == set(wb) and any(k.startswith("optim.") for k in wa)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    with open(os.path.join(b, "step-000006", "slimpipe.json")) as f:
        assert json.load(f)["step"] == 6


def test_resume_is_exact_under_torchrun(tmp_path):
    """6 steps straight vs 3 steps, save, resume, 3 steps: the same losses (bitwise) and the same
    final parameters and optimizer state. slimpipe with exchange, p=2, torchrun (DCP collective)."""
    path = str(tmp_path / "plan.json")
    ir.save(compile_plan(spec("slimpipe", 2, 2, n=4, exchange=True)), path)

    def launch(args):
        res = torchrun(2, ["-m", "executor", path] + TRAIN + args, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]

    _resume_pair(str(tmp_path), launch)


def test_resume_is_exact_in_process_with_dp(tmp_path):
    from executor.cli import main

    path = str(tmp_path / "plan.json")
    ir.save(compile_plan(spec("1f1b", 2, 2, dp=2)), path)

    def launch(args):
        assert main([path, "--local"] + TRAIN + args) == 0

    _resume_pair(str(tmp_path), launch)


def test_unusable_checkpoints_are_one_line_exit_2(tmp_path, capsys, monkeypatch):
    from executor.cli import main

    plan_path = str(tmp_path / "plan.json")
    ir.save(compile_plan(spec("1f1b", 2, 2)), plan_path)
    ck = str(tmp_path / "ck")
    assert main([plan_path, "--local", "--steps", "2", "--save", ck, "--device", "cpu", "--quiet"]) == 0
    capsys.readouterr()
    other = str(tmp_path / "other.json")
    ir.save(compile_plan(_wider()), other)
    shard = os.path.join(ck, "step-000002", "__0_0.distcp")
    cases = [
        ([other, "--resume", ck, "--steps", "4"], "the checkpoint's model has hidden=64, the plan's model hidden=128"),
        ([plan_path, "--resume", ck, "--steps", "2"], "the checkpoint is at step 2 and --steps 2 is the total"),
        ([plan_path, "--resume", str(tmp_path / "nothing"), "--steps", "4"], "no such directory"),
        ([plan_path, "--resume", str(tmp_path), "--steps", "4"], "no complete checkpoint there"),
        ([plan_path, "--save-every", "2"], "--save-every 2 needs --save DIR"),
    ]
    for args, want in cases:
        assert main(args + ["--local", "--device", "cpu"]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and want in err[0], (args, err)
    monkeypatch.setenv("SLIMPIPE_FAULT", "rank=0,instr=1,action=fail,step=2")  # a step the resumed run skips
    assert main([plan_path, "--resume", ck, "--steps", "4", "--local", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == ("executor: error: SLIMPIPE_FAULT='rank=0,instr=1,action=fail,step=2': step 2 "
                                       "is never run: --resume starts after step 2; give step=3..4\n")
    monkeypatch.delenv("SLIMPIPE_FAULT")
    os.remove(shard)
    assert main([plan_path, "--resume", ck, "--steps", "4", "--local", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shard __0_0.distcp listed in the checkpoint is missing" in err[0]


def test_a_diverging_loss_stops_the_run(tmp_path, capsys):
    """A learning rate that turns the loss into nan stops the run at that step, exit 1, saving
    nothing of it (it used to run on, print nan and exit 0)."""
    from executor.cli import main

    plan_path = str(tmp_path / "plan.json")
    ir.save(compile_plan(spec("1f1b", 2, 2)), plan_path)
    ck = str(tmp_path / "ck")
    assert main([plan_path, "--local", "--steps", "3", "--lr", "1e308", "--save", ck, "--save-every", "1", "--device", "cpu",
                 "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    # every rank has the same loss and says the same (no rank reports waiting on the one that stopped first)
    assert len(err) == 2 and all("step 2: the loss is nan, not a finite number: training diverged (--lr 1e+308; try a "
                                 "smaller one)" in line for line in err), err
    assert sorted(os.listdir(ck)) == ["step-000001"]  # step 1's loss was finite; step 2's parameters are not saved
    # a loss that is not finite before any update is the model's or the data's doing, not --lr's
    doc = json.load(open(plan_path))
    doc["spec"]["model"]["rope_theta"] = 1e-320  # every rotary frequency overflows
    with open(plan_path, "w") as f:
        json.dump(doc, f)
    assert main([plan_path, "--local", "--steps", "2", "--device", "cpu", "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert all("step 1: the loss is nan, not a finite number, before any update: the model or its data give it" in line
               for line in err), err


def _wider():
    from compiler import resolve_model
    from compiler.layout import build_spec

    return build_spec("1f1b", resolve_model("tiny", {"hidden": 128}), pp=2, microbatches=2, seq_len=64)


def test_autocast_runs_attention_and_exchange_in_bf16():
    """--autocast (bf16 autocast, fp32 parameters): slimpipe with the KV exchange runs and stays
    near the fp32 reference (bf16 matmuls: gradients within a few %), while fp32 is exact; the K/V
    of the caches and the exchange are bf16."""
    from executor.runner import run_local
    from executor import stage as S

    plan = compile_plan(spec("slimpipe", 2, 2, n=4, exchange=True))
    dtypes = set()
    attend = S.Stage._attend

    def spy(self, lc, s, q, k, v):
        out = attend(self, lc, s, q, k, v)
        dtypes.add((self.kv[lc.key[0]][lc.li][s][0].dtype, out.dtype))
        return out

    code, exact = run_local(plan, local_opts(steps=1))
    assert code == 0 and exact["max_grad_rel_err"] < 1e-5
    S.Stage._attend = spy
    try:
        code, s = run_local(plan, local_opts(steps=1, autocast=True))
    finally:
        S.Stage._attend = attend
    assert dtypes == {(torch.bfloat16, torch.bfloat16)}
    # beyond fp32's 1e-4, as bf16 must be, and within the bound derived from what bf16 autocast costs the
    # unsliced reference (tests/test_reference_dtype.py)
    assert code == 0 and 1e-4 < s["max_grad_rel_err"] <= s["grad_tolerance"] < 5e-2 and s["loss_rel_err"] < 1e-4
