"""One training run on this rank (one process per rank under torchrun), top to bottom:
checks -> process group -> data -> the trainer (trainer.build: model, resume, step, loaders) ->
logger -> loop -> summary -> clean-up. Rank 0 alone writes files; other ranks get a NullLogger
and skip the writes.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import checkpoint, dist
from . import announce, preempt, rundir, state
from ..config import ConfigError, RunConfig, to_toml
from ..data import Cifar10, load_data, load_data_on_every_rank
from .metrics import NullLogger, open_logger
from .loop import Progress
from .optim import TensorLRSGD
from .resolve import resolve
from .schedule import global_batch
from .step import TrainStep
from .trainer import build


def preflight(cfg: RunConfig, world_size: int) -> Cifar10:
    """Everything that can be checked before workers start: batch split, devices, optional
    packages, data files, run directory. Resolves cfg's "auto" settings for this machine
    first (resolve.resolve). Returns the parsed data, so it is read only once."""
    resolve(cfg)
    check_out_folder(cfg.run_dir)
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
    data = load_checked_data(cfg)  # parses and checks every file; a bad one is named
    rundir.check_run_dir(cfg)
    return data


def check_out_folder(run_dir: Path) -> None:
    """The run directory must be a folder, or creatable: a file in its place (or in its path)
    or a read-only parent is named now, before anything is written."""
    label = f"--out {run_dir}"
    if (blocker := checkpoint.not_a_folder(run_dir)) is not None:
        raise ConfigError(label + ("" if blocker == run_dir else f": {blocker}") + " is a file, not a folder")
    existing = next((p for p in (run_dir, *run_dir.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{label}: {existing} is not writable")


def load_checked_data(cfg: RunConfig) -> Cifar10:
    """The data, read by this process. Under torchrun with several ranks (workers, possibly on
    other nodes with their own disks) every rank checks its node and all agree before any
    trains, so a node without the data stops the job with one line naming the host and path."""
    if "LOCAL_RANK" not in os.environ or dist.world_size_from_env() <= 1:
        return load_data(cfg.data)
    dist.setup(cfg.train.device, cfg.dist.timeout_s, cfg.dist.hang_timeout_s)
    return load_data_on_every_rank(cfg.data)


def main(cfg: RunConfig, data: Cifar10 | None = None) -> dict[str, Any]:
    """Train on this rank; `data` is what preflight already parsed, if it ran. From here on a
    SIGTERM or SIGUSR1 stops the run at the next log point with a checkpoint (Preempted)."""
    with preempt.notice() as notice:
        return train_rank(cfg, data, notice)


def train_rank(cfg: RunConfig, data: Cifar10 | None, notice: preempt.Notice) -> dict[str, Any]:
    ctx = dist.setup(cfg.train.device, cfg.dist.timeout_s, cfg.dist.hang_timeout_s)
    run_lock = None
    try:
        if data is None:
            data = preflight(cfg, ctx.world_size)
        announce.stop_if_finished(cfg)  # a rerun of a finished run does nothing (AlreadyFinished)
        if ctx.is_main and data.record_count_note():  # a stand-in or a cut file: say what trains
            print(data.record_count_note(), file=sys.stderr, flush=True)
        if ctx.is_main:
            run_lock = rundir.acquire(cfg.run_dir)  # before anything is written there (RunDirBusy if held)
            print(announce.header(cfg, ctx.world_size, announce.where_it_starts(cfg), data.eval_images(),
                                  data.describe()), flush=True)
            write_run_config(cfg)
        resume = Resume(cfg, ctx)
        trainer = build(cfg, ctx, data, restore=resume)
        record_step(cfg, ctx, trainer.step)
        logger = open_logger(cfg.log, cfg.run_dir, cfg.to_dict(), cfg.name, cfg.model.name, cfg.tags,
                             resume.progress.iteration, resume.wandb_id) if ctx.is_main else NullLogger()
        try:
            progress = trainer.train(resume.progress, logger.log, lambda: logger.wandb_id, notice.agreed,
                                     test_faults())
            summary = trainer.summarize(progress)
            summary["data_identity"] = data.identity  # cifar10 | modified | unknown (data/cifar.py identity)
            if ctx.is_main:
                trainer.save_results(summary)
            logger.summary(summary)
            logger.log_model(cfg.run_dir, trainer.step.mean.cpu().numpy(), summary)  # W&B model artifact (rank 0)
        except BaseException:
            logger.close(exit_code=1)
            raise
        logger.close()
        return summary
    finally:
        dist.cleanup()
        if run_lock is not None:
            run_lock.release()


class Resume:
    """trainer.build's restore: the run directory's newest checkpoint (state.resume), loaded
    before the step is built; afterwards `progress` and `wandb_id` hold what it found."""

    def __init__(self, cfg: RunConfig, ctx: dist.DistContext):
        self.cfg, self.ctx = cfg, ctx
        self.progress, self.wandb_id = Progress(), None

    def __call__(self, model: nn.Module, optimizer: TensorLRSGD) -> int:
        self.progress, self.wandb_id = state.resume(self.cfg.run_dir, model, optimizer, self.ctx.device,
                                                    self.ctx.is_main)
        return self.progress.iteration


def record_step(cfg: RunConfig, ctx: dist.DistContext, step: TrainStep) -> None:
    """A graph whose capture failed runs eagerly: config.toml records the step that runs."""
    if step.kind != cfg.train.step:
        cfg.train.step, cfg.train.cuda_graph = step.kind, False
        if ctx.is_main:
            write_run_config(cfg)


def write_run_config(cfg: RunConfig) -> None:
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write_text(cfg.run_dir / "config.toml", to_toml(cfg))


def test_faults() -> dict[int, Callable[[int], None]]:
    """Fault injection for the restart tests: SIGKILL this worker once it completes iteration
    $RESNETDIST_TEST_KILL_AT, on rank $RESNETDIST_TEST_KILL_RANK, first attempt only."""
    at = os.environ.get("RESNETDIST_TEST_KILL_AT")
    if not at or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return {}
    if os.environ.get("RANK", "0") != os.environ.get("RESNETDIST_TEST_KILL_RANK", "0"):
        return {}
    return {int(at): lambda _: os.kill(os.getpid(), signal.SIGKILL)}

