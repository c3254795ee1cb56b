"""Run slimpipe plans in torch.distributed.pipelining's own runtime and in slimpipe's executor,
in one torchrun launch, and compare the two on the same plan, weights and batch.

    torchrun --nproc-per-node P tests/torch_runtime_driver.py plan.json:schedule.csv:FORMAT ...

For each plan: _PipelineScheduleRuntime loads the CSV (FORMAT compute_only or compute_comms) and
drives PipelineStages whose modules are built from the executor's model functions and parameter
initialisation (executor.model); then the executor runs the same plan (its gradients taken
before its optimizer step). Rank 0 prints one 'RESULT {json}' line per plan: the largest relative error over every
parameter gradient and of the loss (fp32, gloo)."""
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import _PipelineScheduleRuntime

import ir
from executor import model as M
from executor.attention import pick_backend
from executor.cli import exit_process
from executor.interpreter import Rank
from executor.transport import DistTransport


class StageModule(nn.Module):
    """One pipeline stage of the executor's model as an nn.Module (what PipelineStage drives):
    embedding on the first stage, its decoder layers; the last stage's final norm, LM head and loss
    run in the schedule's loss_fn."""

    def __init__(self, spec, stage: int):
        super().__init__()
        self.cfg, self.spec = spec.model, spec
        self.names = M.stage_param_names(spec, stage)
        self.params = nn.ParameterList([M.init_param(spec.model, n, spec.seed) for n in self.names])
        self.first = stage == 0
        self.layers = range(spec.stage_first_layer()[stage], spec.stage_first_layer()[stage] + spec.stage_layers[stage])

    @property
    def P(self):
        return dict(zip(self.names, self.params))

    def forward(self, x):
        P = self.P
        if self.first:
            x = P["embed"][x]
        cos, sin = M.rope_tables(self.cfg, 0, x.shape[1], x.device, x.dtype)
        for i in self.layers:
            x = M.layer_forward(P, i, self.cfg, x, cos, sin, M.full_causal)
        return x


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_one(plan, csv_path, fmt, rank, world):
    spec = plan.spec
    mine = spec.placement[rank]
    mods = {s: StageModule(spec, s) for s in mine}
    stages = [PipelineStage(mods[s], s, spec.num_stages, torch.device("cpu")) for s in mine]
    last = spec.num_stages - 1
    denom = spec.micro_batch_size * spec.seq_len * spec.microbatches

    def loss_fn(out, target):
        return M.head_loss(mods[last].P, out, target, denom, spec.model.rms_eps)

    sched = _PipelineScheduleRuntime(stages, spec.microbatches, loss_fn=loss_fn, scale_grads=False)
    sched._load_csv(csv_path, format=fmt)
    tok = torch.cat([M.batch_tokens(spec, 0, mb) for mb in range(spec.microbatches)])
    losses = []
    sched.step(tok[:, :-1], target=tok[:, 1:], losses=losses)
    torch_loss = float(sum(x.detach() for x in losses)) if losses else 0.0
    dist.barrier()
    # the executor on the same plan; its gradients are copied when its OPT runs (the step drops them)
    tp = DistTransport(rank, world, torch.device("cpu"), 120.0)
    R = Rank(plan, rank, tp, pick_backend("sdpa", torch.device("cpu"), torch.float32, spec.model.head_dim),
             device="cpu", timeout=120.0)
    grads = []
    step = R.params.step

    def keep_grads(lr=None):
        grads.extend({n: p.grad.detach().clone() for n, p in chunk.items()} for chunk in R.params.chunks)
        step(lr)

    R.params.step = keep_grads
    ours = R.run_step(0)
    for p in tp.pending_sends():
        p.value()
    worst = 0.0
    for c, s in enumerate(mine):
        for name, p in mods[s].P.items():
            worst = max(worst, rel(p.grad, grads[c][name]))
    loss_err = abs(torch_loss - ours["loss"]) / abs(ours["loss"]) if last in mine else 0.0
    t = torch.tensor([worst, loss_err, torch_loss if last in mine else 0.0, ours["loss"] if last in mine else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    dist.barrier()
    return {"max_grad_rel_err": float(t[0]), "loss_rel_err": float(t[1]), "torch_loss": float(t[2]),
            "executor_loss": float(t[3])}


def main(items):
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for item in items:
        path, csv_path, fmt = item.split(":")
        res = run_one(ir.load(path), csv_path, fmt, rank, world)
        if rank == 0:
            print("RESULT " + json.dumps({"plan": os.path.basename(path), "format": fmt, **res}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
    exit_process(0)  # as the executor does (issue 15.5: a normal exit can abort in torch's C++ teardown)
