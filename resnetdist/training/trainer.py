"""One rank's run: `build(cfg, ctx, data, stop)` makes the model and its optimizer, the step
(step.build_step: DDP / compile wrapping, graph capture) and the loaders and the feed, once.
The Trainer it returns owns the run from there: `fit()` is the training loop, `evaluate()`
the error rates, `state_dict()` / `load()` what a checkpoint holds and how a run continues
from one, `checkpoint()` writes one, and the stop (a preemption notice) is asked at the log
points. worker.py (a training run), bench, doctor and the tests all build through here, so
what they drive is what trains.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from .. import dist, pretrained
from ..config import RunConfig
from ..data import Cifar10, Loaders, open_loaders
from ..data.augment import training_mean
from ..data.epochs import EpochTable, epoch_table_for
from ..data.feed import Feed, feed_for
from ..errors import Preempted
from ..models import build_model, count_parameters
from .bar import RunBar
from ..rundir import RunDir
from .evaluate import error_rates, model_layout as memory_format  # evaluation uses the same layout
from .loop import Cadence, Progress, after_step, drain, evaluation, take_steps
from .optim import TensorLRSGD
from .preempt import Notice
from .plan import Plan, resolve
from .schedule import lr_table
from .step import StepChoice, TrainStep, build_step


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


def make_step(cfg: RunConfig, plan: Plan, ctx: dist.DistContext, model: nn.Module, optimizer: TensorLRSGD,
              mean: torch.Tensor, source: EpochTable | None = None) -> TrainStep:
    """The step the plan chose (step.choose_kind), inputs normalised with `mean` (the data's mean
    image, on the device); step.choice says which runs and why: auto's graph whose capture fails
    becomes the eager step, a graph asked for by name stops the run (GraphUnavailable). With a
    source, the step gathers its own inputs."""
    with dist.stage("model broadcast (DDP set-up)"):
        return build_step(model, optimizer, mean, lr_table(cfg.optim, plan.lr_scale, cfg.dist.scale_warmup_iters),
                          choice=plan.choice, compile_mode=cfg.train.compile, precision=plan.precision,
                          memory_format=memory_format(cfg, ctx.device), ddp=ctx.distributed,
                          batch_per_rank=plan.batch_per_rank, source=source)


def build(cfg: RunConfig, ctx: dist.DistContext, data: Cifar10, stop: Notice | None = None,
          plan: Plan | None = None) -> Trainer:
    """The run of this rank: loaders, model and optimizer, step, and the data's feed of the
    step. `plan`: what preflight resolved (None: resolved here, for bench, doctor and tests);
    `stop`: the preemption notice fit() asks at its log points (None: nothing stops it early).
    It starts at iteration 0; Trainer.load continues from a checkpoint."""
    plan = plan or resolve(cfg, ctx.world_size)
    loaders = open_loaders(cfg.data, data, ctx, plan.global_batch, cfg.train.seed)
    # a resident loader's epochs go to the device whole: the step gathers each batch itself
    source = epoch_table_for(loaders.train, cfg.train.seed, plan.global_batch, ctx.rank, ctx.world_size)
    if source is not None:
        source.load(0)  # before capture: the warm-up reads it
    mean = training_mean(cfg.data.mean, cfg.data.channel_mean, data.train.images).to(ctx.device)
    model, optimizer = make_model(cfg, ctx)
    step = make_step(cfg, plan, ctx, model, optimizer, mean, source)
    plan = plan.ran(step.choice)
    feed = feed_for(loaders.train, source, cfg.train.seed, plan.global_batch, ctx.rank, ctx.world_size,
                    out=step.inputs.out if step.inputs else None)
    data_facts = {"train_images": len(data.train), "test_images": len(data.test),
                  "val_images": len(data.val) if data.val is not None else 0,
                  "data_identity": data.identity}  # cifar10 | modified | unknown (data/cifar.py identity)
    return Trainer(cfg, plan, ctx, model, optimizer, step, loaders, feed, loaders.train.steps, data_facts, stop)


class Logger(Protocol):
    """What fit() logs to (metrics.MetricLogger, NullLogger on ranks other than 0)."""

    wandb_id: str | None

    def log(self, record: dict, kind: str) -> None: ...


@dataclass
class Trainer:
    """One rank's run, built (build()); fit() trains it from `progress` to the end."""

    cfg: RunConfig
    plan: Plan  # what this machine resolved, with the step that runs
    ctx: dist.DistContext
    model: nn.Module  # the plain module: what checkpoints save
    optimizer: TensorLRSGD
    step: TrainStep
    loaders: Loaders
    feed: Feed | EpochTable
    steps_per_epoch: int
    data_facts: dict[str, Any]  # train/test/val images in use and the data's identity (summary.json: a cut or stand-in data set shows)
    stop: Notice | None = None  # asked at every log point: a signal noted there stops the run (Preempted)
    progress: Progress = field(default_factory=Progress)  # where the run stands; a checkpoint carries it
    wandb_id: str | None = None  # the W&B run a checkpoint hands on to the next attempt

    def fit(self, logger: Logger) -> Progress:
        """The training loop, from self.progress to optim.iters. Between stops only steps run
        (take_steps); at a log point the device's sums are drained (a non-finite loss raises
        NonFiniteLoss) and logged, then come the evaluation and the checkpoint when due. A stop
        asked for (self.stop, agreed by all ranks) checkpoints there and raises Preempted."""
        step, progress, cadence = self.step, self.progress, Cadence.of(self.cfg)
        it, self.wandb_id = progress.iteration, logger.wandb_id  # this attempt's W&B run: its checkpoints hand it on
        bar = RunBar(f"{self.cfg.name} ({step_label(step.choice)})", cadence.total, it, self.ctx.is_main,
                     next_stop=cadence.next_stop)
        batches = self.feed.batches(it)
        try:
            t0 = time.perf_counter()
            while it < cadence.total:
                until = cadence.next_stop(it)
                with dist.stage(f"training step (gradient all-reduce) in iterations {it + 1}-{until}"):
                    take_steps(step, batches, until - it, lambda done, first=it: after_step(bar, first + done))
                bar.to(until)
                it = until
                log_now, eval_now, ckpt_now = cadence.due(it)
                if not (log_now or eval_now or ckpt_now):
                    continue
                with dist.stage(f"metrics all-reduce at iteration {it}"):
                    record = drain(step, progress, it)  # syncs with the device, so the time below is real
                progress.train_seconds += time.perf_counter() - t0
                progress.iteration = it
                logger.log(record, "train")
                bar.show(record["train_loss"], record["train_error"])
                # the last iteration just finishes; a collective, so every rank asks at the same points
                reason = self.stop.agreed(it) if self.stop is not None and it < cadence.total else ""
                if eval_now:
                    with dist.stage(f"evaluation at iteration {it}"):
                        errors = self.evaluate()
                    progress.last_eval, line = evaluation(step, progress, errors, it, self.steps_per_epoch,
                                                          self.plan.global_batch)
                    bar.write(line)
                    logger.log(progress.last_eval, "eval")
                if ckpt_now or reason:
                    self.checkpoint()
                if reason:
                    raise Preempted(it, reason)
                t0 = time.perf_counter()
        finally:
            bar.close()  # also on a stop or an error: no stale bar left on the terminal
        return progress

    def evaluate(self) -> dict[str, float]:
        """Error (%) of the model on each evaluation set (evaluate.error_rates)."""
        return error_rates(self.model, self.loaders.evals, self.step.mean, self.step.memory_format)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint holds: the uncompiled model, the optimizer, the progress (iteration,
        training time, the metric window), the RNG states, the config, the mean image,
        the world size and the W&B run id: everything needed to continue bit for bit, and to
        evaluate or export alone."""
        progress, device = self.progress, self.ctx.device
        state = {
            **final_weights(self.model, self.cfg, progress.iteration, self.step.mean),
            "optimizer": self.optimizer.state_dict(), "rng_cpu": torch.get_rng_state(),
            "train_window": torch.from_numpy(progress.window.copy()), "train_seconds": progress.train_seconds,
            "world_size": self.ctx.world_size, "wandb_id": self.wandb_id or "",
        }
        if device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(device)
        return state

    def load(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's state (state_dict's), in place: every tensor a captured
        graph reads keeps its address (TrainStep.load_state), and a step's source holds the
        epoch of that iteration."""
        iteration, device = int(state["iteration"]), self.ctx.device
        self.step.load_state(state["model"], state["optimizer"], iteration)
        if self.step.source is not None:
            self.step.source.load(iteration // self.step.source.steps)
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        self.progress = Progress(iteration, float(state["train_seconds"]),
                                 state["train_window"].numpy().astype(np.float64))
        self.wandb_id = state.get("wandb_id") or None
        saved_world = int(state.get("world_size", 0))
        if saved_world and saved_world != self.ctx.world_size:
            dist.print0(f"world size changed: the checkpoint was written by {saved_world} rank(s), "
                        f"this run has {self.ctx.world_size}")

    def checkpoint(self) -> None:
        """state_dict() written by rank 0 (RunDir's checkpoints: atomic, checksummed, the last
        train.keep_checkpoints kept); every rank waits, so none runs ahead of a save."""
        cfg, iteration = self.cfg, self.progress.iteration
        if self.ctx.is_main:  # watched: the other ranks wait for it in the barrier
            with dist.stage(f"checkpoint write at iteration {iteration}"):
                RunDir(cfg.run_dir).checkpoints.save(iteration, self.state_dict(), cfg.train.keep_checkpoints)
        with dist.stage(f"checkpoint barrier at iteration {iteration}"):
            dist.barrier()

    def finish(self) -> dict[str, Any]:
        """The run's summary; rank 0 writes the final weights (two files) and the summary."""
        summary, cfg = summarize(self), self.cfg
        if self.ctx.is_main:
            weights, run = final_weights(self.model, cfg, cfg.optim.iters, self.step.mean), RunDir(cfg.run_dir)
            run.write_model(weights)
            pretrained.save(run.safetensors, self.model, weights["mean"], cfg)  # the same, no pickle
            run.write_summary(summary)
        return summary


def step_label(choice: StepChoice) -> str:
    """The progress bar's word for the step: its kind, and a fall-back said at a glance."""
    return f"{choice.kind}, graph capture failed" if choice.fell_back else choice.kind


def final_weights(model: nn.Module, cfg: RunConfig, iteration: int, mean: torch.Tensor) -> dict[str, Any]:
    """What model.pt holds: enough to evaluate or export the net without this run's files."""
    return {"model": model.state_dict(), "config": cfg.to_dict(), "iteration": iteration,
            "mean": mean.cpu()}  # the preprocessing mean image, for export / inference


def summarize(trainer: Trainer) -> dict[str, Any]:
    """summary.json: the run's result and what produced it; evaluates once more when the last
    evaluation is not at the end (a run resumed at its very end)."""
    cfg, ctx, step, progress = trainer.cfg, trainer.ctx, trainer.step, trainer.progress
    batch = trainer.plan.global_batch  # images per iteration over all ranks
    total = cfg.optim.iters
    record = progress.last_eval
    if record is None or record["iter"] != total:  # resumed at the very end: evaluate again
        with dist.stage("final evaluation"):
            errors = trainer.evaluate()
        record = {"iter": total, **errors, "images_per_second": total * batch / max(progress.train_seconds, 1e-9)}
    return {
        "name": cfg.name, "model": cfg.model.name, "depth": cfg.model.depth, "plain": cfg.model.plain,
        "seed": cfg.train.seed, "iterations": total,
        "test_error": record["test_error"], "val_error": record.get("val_error"),
        "train_error": record.get("train_error"),
        "train_seconds": progress.train_seconds, "images_per_second": record["images_per_second"],
        "parameters": count_parameters(step.model), "world_size": ctx.world_size, "global_batch": batch,
        "device": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu",
        "precision": trainer.plan.precision, "step": step.kind, "step_reason": step.choice.reason,
        "loader": trainer.plan.loader, **trainer.data_facts,
    }
