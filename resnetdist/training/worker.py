"""What each worker process (one per rank under torchrun, or this process alone) does for
`resnetdist train`, top to bottom:
checks (preflight) -> process group -> where the run starts (finished, the newest checkpoint,
or fresh: found once, by rank 0, and shared) -> lock -> the trainer (trainer.build, then
Trainer.load of that checkpoint) -> header, config.toml and resolved.toml -> logger -> Trainer.fit -> summary ->
clean-up. Rank 0 alone writes files; other ranks get a NullLogger and skip the writes.
"""

from __future__ import annotations

import io
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint, dist
from ..rundir import RunDir
from . import announce, preempt
from ..config import ConfigError, RunConfig, check_same_experiment
from ..data import Cifar10, load_data, load_data_on_every_rank
from .metrics import NullLogger, open_logger
from .plan import Plan, resolve
from .trainer import build


@dataclass(frozen=True)
class Prepared:
    """What preflight found: the plan of the run on this machine and the data, parsed once."""

    plan: Plan
    data: Cifar10


def preflight(cfg: RunConfig, world_size: int) -> Prepared:
    """Everything that can be checked before workers start: the plan (batch split, device,
    precision, step: plan.resolve), devices, optional packages, data files, run directory."""
    plan = resolve(cfg, world_size)
    check_out_folder(cfg.run_dir)
    if dist.launch_rank() == 0:  # the launcher or rank 0; rank 0's own lock comes later
        RunDir(cfg.run_dir).check_free()  # a run directory held by a live run: RunDirBusy, before torchrun starts
    if plan.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = cuda, but torch sees no CUDA device")
    if cfg.dist.sync_bn and world_size > 1 and plan.device != "cuda":
        raise ConfigError("dist.sync_bn needs CUDA (SyncBatchNorm has no CPU implementation)")
    data = load_checked_data(cfg, plan)  # parses and checks every file; a bad one is named
    check_same_experiment(cfg, RunDir(cfg.run_dir).config)
    return Prepared(plan, data)


def check_out_folder(run_dir: Path) -> None:
    """The run directory must be a folder, or creatable: a file in its place (or in its path)
    or a read-only parent is named now, before anything is written."""
    label = f"--out {run_dir}"
    if (blocker := checkpoint.not_a_folder(run_dir)) is not None:
        raise ConfigError(label + ("" if blocker == run_dir else f": {blocker}") + " is a file, not a folder")
    existing = next((p for p in (run_dir, *run_dir.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{label}: {existing} is not writable")


def load_checked_data(cfg: RunConfig, plan: Plan) -> Cifar10:
    """The data, read by this process. Under torchrun with several ranks (workers, possibly on
    other nodes with their own disks) every rank checks its node and all agree before any
    trains, so a node without the data stops the job with one line naming the host and path."""
    if not dist.under_torchrun() or dist.world_size_from_env() <= 1:
        return load_data(cfg.data)
    dist.setup(plan.device, cfg.dist.timeout_s, cfg.dist.hang_timeout_s, compile_pause_s=cfg.dist.compile_pause_s)
    return load_data_on_every_rank(cfg.data)


# ----- where the run starts ---------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """Where a run directory stands: finished (`summary`: its summary.json), resumable (the
    newest readable `checkpoint` and its `state`), or fresh."""

    iteration: int = 0
    checkpoint: Path | None = None
    state: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None


class AlreadyFinished(Exception):
    """The run directory holds this run's summary.json: nothing to train (not an error)."""

    def __init__(self, summary: dict[str, Any]):
        self.summary = summary
        super().__init__(f"{summary.get('name')} is finished")


def where_it_starts(cfg: RunConfig) -> Start:
    """The run directory, looked at once: finished (RunDir.finished), else its newest readable
    checkpoint (RunDir.load_newest: sha256-checked, a damaged one named and skipped), else fresh."""
    run = RunDir(cfg.run_dir)
    summary = run.finished(cfg.optim.iters, cfg.name)
    if summary is not None:
        return Start(cfg.optim.iters, summary=summary)
    found = run.checkpoints.load_newest(warn=dist.print0)
    if found is None:
        return Start()
    return Start(int(found[1]["iteration"]), found[0], found[1])


def agreed_start(cfg: RunConfig, ctx: dist.DistContext) -> Start:
    """Rank 0's where_it_starts on every rank (the run directory need only be on rank 0's
    disk). The checkpoint's state travels as torch.save bytes and is read back with
    weights_only=True, as from the file: a round trip that keeps every bit."""
    start = where_it_starts(cfg) if ctx.is_main else None
    if not ctx.distributed:
        return start
    payload = None
    if start is not None:
        state = None
        if start.state is not None:
            buf = io.BytesIO()
            torch.save(start.state, buf)
            state = buf.getvalue()
        payload = (start.iteration, str(start.checkpoint) if start.checkpoint else None, state, start.summary)
    with dist.stage("start agreement (finished, or the newest checkpoint's state)"):
        payload = dist.broadcast_object(payload)
    if start is not None:
        return start
    iteration, path, state, summary = payload
    loaded = torch.load(io.BytesIO(state), map_location="cpu", weights_only=True) if state is not None else None
    return Start(iteration, Path(path) if path else None, loaded, summary)


# ----- the run ----------------------------------------------------------------------------------


def main(cfg: RunConfig, prepared: Prepared | None = None, signals: bool = True, on_hang: str = "exit") -> dict[str, Any]:
    """Train on this rank; `prepared` is what preflight found, if it ran here. The process's
    part: the process group (and the hang watchdog; on_hang: dist.setup's, "raise" for
    resnetdist.train, which must not end the calling process) and, with `signals`, from here on
    a SIGTERM or SIGUSR1 noted to stop the run at the next log point with a checkpoint (Preempted)."""
    with preempt.notice(install=signals) as notice:
        prepared = prepared or preflight(cfg, dist.world_size_from_env())
        ctx = dist.setup(prepared.plan.device, cfg.dist.timeout_s, cfg.dist.hang_timeout_s,
                         compile_pause_s=cfg.dist.compile_pause_s, on_hang=on_hang)
        try:
            return train_rank(cfg, prepared, ctx, notice)
        finally:
            dist.cleanup()


def train_rank(cfg: RunConfig, prepared: Prepared, ctx: dist.DistContext, notice: preempt.Notice) -> dict[str, Any]:
    """The run on this rank, in its process group (main)."""
    plan, data = prepared.plan, prepared.data
    run_lock = None
    try:
        start = agreed_start(cfg, ctx)
        if start.summary is not None:  # a rerun of a finished run does nothing
            raise AlreadyFinished(start.summary)
        if ctx.is_main and data.record_count_note():  # a stand-in or a cut file: say what trains
            print(data.record_count_note(), file=sys.stderr, flush=True)
        if ctx.is_main:
            run = RunDir(cfg.run_dir)  # rank 0's: the other ranks write nothing
            run_lock = run.acquire()  # before anything is written there (RunDirBusy if held; preflight probed it)
        trainer = build(cfg, ctx, data, stop=notice, plan=plan)
        if start.state is not None:
            trainer.load(start.state)
        if ctx.is_main:  # after the build: the header names the step that runs (auto's failed capture: eager, and why)
            print(announce.header(cfg, trainer.plan, start, data.eval_images(), data.describe()), flush=True)
            run.write_config(cfg, asdict(trainer.plan))  # the configuration as loaded, and beside it what ran
        logger = open_logger(cfg.log, cfg.run_dir, cfg.to_dict(), cfg.name, cfg.model.name, cfg.tags,
                             trainer.progress.iteration, trainer.wandb_id) if ctx.is_main else NullLogger()
        try:
            trainer.fit(logger)
            # watched: a write to a stuck disk must not leave torchrun waiting for rank 0 forever;
            # the W&B upload has its own limit (log.wandb_finish_timeout_s), allowed on top
            with dist.stage("finish (model.pt, summary.json, the logger's upload)", early=True,
                            extra_s=cfg.log.wandb_finish_timeout_s):
                summary = trainer.finish()
                logger.summary(summary)
                logger.log_model(cfg.run_dir, trainer.step.mean.cpu().numpy(), summary)  # W&B model artifact (rank 0)
                closing, logger = logger, NullLogger()  # closed once, whatever happens in close
                closing.close()
        except BaseException as e:
            logger.close_after(e)  # stopped (a notice, Ctrl-C) or failed: metrics.py tells them apart
            raise
        return summary
    finally:
        if run_lock is not None:
            run_lock.release()

