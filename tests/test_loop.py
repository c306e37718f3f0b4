"""The iteration loop with a fake step: its cadence (log, evaluate, checkpoint), the NaN stop,
the stop the ranks agreed on (a preemption notice), and resuming from a checkpoint's progress,
in-process and in milliseconds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from resnetdist.train.loop import Cadence, Feed, Hooks, NonFiniteLoss, Progress, train_loop
from resnetdist.train.preempt import Preempted

BATCH = 4


class FakeLoader:
    def __init__(self):
        self.starts = []

    def batches(self, start_iter: int, out=None):
        self.starts.append(start_iter)
        it = start_iter
        while True:
            yield torch.full((BATCH, 3, 32, 32), it % 256, dtype=torch.uint8), torch.zeros(BATCH, dtype=torch.long)
            it += 1


class FakeStep:
    """Loss of iteration i (1-based) = losses.get(i, 1 / i); one wrong answer per step."""

    def __init__(self, start: int = 0, losses: dict[int, float] | None = None):
        self.it, self.losses = start, losses or {}
        self.stats, self.bad = np.zeros(3), -1
        self.seen = []  # (iteration, first pixel) of every call: which batch came when

    def __call__(self, images, labels, aug):
        self.it += 1
        self.seen.append((self.it, int(images[0, 0, 0, 0])))
        loss = self.losses.get(self.it, 1.0 / self.it)
        if not math.isfinite(loss) and self.bad < 0:
            self.bad = self.it - 1
        self.stats += [loss * BATCH, 1, BATCH]

    def drain(self):
        stats, self.stats = self.stats, np.zeros(3)
        return stats, self.bad

    def lr_of(self, it: int) -> float:
        return 0.1 if it <= 30 else 0.01


class Recorder:
    def __init__(self, stop_at: int | None = None):
        self.logs, self.evals, self.checkpoints, self.marks = [], [], [], []
        at = {7: self.marks.append}
        if stop_at is not None:
            at[stop_at] = self.crash
        self.hooks = Hooks(evaluate=lambda: {"test_error": 50.0}, log=self.log, checkpoint=self.save, at_iteration=at)

    def log(self, record, kind):
        (self.evals if kind == "eval" else self.logs).append(record)

    def save(self, progress: Progress):
        self.checkpoints.append(Progress(progress.iteration, progress.train_seconds, progress.window.copy()))

    def crash(self, it):
        raise KeyboardInterrupt(f"stopped at {it}")


CADENCE = Cadence(total=45, log_every=5, eval_every=10, checkpoint_every=20)


def run(step, progress, recorder, loader=None, cadence=CADENCE):
    feed = Feed(loader or FakeLoader(), seed=0, global_batch=BATCH)
    return train_loop(step, feed, progress, cadence, recorder.hooks, steps_per_epoch=10)


def test_next_stop_and_due():
    assert CADENCE.next_stop(0) == 5 and CADENCE.next_stop(5) == 10 and CADENCE.next_stop(44) == 45
    assert CADENCE.next_stop(0, extra=(3, 40)) == 3 and CADENCE.next_stop(3, extra=(3,)) == 5
    assert CADENCE.due(20) == (True, True, True) and CADENCE.due(15) == (True, False, False)
    assert CADENCE.due(45) == (True, True, True)  # the last iteration does everything


def test_cadence_of_logs_evaluations_and_checkpoints():
    step, rec, loader = FakeStep(), Recorder(), FakeLoader()
    progress = run(step, Progress(), rec, loader)
    assert [it for it, _ in step.seen] == list(range(1, 46))
    assert [px for _, px in step.seen] == list(range(45))  # batch i at iteration i + 1
    assert loader.starts == [0]
    assert [r["iter"] for r in rec.logs] == [5, 10, 15, 20, 25, 30, 35, 40, 45]
    assert [r["iter"] for r in rec.evals] == [10, 20, 30, 40, 45]
    assert [c.iteration for c in rec.checkpoints] == [20, 40, 45]
    assert rec.marks == [7]
    assert progress.iteration == 45 and progress.last_eval == rec.evals[-1] and progress.train_seconds > 0
    first = rec.evals[0]
    assert first["train_loss"] == pytest.approx(np.mean([1 / i for i in range(1, 11)]))
    assert first["train_error"] == pytest.approx(100 / BATCH) and first["epoch"] == 1.0 and first["lr"] == 0.1
    assert rec.evals[-1]["lr"] == 0.01 and rec.evals[-1]["test_error"] == 50.0
    assert rec.logs[0]["train_loss"] == pytest.approx(np.mean([1 / i for i in range(1, 6)]))


def test_non_finite_loss_stops_before_the_next_checkpoint():
    step, rec = FakeStep(losses={13: float("nan")}), Recorder()
    with pytest.raises(NonFiniteLoss, match=r"NaN or inf at iteration 13 \(checked at 15\)"):
        run(step, Progress(), rec)
    assert [c.iteration for c in rec.checkpoints] == []  # the first is due at 20
    assert [r["iter"] for r in rec.logs] == [5, 10] and len(step.seen) == 15


def test_resume_from_a_checkpoint_gives_the_same_records():
    """Interrupted after iteration 27, resumed from the checkpoint at 20: the records from 20 on
    are those of the uninterrupted run (timing aside), and the batches follow on."""
    whole = Recorder()
    run(FakeStep(), Progress(), whole)

    cut = Recorder(stop_at=27)
    with pytest.raises(KeyboardInterrupt):
        run(FakeStep(), Progress(), cut)
    saved = cut.checkpoints[-1]
    assert saved.iteration == 20
    step, resumed, loader = FakeStep(start=20), Recorder(), FakeLoader()
    run(step, saved, resumed, loader)
    assert loader.starts == [20] and step.seen[0] == (21, 20)

    def strip(records):
        return [{k: v for k, v in r.items() if k not in ("train_seconds", "images_per_second")} for r in records]

    assert strip(cut.evals[:2] + resumed.evals) == strip(whole.evals)
    assert strip(resumed.logs) == strip(whole.logs[4:])


def test_the_loop_checkpoints_where_the_ranks_agreed_to_stop_and_raises_preempted():
    rec = Recorder()
    rec.hooks.stop_reason = lambda it: "SIGTERM" if it >= 15 else ""
    with pytest.raises(Preempted) as info:
        run(FakeStep(), Progress(), rec)
    assert info.value.iteration == 15 and info.value.reason == "SIGTERM" and info.value.exit_code == 6
    # 15 is no multiple of checkpoint_every (20): the stop makes its own checkpoint, after the log
    assert [c.iteration for c in rec.checkpoints] == [15] and rec.logs[-1]["iter"] == 15
    assert [e["iter"] for e in rec.evals] == [10]


def test_a_stop_asked_at_the_last_iteration_just_finishes():
    rec, asked = Recorder(), []

    def stop_reason(it: int) -> str:
        asked.append(it)
        return "SIGUSR1" if it == 45 else ""  # a signal noted during the last 5 iterations

    rec.hooks.stop_reason = stop_reason
    progress = run(FakeStep(), Progress(), rec)  # 45 iterations; log points 5, 10, ..., 40, 45
    assert progress.iteration == CADENCE.total == 45 and rec.checkpoints[-1].iteration == 45
    assert asked == list(range(5, 45, 5))  # not asked at the end: the run is complete, not stopped


def test_a_run_resumed_at_its_end_does_nothing():
    step, rec = FakeStep(start=45), Recorder()
    progress = run(step, Progress(iteration=45), rec)
    assert step.seen == [] and rec.logs == rec.evals == rec.checkpoints == [] and progress.last_eval is None


def test_the_bar_moves_between_log_points_from_the_host_counter_without_draining(monkeypatch):
    """One log point (the end) 200 slow steps away: the bar still moves, by the iteration count
    the host has reached, and the step is drained (a device sync) only at the log point. It used
    to sit still until the first log point."""
    import time

    from resnetdist import progress as progress_module
    from resnetdist.train import loop

    moves = []

    class SeenBar(progress_module.RunBar):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "every_s": 0.05})

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

    monkeypatch.setattr(loop, "RunBar", SeenBar)
    step = SlowStep()
    run(step, Progress(), Recorder(), cadence=Cadence(total=200, log_every=200, eval_every=200, checkpoint_every=200))
    assert step.drains == 1
    between = [m for m in moves if 0 < m < 200]
    assert len(between) >= 5 and between == sorted(between), moves
