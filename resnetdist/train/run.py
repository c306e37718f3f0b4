"""One training run on this rank (one process per rank under torchrun), top to bottom:
checks -> process group -> data -> model -> step -> resume -> logger -> loop -> summary ->
clean-up. Rank 0 alone writes files; other ranks get a NullLogger and skip the writes.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any, Callable

import torch
from torch import nn

from .. import checkpoint, dist
from . import preempt, rundir, state
from ..config import ConfigError, RunConfig, check_run_dir, to_toml
from ..data import Cifar10, Loaders, load_data, open_loaders
from ..data.augment import training_mean
from ..data.order import iters_per_epoch
from .evaluate import error_rates, model_layout as memory_format  # evaluation uses the same layout
from .loop import Cadence, Feed, Hooks, Progress, train_loop
from .metrics import NullLogger, open_logger
from ..models import build_model, count_parameters
from .optim import TensorLRSGD
from .schedule import global_batch, lr_table
from .step import TrainStep


def preflight(cfg: RunConfig, world_size: int) -> Cifar10:
    """Everything that can be checked before workers start: batch split, devices, optional
    packages, data files, run directory. Returns the parsed data, so it is read only once."""
    if int(os.environ.get("RANK", "0")) == 0:  # the launcher or rank 0; rank 0's own lock comes later
        rundir.check_free(cfg.run_dir)  # a run directory held by a live run: RunDirBusy, before torchrun starts
    try:
        global_batch(cfg, world_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = cuda, but torch sees no CUDA device")
    if cfg.dist.sync_bn and world_size > 1 and cfg.train.device != "cuda":
        raise ConfigError("dist.sync_bn needs CUDA (SyncBatchNorm has no CPU implementation)")
    if cfg.data.loader == "ffcv":
        from ..data.beton import require_ffcv

        require_ffcv()
    data = load_data(cfg.data)  # parses and checks every file; a bad one is named
    check_run_dir(cfg)
    return data


def main(cfg: RunConfig, data: Cifar10 | None = None) -> dict[str, Any]:
    """Train on this rank; `data` is what preflight already parsed, if it ran. From here on a
    SIGTERM or SIGUSR1 stops the run at the next log point with a checkpoint (Preempted)."""
    with preempt.notice() as notice:
        return train_rank(cfg, data, notice)


def train_rank(cfg: RunConfig, data: Cifar10 | None, notice: preempt.Notice) -> dict[str, Any]:
    # TORCH_NCCL_ASYNC_ERROR_HANDLING is not set here: torchrun's agent sets it in every
    # worker's environment, so a default set here would never apply (cli._torchrun and
    # launch/common.sh set it in the launcher, where it does)
    ctx = dist.setup(cfg.train.device, cfg.dist.timeout_s)
    run_lock = None
    try:
        if data is None:
            data = preflight(cfg, ctx.world_size)
        if ctx.is_main:
            run_lock = rundir.acquire(cfg.run_dir)  # before anything is written there (RunDirBusy if held)
            write_run_config(cfg)
        batch = global_batch(cfg, ctx.world_size)
        loaders = open_loaders(cfg.data, data, ctx, batch, cfg.train.seed)
        model, optimizer = make_model(cfg, ctx)
        progress, wandb_id = state.resume(cfg.run_dir, model, optimizer, ctx.device, ctx.is_main)
        step = make_step(cfg, ctx, model, optimizer, data, progress.iteration)
        if step.kind != cfg.train.step:  # graph capture failed: record the step that runs
            cfg.train.step, cfg.train.cuda_graph = step.kind, False
            if ctx.is_main:
                write_run_config(cfg)
        logger = open_logger(cfg.log, cfg.run_dir, cfg.to_dict(), cfg.name, cfg.model.name, cfg.tags,
                             progress.iteration, wandb_id) if ctx.is_main else NullLogger()
        try:
            hooks = Hooks(evaluate=lambda: evaluate(step, loaders), log=logger.log,
                          checkpoint=checkpointer(cfg, ctx, step, lambda: logger.wandb_id),
                          at_iteration=test_faults(), stop_reason=notice.agreed)
            feed = Feed(loaders.train, cfg.train.seed, batch, ctx.rank, ctx.world_size,
                        out=step.inputs.out if step.inputs else None)
            progress = train_loop(step, feed, progress, Cadence.of(cfg), hooks,
                                  iters_per_epoch(len(data.train), batch), cfg.name)
            summary = summarize(cfg, ctx, step, progress, loaders, batch)
            if ctx.is_main:
                save_results(cfg, step, summary)
            logger.summary(summary)
            logger.log_model(cfg.run_dir, step.mean.cpu().numpy(), summary)  # W&B model artifact (rank 0)
        except BaseException:
            logger.close(exit_code=1)
            raise
        logger.close()
        return summary
    finally:
        dist.cleanup()
        if run_lock is not None:
            run_lock.release()


def write_run_config(cfg: RunConfig) -> None:
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write_text(cfg.run_dir / "config.toml", to_toml(cfg))


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
              start_iter: int = 0) -> TrainStep:
    """The step as the config asks for it (precision, memory format, DDP, train.step); a
    graph whose capture fails becomes the eager step (step.kind says which runs)."""
    mean = training_mean(cfg.data.mean, cfg.data.channel_mean, data.train.images).to(ctx.device)
    with dist.stage("model broadcast (DDP set-up)"):
        return TrainStep(model, optimizer, mean, lr_table(cfg, ctx.world_size), precision=cfg.train.precision,
                         memory_format=memory_format(cfg, ctx.device), start_iter=start_iter,
                         ddp=ctx.distributed, compile_mode=cfg.train.compile, graph=cfg.train.step == "graph",
                         batch_per_rank=global_batch(cfg, ctx.world_size) // ctx.world_size)


def evaluate(step: TrainStep, loaders: Loaders) -> dict[str, float]:
    return error_rates(step.model, loaders.evals, step.mean, step.memory_format)


def checkpointer(cfg: RunConfig, ctx: dist.DistContext, step: TrainStep,
                 wandb_id: Callable[[], str | None]) -> Callable[[Progress], None]:
    """The checkpoint hook: rank 0 writes, every rank waits, so none runs ahead of a save."""
    def save(progress: Progress) -> None:
        if ctx.is_main:
            snap = state.snapshot(step.model, step.optimizer, progress, cfg, step.mean, ctx.world_size, wandb_id())
            checkpoint.save(cfg.run_dir, progress.iteration, snap, cfg.train.keep_checkpoints)
        with dist.stage(f"checkpoint barrier at iteration {progress.iteration}"):
            dist.barrier()

    return save


def summarize(cfg: RunConfig, ctx: dist.DistContext, step: TrainStep, progress: Progress, loaders: Loaders,
              batch: int) -> dict[str, Any]:
    total = cfg.optim.iters
    record = progress.last_eval
    if record is None or record["iter"] != total:  # resumed at the very end: evaluate again
        with dist.stage("final evaluation"):
            errors = evaluate(step, loaders)
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
        "loader": cfg.data.loader,
    }


def save_results(cfg: RunConfig, step: TrainStep, summary: dict[str, Any]) -> None:
    checkpoint.atomic_save(state.final_weights(step.model, cfg, cfg.optim.iters, step.mean),
                           cfg.run_dir / "model.pt")
    checkpoint.atomic_write_text(cfg.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")


def test_faults() -> dict[int, Callable[[int], None]]:
    """Fault injection for the restart tests: SIGKILL this worker once it completes iteration
    $RESNETDIST_TEST_KILL_AT, on rank $RESNETDIST_TEST_KILL_RANK, first attempt only."""
    at = os.environ.get("RESNETDIST_TEST_KILL_AT")
    if not at or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return {}
    if os.environ.get("RANK", "0") != os.environ.get("RESNETDIST_TEST_KILL_RANK", "0"):
        return {}
    return {int(at): lambda _: os.kill(os.getpid(), signal.SIGKILL)}

