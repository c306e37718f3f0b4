"""The parts of the training loop (the loop itself is Trainer.fit in trainer.py): what it
carries (Progress), when it stops to log, evaluate and checkpoint (Cadence), the hot loop
between those stops (take_steps: only `step(*next(batches))`, the batches from the data's feed,
data/feed.py, already on the device), and what it does at a stop: drain the device-side sums (a
non-finite loss ends the run) and make the evaluation record and its line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from .. import dist
from ..config import RunConfig
from .bar import RunBar


@dataclass
class Progress:
    """What the loop carries from iteration to iteration, and a checkpoint carries across
    restarts (besides model and optimizer)."""

    iteration: int = 0
    train_seconds: float = 0.0
    window: np.ndarray = field(default_factory=lambda: np.zeros(3))  # loss sum, wrong, count since the last evaluation
    last_eval: dict | None = None  # the newest evaluation record (not checkpointed)


@dataclass(frozen=True)
class Cadence:
    total: int
    log_every: int
    eval_every: int
    checkpoint_every: int

    @classmethod
    def of(cls, cfg: RunConfig) -> Cadence:
        return cls(cfg.optim.iters, cfg.log.log_every, cfg.train.eval_every, cfg.train.checkpoint_every)

    def due(self, it: int) -> tuple[bool, bool, bool]:
        """(log, evaluate, checkpoint) after iteration `it`; the last iteration does all three."""
        end = it == self.total
        return (it % self.log_every == 0 or end, it % self.eval_every == 0 or end,
                it % self.checkpoint_every == 0 or end)

    def next_stop(self, it: int) -> int:
        """The first iteration after `it` at which the loop has something to do."""
        stops = [(it // every + 1) * every for every in (self.log_every, self.eval_every, self.checkpoint_every)]
        return min([self.total, *stops])


def after_step(bar: RunBar, it: int) -> None:
    """What the loop does after each step, host-side only: the hang watchdog's clock, the bar."""
    dist.progress(it)
    bar.tick(it)


def take_steps(step: Callable, batches: Iterator, count: int, tick: Callable[[int], None] | None = None) -> None:
    """The hot loop: `count` steps; tick(steps done so far) after each, if given (host-side
    only: a progress bar reads the counter and the clock, never the device)."""
    if tick is None:
        for _ in range(count):
            step(*next(batches))
        return
    for done in range(1, count + 1):
        step(*next(batches))
        tick(done)


def drain(step, members: Sequence, it: int) -> list[dict[str, float] | None]:
    """Move the step's (step.TrainStep) device-side sums into each member's (trainer.Member)
    progress window, and make its train record. A member whose loss was not finite stops here
    (its `failed` says why; its record is None from now on); the others go on, untouched."""
    stats, bad = step.drain()
    records = []
    for member, sums, first_bad in zip(members, stats, bad):
        # a non-finite loss on any rank makes the all-reduced loss sum non-finite on every rank
        if not member.failed and (first_bad >= 0 or not math.isfinite(sums[0])):
            member.failed = (f"loss became NaN or inf at iteration {max(int(first_bad), 0) + 1} (checked at {it}); "
                             f"the last good checkpoint is kept. Try a lower optim.lr or train.precision=fp32")
        if member.failed:
            records.append(None)
            continue
        member.progress.window += sums
        count = max(sums[2], 1)
        records.append({"iter": it, "train_loss": sums[0] / count, "train_error": 100.0 * sums[1] / count,
                        "lr": step.lr_of(it)})
    return records


def failures(members: Sequence) -> str:
    """The failed members' reasons in one line (a single run's: its reason alone)."""
    if len(members) == 1:
        return members[0].failed
    return "; ".join(f"{m.cfg.name}: {m.failed}" for m in members if m.failed)


def evaluation(step, progress: Progress, errors: dict[str, float], it: int, iters_per_epoch: int,
               global_batch: int) -> tuple[dict[str, float], str]:
    """The evaluation record (the training window since the last evaluation, with this
    evaluation's errors; the window is reset) and its line for the terminal."""
    loss_sum, wrong, count = progress.window
    record = {
        "iter": it,
        "epoch": it / iters_per_epoch,
        "lr": step.lr_of(it),
        "train_loss": loss_sum / max(count, 1),
        "train_error": 100.0 * wrong / max(count, 1),
        **errors,
        "images_per_second": it * global_batch / max(progress.train_seconds, 1e-9),
        "train_seconds": progress.train_seconds,
    }
    progress.window[:] = 0
    line = (f"iter {record['iter']:>6}  lr {record['lr']:.4g}  train loss {record['train_loss']:.4f}  "
            f"train err {record['train_error']:.2f}%  "
            + "  ".join(f"{k.removesuffix('_error')} err {v:.2f}%" for k, v in errors.items()))
    return record, line

