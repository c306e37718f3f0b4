"""One rank's built run: `build(cfg, ctx, data)` makes the model and its optimizer, restores a
checkpoint into them if asked, builds the step (step.build_step: DDP / compile wrapping, graph
capture) and opens the loaders and the feed, once. The Trainer it returns trains (the loop's
hooks are its methods), evaluates, checkpoints and writes the results. run.py (a training
run), bench, doctor and the tests all build through here, so what they drive is what trains.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .. import checkpoint, dist
from ..config import RunConfig
from ..data import Cifar10, Loaders, open_loaders
from ..data.augment import training_mean
from ..data.epochs import Epochs, epochs_for
from ..data.order import iters_per_epoch
from ..data.resident import TrainLoader
from ..models import build_model, count_parameters
from . import state
from .evaluate import error_rates, model_layout as memory_format  # evaluation uses the same layout
from .graph import CudaOps
from .loop import Cadence, Feed, Hooks, Progress, run_steps, train_loop
from .optim import TensorLRSGD
from .schedule import global_batch, lr_table
from .step import TrainStep, build_step

# restore(model, optimizer) -> the iteration to start from: loads a checkpoint (or any state)
# into the built model and optimizer before the step is built (a graph captures their tensors)
Restore = Callable[[nn.Module, TensorLRSGD], int]


def make_model(cfg: RunConfig, ctx: dist.DistContext) -> tuple[nn.Module, TensorLRSGD]:
    """The net with its initial weights (the same on every rank) and its optimizer."""
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv kernels once
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(ctx.device, memory_format=memory_format(cfg, ctx.device))
    if cfg.dist.sync_bn and ctx.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    lr = torch.zeros((), device=ctx.device)  # the step writes each iteration's lr here
    return model, TensorLRSGD(model.parameters(), lr, cfg.optim.momentum, cfg.optim.weight_decay)


def make_step(cfg: RunConfig, ctx: dist.DistContext, model: nn.Module, optimizer: TensorLRSGD, data: Cifar10,
              start_iter: int = 0, ops: CudaOps | None = None, source: Epochs | None = None) -> TrainStep:
    """The step as the config asks for it (precision, memory format, DDP, train.step); a
    graph whose capture fails becomes the eager step (step.kind says which runs). With a
    source (its start epoch loaded), the step gathers its own inputs from it."""
    mean = training_mean(cfg.data.mean, cfg.data.channel_mean, data.train.images).to(ctx.device)
    with dist.stage("model broadcast (DDP set-up)"):
        return build_step(model, optimizer, mean, lr_table(cfg, ctx.world_size), precision=cfg.train.precision,
                          memory_format=memory_format(cfg, ctx.device), start_iter=start_iter,
                          ddp=ctx.distributed, compile_mode=cfg.train.compile, graph=cfg.train.step == "graph",
                          batch_per_rank=global_batch(cfg, ctx.world_size) // ctx.world_size, ops=ops,
                          source=source)


def feed_of(step: TrainStep, loader: TrainLoader, seed: int, global_batch: int, rank: int = 0,
            world_size: int = 1) -> Feed | Epochs:
    """The feed of `step`: its source, when it gathers its own inputs (nothing to hand it per
    iteration); else the loader's batches, which a graphed step's loader gathers into the
    graph's inputs."""
    if step.source is not None:
        return step.source
    return Feed(loader, seed, global_batch, rank, world_size, out=step.inputs.out if step.inputs else None)


def build(cfg: RunConfig, ctx: dist.DistContext, data: Cifar10, restore: Restore | None = None,
          ops: CudaOps | None = None) -> Trainer:
    """The run of this rank, built: loaders, model and optimizer (restored, if `restore`),
    step, and the feed that fills the step's inputs."""
    batch = global_batch(cfg, ctx.world_size)
    loaders = open_loaders(cfg.data, data, ctx, batch, cfg.train.seed)
    model, optimizer = make_model(cfg, ctx)
    start_iter = restore(model, optimizer) if restore is not None else 0
    # a resident loader's epochs go to the device whole: the step gathers each batch itself
    source = epochs_for(loaders.train, cfg.train.seed, batch, ctx.rank, ctx.world_size)
    if source is not None:
        source.load(start_iter // source.steps)  # before capture: the warm-up reads it
    step = make_step(cfg, ctx, model, optimizer, data, start_iter, ops, source)
    feed = feed_of(step, loaders.train, cfg.train.seed, batch, ctx.rank, ctx.world_size)
    images = {"train_images": len(data.train), "test_images": len(data.test),
              "val_images": len(data.val) if data.val is not None else 0}
    return Trainer(cfg, ctx, model, optimizer, step, loaders, feed, iters_per_epoch(len(data.train), batch), images)


def evaluate(step: TrainStep, loaders: Loaders) -> dict[str, float]:
    """Error (%) of the step's model on each evaluation set (evaluate.error_rates)."""
    return error_rates(step.model, loaders.evals, step.mean, step.memory_format)


@dataclass
class Trainer:
    cfg: RunConfig
    ctx: dist.DistContext
    model: nn.Module  # the plain module: what checkpoints save
    optimizer: TensorLRSGD
    step: TrainStep
    loaders: Loaders
    feed: Feed | Epochs
    steps_per_epoch: int
    images: dict[str, int]  # train/test/val images in use (summary.json: a cut or stand-in data set shows)

    @property
    def batch(self) -> int:
        """The global batch: images per iteration over all ranks."""
        return self.feed.global_batch

    def run(self, count: int, first: int = 0) -> None:
        """Iterations first .. first+count-1, nothing else (bench, doctor, tests)."""
        run_steps(self.step, self.feed.batches(first), count)

    def train(self, progress: Progress, log: Callable[[dict, str], None], wandb_id: Callable[[], str | None],
              stop_reason: Callable[[int], str], at_iteration: dict[int, Callable[[int], None]]) -> Progress:
        """The training loop from `progress` to the end, with this trainer's evaluation and
        checkpoints as its hooks."""
        hooks = Hooks(evaluate=self.evaluate, log=log, checkpoint=lambda p: self.checkpoint(p, wandb_id()),
                      at_iteration=at_iteration, stop_reason=stop_reason)
        return train_loop(self.step, self.feed, progress, Cadence.of(self.cfg), hooks, self.steps_per_epoch,
                          self.cfg.name)

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.step, self.loaders)

    def checkpoint(self, progress: Progress, wandb_id: str | None) -> None:
        """Rank 0 writes, every rank waits, so none runs ahead of a save."""
        cfg, ctx, step = self.cfg, self.ctx, self.step
        if ctx.is_main:
            snap = state.snapshot(step.model, step.optimizer, progress, cfg, step.mean, ctx.world_size, wandb_id)
            checkpoint.save(cfg.run_dir, progress.iteration, snap, cfg.train.keep_checkpoints)
        with dist.stage(f"checkpoint barrier at iteration {progress.iteration}"):
            dist.barrier()

    def summarize(self, progress: Progress) -> dict[str, Any]:
        cfg, ctx, step, batch = self.cfg, self.ctx, self.step, self.batch
        total = cfg.optim.iters
        record = progress.last_eval
        if record is None or record["iter"] != total:  # resumed at the very end: evaluate again
            with dist.stage("final evaluation"):
                errors = self.evaluate()
            record = {"iter": total, **errors,
                      "images_per_second": total * batch / max(progress.train_seconds, 1e-9)}
        return {
            "name": cfg.name, "model": cfg.model.name, "depth": cfg.model.depth, "plain": cfg.model.plain,
            "seed": cfg.train.seed, "iterations": total,
            "test_error": record["test_error"], "val_error": record.get("val_error"),
            "train_error": record.get("train_error"),
            "train_seconds": progress.train_seconds, "images_per_second": record["images_per_second"],
            "parameters": count_parameters(step.model), "world_size": ctx.world_size, "global_batch": batch,
            "device": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu",
            "precision": cfg.train.precision, "step": step.kind, "capture_error": step.capture_error,
            "loader": cfg.data.loader, **self.images,
        }

    def save_results(self, summary: dict[str, Any]) -> None:
        """model.pt and summary.json in the run directory (rank 0)."""
        cfg = self.cfg
        checkpoint.atomic_save(state.final_weights(self.step.model, cfg, cfg.optim.iters, self.step.mean),
                               cfg.run_dir / "model.pt")
        checkpoint.atomic_write_text(cfg.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
