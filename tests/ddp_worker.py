"""Run by tests/test_train.py under `torch.distributed.run` (2 processes, gloo): counts DDP all-reduces.

Prints one JSON line per process: how many times DDP's communication hook ran (once per
gradient bucket per synchronised backward) and the trained weights' sum.
"""

import json
import sys
from pathlib import Path

import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from dalle.config import TrainConfig
from dalle.training.batches import TableBatches
from dalle.training.loop import fit

run_dir, grad_accum = Path(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
model = torch.nn.Linear(8, 1)
data = TableBatches({"x": torch.randn(64, 8), "y": torch.randn(64, 1)}, batch_size=8)
calls = [0]


def counting_hook(state, bucket):
    calls[0] += 1
    return allreduce_hook(state, bucket)


def step_fn(model, batch, step):
    if calls[0] == 0 and not getattr(model, "_hooked", False):  # the prepared (DDP) model
        model.register_comm_hook(state=None, hook=counting_hook)
        model._hooked = True
    return {"loss": torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])}


config = TrainConfig(steps=3, batch_size=8, grad_accum=grad_accum, warmup_steps=1, log_every=1)
fit(model, data, step_fn, config, run_dir, "lin", lambda m, d: None, progress=False, resume=None)
print(json.dumps({"allreduces": calls[0], "weight_sum": float(model.weight.sum())}))
