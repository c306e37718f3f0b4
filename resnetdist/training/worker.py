"""What each worker process (one per rank under torchrun, or this process alone) does for
`resnetdist train`, top to bottom: preflight -> process group -> where the run starts (found
once, by rank 0, and shared) -> lock -> trainer.build and that checkpoint's state -> header,
config.toml and resolved.toml -> logger -> Trainer.fit -> summary -> clean-up. Rank 0 alone
writes files; other ranks log to a MetricLogger without sinks.

A pack (`train --seeds`, pack.py) is a list of member configurations wherever one configuration
goes here; each member has its own run directory, lock, start, logger and summary, and the pack
starts at the newest iteration all its members have a checkpoint of.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .. import checkpoint, dist
from ..config import ConfigError, RunConfig, check_same_experiment
from ..data import Cifar10, load_data, load_data_on_every_rank
from ..errors import NonFiniteLoss
from ..rundir import RunDir, StartPoint
from . import announce, preempt
from .loop import failures
from .metrics import MetricLogger, open_logger
from .plan import Plan, resolve
from .trainer import build


@dataclass(frozen=True)
class Prepared:
    """What preflight found: the plan of the run on this machine and the data, parsed once."""

    plan: Plan
    data: Cifar10


def as_members(cfg: RunConfig | list[RunConfig]) -> list[RunConfig]:
    return list(cfg) if isinstance(cfg, (list, tuple)) else [cfg]


def preflight(cfg: RunConfig | list[RunConfig], world_size: int) -> Prepared:
    """Everything that can be checked before workers start, cheapest first: the plan, devices,
    each run directory (a folder or creatable, not held by a live run, not holding another
    experiment), then every data file. Under torchrun with several ranks every rank checks its
    node's data and all agree before any trains, so a node without it stops the job with one
    line naming the host and path."""
    members = as_members(cfg)
    cfg = members[0]
    plan = resolve(cfg, world_size)
    if plan.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = cuda, but torch sees no CUDA device")
    if cfg.dist.sync_bn and world_size > 1 and plan.device != "cuda":
        raise ConfigError("dist.sync_bn needs CUDA (SyncBatchNorm has no CPU implementation)")
    for member in members:
        run, label = RunDir(member.run_dir), f"--out {member.run_dir}"
        # a file in the folder's place (or in its path) or a read-only parent, named before anything is written
        if (blocker := checkpoint.not_a_folder(run.path)) is not None:
            raise ConfigError(label + ("" if blocker == run.path else f": {blocker}") + " is a file, not a folder")
        existing = next((p for p in (run.path, *run.path.parents) if p.exists()), None)
        if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"{label}: {existing} is not writable")
        if dist.launch_rank() == 0:  # the launcher or rank 0; rank 0's own lock comes later
            run.check_free()  # held by a live run: RunDirBusy, before torchrun starts
        check_same_experiment(member, run.config)
    if dist.under_torchrun() and dist.world_size_from_env() > 1:
        dist.setup(plan.device, cfg.dist.timeout_s, cfg.dist.hang_timeout_s, compile_pause_s=cfg.dist.compile_pause_s)
        return Prepared(plan, load_data_on_every_rank(cfg.data))
    return Prepared(plan, load_data(cfg.data))


# ----- where the run starts ---------------------------------------------------------------------


class AlreadyFinished(Exception):
    """The run directory holds this run's summary.json (a pack's: every member's): nothing to train."""

    def __init__(self, summaries: list[dict[str, Any]]):
        self.summaries = summaries
        self.summary = summaries[0]
        super().__init__(f"{', '.join(str(s.get('name')) for s in summaries)} finished")


def where_they_start(members: list[RunConfig]) -> list[StartPoint]:
    """Each run directory, looked at once: finished (RunDir.finished), else its newest readable
    checkpoint (sha256-checked, a damaged one named and skipped), else fresh. A pack trains its
    unfinished members from the newest iteration that every one of them has a checkpoint of."""
    runs = [RunDir(m.run_dir) for m in members]
    summaries = [run.finished(m.optim.iters, m.name) for run, m in zip(runs, members)]
    todo = [run for run, summary in zip(runs, summaries) if summary is None]
    found, newest = [], None
    while todo:  # lower the iteration asked for until every member's newest readable one agrees
        found = [run.checkpoints.load_newest(warn=dist.print0, at_most=newest) for run in todo]
        if None in found:
            found = []
            break
        if len(iterations := {int(state["iteration"]) for _, state in found}) == 1:
            break
        newest = min(iterations)
    loaded = iter(found)  # a (path, state) per unfinished member, in order; none: they start afresh
    starts = []
    for m, summary in zip(members, summaries):
        path, state = (None, None) if summary is not None else next(loaded, (None, None))
        iteration = m.optim.iters if summary is not None else int(state["iteration"]) if state else 0
        starts.append(StartPoint(iteration, path, state, summary))
    return starts


def agreed_start(members: list[RunConfig], ctx: dist.DistContext) -> list[StartPoint]:
    """Rank 0's where_they_start on every rank (the run directories need only be on rank 0's
    disk); the states travel pickled, every bit kept."""
    starts = where_they_start(members) if ctx.is_main else None
    if not ctx.distributed:
        return starts
    with dist.stage("start agreement (finished, or the newest checkpoint's state)"):
        return dist.broadcast_object(starts)


# ----- the run ----------------------------------------------------------------------------------


def main(cfg: RunConfig | list[RunConfig], prepared: Prepared | None = None, signals: bool = True,
         on_hang: str = "exit") -> dict[str, Any] | list[dict[str, Any]]:
    """Train on this rank: a run (its summary), or a pack's members (their summaries, a list);
    `prepared`: what preflight found, if it ran here. The process's part: the process group, the
    hang watchdog (on_hang "raise" for resnetdist.train, which must not end the calling process)
    and, with `signals`, the preemption notice (preempt.py)."""
    with preempt.notice(install=signals) as notice:
        prepared = prepared or preflight(cfg, dist.world_size_from_env())
        members = as_members(cfg)
        first = members[0]
        ctx = dist.setup(prepared.plan.device, first.dist.timeout_s, first.dist.hang_timeout_s,
                         compile_pause_s=first.dist.compile_pause_s, on_hang=on_hang)
        try:
            summaries = train_rank(members, prepared, ctx, notice)
            return summaries if isinstance(cfg, (list, tuple)) else summaries[0]
        finally:
            dist.cleanup()


def train_rank(members: list[RunConfig], prepared: Prepared, ctx: dist.DistContext,
               notice: preempt.Notice) -> list[dict[str, Any]]:
    """The members' summaries on this rank, in order (a finished member's as found). A member
    whose loss turned NaN is reported once the others are done: NonFiniteLoss, carrying their
    summaries (`done`)."""
    plan, data = prepared.plan, prepared.data
    locks = []
    try:
        starts = agreed_start(members, ctx)
        if all(start.summary is not None for start in starts):  # a rerun of a finished run does nothing
            raise AlreadyFinished([start.summary for start in starts])
        todo = [(m, start) for m, start in zip(members, starts) if start.summary is None]
        if ctx.is_main:
            if note := data.record_count_note():  # a stand-in or a cut file: say what trains
                print(note, file=sys.stderr, flush=True)
            # before anything is written there (RunDirBusy if held; preflight probed them)
            locks = [RunDir(m.run_dir).acquire() for m, _ in todo]
        trainer = build(todo[0][0], ctx, data, stop=notice, plan=plan, members=[m for m, _ in todo])
        if todo[0][1].state is not None:
            trainer.load_state_dicts([start.state for _, start in todo])
        if ctx.is_main:  # after the build: the header names the step that runs (auto's failed capture: eager, and why)
            print(announce.header(todo, trainer.plan, data.eval_images(), data.describe(),
                                  [m for m, s in zip(members, starts) if s.summary is not None]), flush=True)
        loggers = [MetricLogger() for _ in trainer.members]  # other ranks log nothing
        if ctx.is_main:  # each member's config.toml (as loaded), resolved.toml (what runs) and logger
            for j, member in enumerate(trainer.members):
                member.run.write_config(member.cfg, asdict(trainer.plan))
                loggers[j] = open_logger(member.cfg, member.progress.iteration, member.wandb_id)
        try:
            trainer.fit(loggers)
            # watched: a write to a stuck disk must not leave torchrun waiting for rank 0 forever;
            # the W&B upload has its own limit (log.wandb_finish_timeout_s), allowed on top
            with dist.stage("finish (model.pt, summary.json, the logger's upload)", early=True,
                            extra_s=len(loggers) * trainer.cfg.log.wandb_finish_timeout_s):
                summaries = trainer.finish()
                for j, (member, summary) in enumerate(zip(trainer.members, summaries)):
                    closing, loggers[j] = loggers[j], MetricLogger()  # closed once, whatever happens in close
                    if summary is None:  # its loss turned NaN (its folder says so: trainer.log_point)
                        closing.close(NonFiniteLoss.exit_code)
                        continue
                    closing.summary(summary)
                    closing.log_model(member.cfg.run_dir, trainer.step.mean.cpu().numpy(), summary)  # W&B model artifact
                    closing.close()
        except BaseException as e:
            for logger in loggers:
                logger.close_after(e)  # stopped (a notice, Ctrl-C) or failed: metrics.py tells them apart
            raise
        done = iter(summaries)
        found = [start.summary if start.summary is not None else next(done) for start in starts]
        if any(m.failed for m in trainer.members):
            error = NonFiniteLoss(failures(trainer.members))
            error.done = [s for s in found if s is not None]
            raise error
        return found
    finally:
        for lock in locks:
            lock.release()

