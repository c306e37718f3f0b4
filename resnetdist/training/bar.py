"""The bar of a training run (RunBar): Trainer.fit moves it, preempt.py asks it where a run
would stop."""

from __future__ import annotations

import sys
import time
from typing import Callable

from tqdm.auto import tqdm

from ..progress import NARROW, columns, duration, plural, progress_bar

# the loss first: a narrow terminal cuts the timing at the end, never the loss
RUN_BAR_FORMAT = "{desc}{postfix} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]"
# under 80 columns: the time left kept, the elapsed time and rate dropped, the loss shortened (show)
NARROW_BAR_FORMAT = "{desc}{postfix} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{remaining} left]"


class RunBar:
    """A training run's bar. It moves from the host-side iteration counter (tick: at most once per
    `every_s`, a clock read per step, never a device sync), shows the loss last drained at a log
    point (show), and prints lines above itself (write) so they never break it. On other ranks it
    prints nothing; off a terminal write() is a plain print and there is no bar.

    It knows where the run would stop if asked now (`next_stop`: Cadence.next_stop), so the first
    Ctrl-C is answered at once (`stopping`, from the signal handler through `RunBar.active`), and
    it says, once, when the training is over and the final evaluation and saving run."""

    active: "RunBar | None" = None  # the bar on the terminal (one run per process)
    every_s = 1.0  # the bar moves at most this often

    def __init__(self, desc: str, total: int, start: int, main: bool, next_stop: Callable[[int], int]):
        self.main, self.total, self.start, self.next_stop = main, total, start, next_stop
        self.said_done = False  # "iteration N done: ..." printed (a disabled tqdm bar keeps no count to ask)
        narrow = columns() < NARROW
        self.bar = progress_bar(desc, total=total, enabled=main, initial=start,
                                bar_format=NARROW_BAR_FORMAT if narrow else RUN_BAR_FORMAT)
        self.t0 = time.monotonic()
        self.next_s = self.t0 + self.every_s
        self.latest = start  # the newest iteration done (the bar itself moves once a second)
        self.stop_at = 0  # the iteration a Ctrl-C stops at (0: none asked)
        self.measured = False  # the estimate measured at the first log point was printed
        RunBar.active = self

    def tick(self, it: int) -> None:
        self.latest = it
        now = time.monotonic()
        if now >= self.next_s:
            self.next_s = now + self.every_s
            self.to(it)

    def to(self, it: int) -> None:
        self.latest = max(self.latest, it)
        if it > self.bar.n:
            self.bar.update(it - self.bar.n)
        if it >= self.total and not self.said_done:
            self.said_done = True
            self.write(f"iteration {self.total:,} done: final evaluation, checkpoint, model.pt ...")

    def seconds_per_iteration(self) -> float | None:
        done = self.latest - self.start
        return (time.monotonic() - self.t0) / done if done > 0 else None

    def show(self, loss: float, error: float) -> None:
        text = f"loss {loss:.3f} err {error:.1f}%" if columns() >= NARROW else f"{loss:.2f} {error:.0f}%"
        if self.stop_at:
            text = f"{'finishing' if self.stop_at >= self.total else 'stopping'} at {self.stop_at:,}"
        self.bar.set_postfix_str(text, refresh=False)
        rate = self.seconds_per_iteration()
        if not self.measured and rate is not None and self.latest < self.total and not self.stop_at:
            # once, at the first log point: the time left at this run's own measured rate
            self.write(f"measured {rate:.3g} s/iteration ({self.start + 1:,}-{self.latest:,}): "
                       f"{duration(rate * (self.total - self.latest))} to go, evaluations apart")
        self.measured = True

    def stopping(self) -> str:
        """The line for a first Ctrl-C: where the run will stop and about when. When the next point
        the loop checks is the run's end, the run is not stopped early there: it finishes (final
        evaluation, model.pt), and the line says so. Called from a signal handler, so it changes
        only plain attributes; the caller writes the line."""
        self.stop_at = min(self.total, self.next_stop(self.latest))
        rate = self.seconds_per_iteration()
        left = self.stop_at - self.latest
        when = f" (about {duration(rate * left)})" if rate else f" ({plural(left, 'iteration')} away)"
        ends = self.stop_at >= self.total
        # an attribute, drawn at the next tick
        self.bar.set_postfix_str(f"{'finishing' if ends else 'stopping'} at {self.stop_at:,}", refresh=False)
        if ends:
            return f"the run's next stop is its end, iteration {self.total:,}{when}: it finishes there (final evaluation, model.pt)"
        return f"stopping at iteration {self.stop_at:,} to write a checkpoint{when}"

    def write(self, line: str) -> None:
        if not self.main:
            return
        if self.bar.disable:
            print(line, flush=True)
        else:
            tqdm.write(line, file=sys.stdout)  # clears the bar, prints, draws the bar again below

    def close(self) -> None:
        self.bar.close()
        if RunBar.active is self:
            RunBar.active = None
