"""What each worker process (one per rank under torchrun, or this process alone) does for
`resnetdist train`, top to bottom:
checks (preflight) -> process group -> where the run starts (finished, the newest checkpoint,
or fresh: found once, by rank 0, and shared) -> lock, header, config.toml -> the trainer
(trainer.build, then Trainer.load of that checkpoint) -> logger -> Trainer.fit -> summary ->
clean-up. Rank 0 alone writes files; other ranks get a NullLogger and skip the writes.
"""

from __future__ import annotations

import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint, dist
from . import announce, preempt, rundir
from ..config import ConfigError, RunConfig, check_same_experiment, to_toml
from ..data import Cifar10, load_data, load_data_on_every_rank
from .metrics import NullLogger, open_logger
from .schedule import global_batch
from .trainer import build, resolve


def preflight(cfg: RunConfig, world_size: int) -> Cifar10:
    """Everything that can be checked before workers start: batch split, devices, optional
    packages, data files, run directory. Resolves cfg's "auto" settings for this machine
    first (trainer.resolve). Returns the parsed data, so it is read only once."""
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
    check_same_experiment(cfg)
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
    dist.setup(cfg.train.device, cfg.dist.timeout_s, cfg.dist.hang_timeout_s, compile_pause_s=cfg.dist.compile_pause_s)
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


def finished_summary(cfg: RunConfig) -> dict[str, Any] | None:
    """summary.json of a run that ended with this experiment's length and name; None otherwise
    (absent, unreadable, or from another configuration: then the run goes on as usual)."""
    try:
        summary = json.loads((cfg.run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict):
        return None
    same = summary.get("iterations") == cfg.optim.iters and summary.get("name") == cfg.name
    return summary if same and "test_error" in summary else None


def where_it_starts(cfg: RunConfig) -> Start:
    """The run directory, looked at once: finished, else its newest readable checkpoint (read
    and sha256-checked by checkpoint.load_latest, a damaged one named and skipped), else fresh."""
    summary = finished_summary(cfg)
    if summary is not None:
        return Start(cfg.optim.iters, summary=summary)
    found = checkpoint.load_latest(cfg.run_dir, warn=dist.print0) if cfg.run_dir.is_dir() else None
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


def main(cfg: RunConfig, data: Cifar10 | None = None, signals: bool = True, on_hang: str = "exit") -> dict[str, Any]:
    """Train on this rank; `data` is what preflight already parsed, if it ran. With `signals`,
    from here on a SIGTERM or SIGUSR1 stops the run at the next log point with a checkpoint
    (Preempted). on_hang: dist.setup's ("raise" for resnetdist.train, which must not end the
    calling process)."""
    with preempt.notice(install=signals) as notice:
        return train_rank(cfg, data, notice, on_hang)


def train_rank(cfg: RunConfig, data: Cifar10 | None, notice: preempt.Notice, on_hang: str = "exit") -> dict[str, Any]:
    ctx = dist.setup(cfg.train.device, cfg.dist.timeout_s, cfg.dist.hang_timeout_s, compile_pause_s=cfg.dist.compile_pause_s,
                     on_hang=on_hang)
    run_lock = None
    try:
        if data is None:
            data = preflight(cfg, ctx.world_size)
        start = agreed_start(cfg, ctx)
        if start.summary is not None:  # a rerun of a finished run does nothing
            raise AlreadyFinished(start.summary)
        if ctx.is_main and data.record_count_note():  # a stand-in or a cut file: say what trains
            print(data.record_count_note(), file=sys.stderr, flush=True)
        if ctx.is_main:
            run_lock = rundir.acquire(cfg.run_dir)  # before anything is written there (RunDirBusy if held)
        trainer = build(cfg, ctx, data, stop=notice)
        if start.state is not None:
            trainer.load(start.state)
        if ctx.is_main:  # after the build: the header names the step that runs (a failed auto capture: eager, and why)
            print(announce.header(cfg, ctx.world_size, start, data.eval_images(), data.describe(),
                                  trainer.step.choice.describe()), flush=True)
            write_run_config(cfg, trainer.step.kind)
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
        dist.cleanup()
        if run_lock is not None:
            run_lock.release()


def write_run_config(cfg: RunConfig, step_kind: str) -> None:
    """config.toml: the resolved configuration, with the step that runs (a graph whose capture
    failed runs eagerly), written once the step is built."""
    cfg.train.step = step_kind
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write_text(cfg.run_dir / "config.toml", to_toml(cfg))
