"""The training loop (Trainer.fit) with a fake step: its cadence (log, evaluate, checkpoint), the
NaN stop, the stop the ranks agreed on (a preemption notice), and resuming from a checkpoint's
progress, in-process and in milliseconds."""

from __future__ import annotations

import math
import signal

import numpy as np
import pytest
import torch

from resnetdist.config import load_config
from resnetdist.dist import DistContext
from resnetdist.training import preempt
from resnetdist.data.feed import Feed
from resnetdist.training.plan import resolve
from resnetdist.errors import NonFiniteLoss
from resnetdist.training.loop import Cadence, Progress
from resnetdist.training.step import StepChoice
from resnetdist.errors import Preempted
from resnetdist.training.trainer import Member, Trainer

BATCH = 4


class FakeLoader:
    """A training loader (data/resident.TrainLoader) whose batch i is all pixels i % 256."""

    seeds, global_batch, rank, world_size, b, iters_per_epoch, device = [0], BATCH, 0, 1, BATCH, 10, torch.device("cpu")

    def __init__(self):
        self.starts = []

    def batches(self, start_iter: int, out):
        self.starts.append(start_iter)
        it = start_iter
        while True:
            out[0].fill_(it % 256)
            yield out
            it += 1


class FakeStep:
    """Loss of iteration i (1-based) = losses.get(i, 1 / i); one wrong answer per step. With
    crash_at, the call that would run that iteration is interrupted (a kill, as a test sees it)."""

    def __init__(self, start: int = 0, losses: dict[int, float] | None = None, crash_at: int | None = None):
        self.it, self.losses, self.crash_at = start, losses or {}, crash_at
        self.stats, self.bad = np.zeros(3), -1
        self.seen = []  # (iteration, first pixel) of every call: which batch came when
        self.kind, self.model = "eager", torch.nn.Linear(1, 1)
        self.choice = StepChoice("eager", "asked for by name (train.step)", "eager")

    def __call__(self, images, labels, aug):
        if self.it == self.crash_at:
            raise KeyboardInterrupt(f"stopped at {self.it}")
        self.it += 1
        self.seen.append((self.it, int(images[0, 0, 0, 0])))
        loss = self.losses.get(self.it, 1.0 / self.it)
        if not math.isfinite(loss) and self.bad < 0:
            self.bad = self.it - 1
        self.stats += [loss * BATCH, 1, BATCH]

    def drain(self):  # one run: a pack of one member
        stats, self.stats = self.stats, np.zeros(3)
        return stats[None], np.array([self.bad])

    def lr_of(self, it: int) -> float:
        return 0.1 if it <= 30 else 0.01


class Recorder(Trainer):
    """A Trainer around the fake step: records what fit() logs, evaluates and checkpoints."""

    wandb_id = None  # as its own logger: no W&B run

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.logs, self.evals, self.checkpoints = [], [], []

    def log(self, record, kind):
        (self.evals if kind == "eval" else self.logs).append(record)

    def evaluate(self):
        return [{"test_error": 50.0}]

    def checkpoint(self):
        progress = self.progress
        self.checkpoints.append(Progress(progress.iteration, progress.train_seconds, progress.window.copy()))


CADENCE = Cadence(total=45, log_every=5, eval_every=10, checkpoint_every=20)


def recorder(step, progress, loader=None, cadence=CADENCE) -> Recorder:
    cfg = load_config(flags={"train": {"device": "cpu", "eval_every": cadence.eval_every,
                                       "checkpoint_every": cadence.checkpoint_every},
                             "optim": {"iters": cadence.total, "milestones": []},
                             "log": {"log_every": cadence.log_every}})
    feed = Feed(loader or FakeLoader())
    trainer = Recorder(cfg, resolve(cfg, 1), DistContext(0, 0, 1, torch.device("cpu")), step.model, None, step, None, feed,
                       data_facts={}, members=[Member(cfg, progress)])
    return trainer


def run(step, progress, loader=None, cadence=CADENCE) -> Recorder:
    trainer = recorder(step, progress, loader, cadence)
    trainer.fit(logger=trainer)  # the recorder is its own logger (wandb_id: None)
    return trainer


def test_next_stop_and_due():
    assert CADENCE.next_stop(0) == 5 and CADENCE.next_stop(5) == 10 and CADENCE.next_stop(44) == 45
    assert CADENCE.due(20) == (True, True, True) and CADENCE.due(15) == (True, False, False)
    assert CADENCE.due(45) == (True, True, True)  # the last iteration does everything


def test_cadence_of_logs_evaluations_and_checkpoints():
    step, loader = FakeStep(), FakeLoader()
    rec = run(step, Progress(), loader)
    progress = rec.progress
    assert [it for it, _ in step.seen] == list(range(1, 46))
    assert [px for _, px in step.seen] == list(range(45))  # batch i at iteration i + 1
    assert loader.starts == [0]
    assert [r["iter"] for r in rec.logs] == [5, 10, 15, 20, 25, 30, 35, 40, 45]
    assert [r["iter"] for r in rec.evals] == [10, 20, 30, 40, 45]
    assert [c.iteration for c in rec.checkpoints] == [20, 40, 45]
    assert progress.iteration == 45 and progress.last_eval == rec.evals[-1] and progress.train_seconds > 0
    first = rec.evals[0]
    assert first["train_loss"] == pytest.approx(np.mean([1 / i for i in range(1, 11)]))
    assert first["train_error"] == pytest.approx(100 / BATCH) and first["epoch"] == 1.0 and first["lr"] == 0.1
    assert rec.evals[-1]["lr"] == 0.01 and rec.evals[-1]["test_error"] == 50.0
    assert rec.logs[0]["train_loss"] == pytest.approx(np.mean([1 / i for i in range(1, 6)]))


def test_non_finite_loss_stops_before_the_next_checkpoint():
    step = FakeStep(losses={13: float("nan")})
    rec = recorder(step, Progress())
    with pytest.raises(NonFiniteLoss, match=r"NaN or inf at iteration 13 \(checked at 15\)"):
        rec.fit(rec)
    assert [c.iteration for c in rec.checkpoints] == []  # the first is due at 20
    assert [r["iter"] for r in rec.logs] == [5, 10] and len(step.seen) == 15


def test_resume_from_a_checkpoint_gives_the_same_records():
    """Interrupted after iteration 27, resumed from the checkpoint at 20: the records from 20 on
    are those of the uninterrupted run (timing aside), and the batches follow on."""
    whole = run(FakeStep(), Progress())

    cut = recorder(FakeStep(crash_at=27), Progress())
    with pytest.raises(KeyboardInterrupt):
        cut.fit(cut)
    saved = cut.checkpoints[-1]
    assert saved.iteration == 20
    step, loader = FakeStep(start=20), FakeLoader()
    resumed = run(step, saved, loader)
    assert loader.starts == [20] and step.seen[0] == (21, 20)

    def strip(records):
        return [{k: v for k, v in r.items() if k not in ("train_seconds", "images_per_second")} for r in records]

    assert strip(cut.evals[:2] + resumed.evals) == strip(whole.evals)
    assert strip(resumed.logs) == strip(whole.logs[4:])


class SignalledStep(FakeStep):
    """A fake step during whose iteration `at` the process receives `signum` (noted by `notice`)."""

    def __init__(self, notice: preempt.Notice, at: int, signum: int):
        super().__init__()
        self.notice, self.at, self.signum = notice, at, signum

    def __call__(self, *batch):
        super().__call__(*batch)
        if self.it == self.at:
            self.notice.note(self.signum)


class AskedNotice(preempt.Notice):
    """preempt.Notice, recording the iterations the trainer asks it at."""

    def __init__(self):
        super().__init__()
        self.asked = []

    def agreed(self, it: int) -> str:
        self.asked.append(it)
        return super().agreed(it)


def test_the_loop_checkpoints_where_the_ranks_agreed_to_stop_and_raises_preempted():
    notice = preempt.Notice()
    rec = recorder(SignalledStep(notice, 13, signal.SIGTERM), Progress())
    rec.stop = notice  # the notice a trainer is built with
    with pytest.raises(Preempted) as info:
        rec.fit(rec)
    assert info.value.iteration == 15 and info.value.reason == "SIGTERM" and info.value.exit_code == 6
    # 15 is no multiple of checkpoint_every (20): the stop makes its own checkpoint, after the log
    assert [c.iteration for c in rec.checkpoints] == [15] and rec.logs[-1]["iter"] == 15
    assert [e["iter"] for e in rec.evals] == [10]


def test_a_stop_asked_at_the_last_iteration_just_finishes():
    notice = AskedNotice()
    rec = recorder(SignalledStep(notice, 43, signal.SIGUSR1), Progress())  # a signal during the last 5 iterations
    rec.stop = notice
    progress = rec.fit(rec)  # 45 iterations; log points 5, 10, ..., 40, 45
    assert progress.iteration == CADENCE.total == 45 and rec.checkpoints[-1].iteration == 45
    asked = notice.asked
    assert asked == list(range(5, 45, 5))  # not asked at the end: the run is complete, not stopped


def test_a_run_resumed_at_its_end_does_nothing():
    step = FakeStep(start=45)
    rec = run(step, Progress(iteration=45))
    assert step.seen == [] and rec.logs == rec.evals == rec.checkpoints == [] and rec.progress.last_eval is None


def test_the_bar_moves_between_log_points_from_the_host_counter_without_draining(monkeypatch):
    """One log point (the end) 200 slow steps away: the bar still moves, by the iteration count
    the host has reached, and the step is drained (a device sync) only at the log point. It used
    to sit still until the first log point."""
    import time

    from resnetdist.training import bar as bar_module
    from resnetdist.training import trainer

    moves = []

    class SeenBar(bar_module.RunBar):
        every_s = 0.05

        def to(self, it):
            moves.append(it)
            super().to(it)

    class SlowStep(FakeStep):
        drains = 0

        def __call__(self, *batch):
            time.sleep(0.005)
            super().__call__(*batch)

        def drain(self):
            self.drains += 1
            return super().drain()

    monkeypatch.setattr(trainer, "RunBar", SeenBar)
    step = SlowStep()
    run(step, Progress(), cadence=Cadence(total=200, log_every=200, eval_every=200, checkpoint_every=200))
    assert step.drains == 1
    between = [m for m in moves if 0 < m < 200]
    assert len(between) >= 5 and between == sorted(between), moves
