"""Worker for tests/test_hang.py, run under torchrun (gloo, CPU, 2 ranks): the same few
iterations trained with DDP's defaults, the former options (buffers broadcast before every
forward, gradients copied out of the buckets) and with wrap.DDP_OPTIONS, through trainer.build as a run does;
each rank saves its model (before the evaluation) and optimizer state and the evaluation's
errors of each.

usage: torchrun --standalone --nproc_per_node=2 tests/_ddp_options_worker.py DATA_DIR OUT_DIR
"""

import sys
from pathlib import Path

import torch

from resnetdist import dist
from resnetdist.config import load_config
from resnetdist.data import load_data
from resnetdist.training import trainer, wrap
from resnetdist.training.loop import take_steps

STEPS = 6
cfg = load_config(flags={"model": {"n": 1}, "data": {"dir": sys.argv[1]}, "optim": {"batch_size": 32},
                         "train": {"device": "cpu"}, "log": {"wandb_mode": "disabled"}})
ctx = dist.setup("cpu", 120)
data = load_data(cfg.data)
settings = {"former": {}, "now": dict(wrap.DDP_OPTIONS)}  # former: DDP's defaults
for name, options in settings.items():
    wrap.DDP_OPTIONS = options
    run = trainer.build(cfg, ctx, data)
    take_steps(run.step, run.feed.batches(0), STEPS)
    ddp = run.step.train_model
    trained = {k: v.clone() for k, v in run.model.state_dict().items()}  # before evaluation's broadcast
    errors = run.evaluate()  # broadcasts rank 0's BN statistics first, as training's evaluations do
    torch.save({"model": trained, "optimizer": run.optimizer.state_dict(), "errors": errors,
                "ddp": {"sync_buffers": getattr(ddp, "forward_sync_buffers", getattr(ddp, "broadcast_buffers", None)),
                        "gradient_as_bucket_view": ddp.gradient_as_bucket_view}},
               Path(sys.argv[2]) / f"rank{ctx.rank}-{name}.pt")
dist.cleanup()
