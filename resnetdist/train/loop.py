"""The iteration loop and its cadence: feed the step, and at log / evaluation / checkpoint
points drain the device-side sums, stop on a non-finite loss, time the run and show progress.

What happens at those points (evaluate, log, checkpoint, and anything a test injects at a
given iteration) comes in as hooks, so the hot loop is only `step(*next(batches))`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import numpy as np
import torch

from .. import dist
from ..config import RunConfig
from ..data.augment import draw_params
from ..data.epochs import Epochs
from ..data.resident import TrainLoader
from ..errors import NonFiniteLoss
from .preempt import Preempted
from ..progress import RunBar


class Step(Protocol):
    """What the loop needs of a step (step.TrainStep, or a fake in tests)."""

    # step(images_u8, labels, aug) from a host feed, or step() when the step gathers its own
    # batch on the device (data/epochs.py): the loop passes on whatever the feed yields
    def __call__(self, *batch: torch.Tensor) -> None: ...
    def drain(self) -> tuple[np.ndarray, int]: ...
    def lr_of(self, it: int) -> float: ...


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

    def next_stop(self, it: int, extra: tuple[int, ...] = ()) -> int:
        """The first iteration after `it` at which the loop has something to do."""
        stops = [(it // every + 1) * every for every in (self.log_every, self.eval_every, self.checkpoint_every)]
        return min([self.total, *stops, *(e for e in extra if e > it)])


@dataclass
class Feed:
    """Where each iteration's batch and augmentation numbers come from: the loader's batches
    and draw_params(seed, iteration), this rank's slice of both. With `out`, the loader
    gathers each batch straight into those buffers (a graphed step's inputs: one copy, not two)."""

    loader: TrainLoader
    seed: int
    global_batch: int
    rank: int = 0
    world_size: int = 1
    out: tuple[torch.Tensor, torch.Tensor] | None = None  # a graphed step's input buffers (step.inputs.out)

    def batches(self, start_iter: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        it = start_iter
        for images, labels in self.loader.batches(start_iter, out=self.out):
            dist.progress(it)  # the hang watchdog's clock: `it` iterations done
            yield images, labels, draw_params(self.seed, it, self.global_batch, self.rank, self.world_size)
            it += 1


def run_steps(step: Callable, batches: Iterator, count: int, tick: Callable[[int], None] | None = None) -> None:
    """The hot loop: `count` steps; tick(steps done so far) after each, if given (host-side
    only: a progress bar reads the counter and the clock, never the device)."""
    if tick is None:
        for _ in range(count):
            step(*next(batches))
        return
    for done in range(1, count + 1):
        step(*next(batches))
        tick(done)


@dataclass
class Hooks:
    evaluate: Callable[[], dict[str, float]]  # error (%) of each evaluation set
    log: Callable[[dict, str], None]  # a record, "train" or "eval"
    checkpoint: Callable[[Progress], None]
    at_iteration: dict[int, Callable[[int], None]] = field(default_factory=dict)  # e.g. faults in tests
    # asked at every drain point, the same iterations on every rank: why to stop there ("" = go on);
    # a collective (preempt.Notice.agreed), so the answer is the same on every rank
    stop_reason: Callable[[int], str] = lambda it: ""


def train_loop(step: Step, feed: Feed | Epochs, progress: Progress, cadence: Cadence, hooks: Hooks,
               steps_per_epoch: int, name: str = "") -> Progress:
    """Train from progress.iteration to cadence.total; returns the progress at the end. A stop
    asked for (hooks.stop_reason) checkpoints at the next drain point and raises Preempted."""
    it = progress.iteration
    bar = RunBar(name, cadence.total, it, dist.is_main_process(), stop_every=cadence.log_every)
    batches = feed.batches(it)
    extra = tuple(hooks.at_iteration)
    try:
        t0 = time.perf_counter()
        while it < cadence.total:
            stop = cadence.next_stop(it, extra)
            with dist.stage(f"training step (gradient all-reduce) in iterations {it + 1}-{stop}"):
                run_steps(step, batches, stop - it, lambda done, first=it: bar.tick(first + done))
            bar.to(stop)
            it = stop
            if it in hooks.at_iteration:
                hooks.at_iteration[it](it)
            log_now, eval_now, ckpt_now = cadence.due(it)
            if not (log_now or eval_now or ckpt_now):
                continue
            with dist.stage(f"metrics all-reduce at iteration {it}"):
                record = drain(step, progress, it)  # syncs with the device, so the time below is real
            progress.train_seconds += time.perf_counter() - t0
            progress.iteration = it
            hooks.log(record, "train")
            bar.show(record["train_loss"], record["train_error"])
            reason = hooks.stop_reason(it) if it < cadence.total else ""  # the last iteration just finishes
            if eval_now:
                with dist.stage(f"evaluation at iteration {it}"):
                    errors = hooks.evaluate()
                progress.last_eval = evaluation_record(step, progress, errors, it, steps_per_epoch, feed.global_batch)
                bar.write(evaluation_line(progress.last_eval, errors))
                hooks.log(progress.last_eval, "eval")
            if ckpt_now or reason:
                hooks.checkpoint(progress)
            if reason:
                raise Preempted(it, reason)
            t0 = time.perf_counter()
    finally:
        bar.close()  # also on a stop or an error: no stale bar left on the terminal
    return progress


def drain(step: Step, progress: Progress, it: int) -> dict[str, float]:
    """Move the step's device-side sums into the progress window; stop on a non-finite loss."""
    stats, bad = step.drain()
    # a non-finite loss on any rank makes the all-reduced loss sum non-finite on every rank
    if bad >= 0 or not math.isfinite(stats[0]):
        raise NonFiniteLoss(
            f"loss became NaN or inf at iteration {max(bad, 0) + 1} (checked at {it}); the last good "
            f"checkpoint is kept. Try a lower optim.lr or train.precision=fp32"
        )
    progress.window += stats
    count = max(stats[2], 1)
    return {"iter": it, "train_loss": stats[0] / count, "train_error": 100.0 * stats[1] / count, "lr": step.lr_of(it)}


def evaluation_record(step: Step, progress: Progress, errors: dict[str, float], it: int, steps_per_epoch: int,
                      global_batch: int) -> dict[str, float]:
    """The training window since the last evaluation, with this evaluation's errors; resets the window."""
    loss_sum, wrong, count = progress.window
    record = {
        "iter": it,
        "epoch": it / steps_per_epoch,
        "lr": step.lr_of(it),
        "train_loss": loss_sum / max(count, 1),
        "train_error": 100.0 * wrong / max(count, 1),
        **errors,
        "images_per_second": it * global_batch / max(progress.train_seconds, 1e-9),
        "train_seconds": progress.train_seconds,
    }
    progress.window[:] = 0
    return record


def evaluation_line(record: dict[str, float], errors: dict[str, float]) -> str:
    return (f"iter {record['iter']:>6}  lr {record['lr']:.4g}  train loss {record['train_loss']:.4f}  "
            f"train err {record['train_error']:.2f}%  "
            + "  ".join(f"{k.removesuffix('_error')} err {v:.2f}%" for k, v in errors.items()))

