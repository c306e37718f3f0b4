"""What `reproduce` shows while its runs train, read from their run folders (rundir.Latest and
metrics.jsonl), never from the runs' output: on a terminal one bar per running run under the
suite's own lines, redrawn about once a second, each evaluation as a line above them; in a pipe
or a file no bar, each evaluation as a line, and a line of where a run stands when it has said
nothing for QUIET_S. Plain functions make the lines; `Watch` decides when to read and write.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO

from ..progress import columns, duration
from ..rundir import Latest, RunDir
from .discover import read_metrics

EVERY_S = 1.0  # the run folders are read (and the bars redrawn) at most this often
QUIET_S = 60.0  # off a terminal: a run quiet this long gets a line of where it stands
BAR_MAX = 30  # the bar's own width at most, in characters


def evaluation_line(name: str, record: dict[str, Any], total: int) -> str:
    """`resnet20-s0  eval at 400/2,000  train err 35.20%  test err 40.10%`"""
    return f"{name}  eval at {record['iter']:,}/{total:,}  " + "  ".join(
        f"{k.removesuffix('_error')} err {record[k]:.2f}%" for k in ("train_error", "val_error", "test_error")
        if record.get(k) is not None)


def time_left(latest: Latest, total: int, rate: float | None) -> str:
    """About how long the run has to go, at `rate` (s/iteration), else at its newest
    evaluation's rate; "" when nothing is measured yet."""
    rate = rate or latest.seconds_per_iteration()
    it = latest.iteration or 0
    return f"~{duration(rate * (total - it))} left" if rate and it < total else ""


def progress_line(name: str, latest: Latest, total: int, rate: float | None) -> str:
    """`resnet20-s0  iteration 300 of 2,000 (15%), train err 61.0%, ~4 min left` (off a terminal)."""
    it = latest.iteration or 0
    parts = [f"{name}  iteration {it:,} of {total:,} ({100 * it / max(total, 1):.0f}%)"]
    if latest.training and latest.training.get("train_error") is not None:
        parts.append(f"train err {latest.training['train_error']:.1f}%")
    if left := time_left(latest, total, rate):
        parts.append(left)
    return ", ".join(parts)


def bar_line(name: str, latest: Latest, total: int, rate: float | None, width: int, name_width: int = 0) -> str:
    """One running run as a bar, at most `width` - 1 characters (a line that wraps would break
    the redraw): `resnet20-s0   15% |####      | 300/2,000  err 61.0% test 58.20%  ~4 min left`.
    The name and the count are kept; the bar, then the errors, then the time left give way."""
    it = latest.iteration
    if it is None:
        return f"{name:<{name_width}}  starting"[: width - 1]
    pct = 100 * it / max(total, 1)
    head = f"{name:<{name_width}} {pct:3.0f}% "
    count = f" {it:,}/{total:,}"
    train = (latest.training or {}).get("train_error")
    test = (latest.evaluation or {}).get("test_error")
    left = time_left(latest, total, rate)
    tail = ((f"  train err {train:.1f}%" if train is not None else "") + (f" test {test:.1f}%" if test is not None else "")
            + (f"  {left}" if left else ""))
    room = width - 1 - len(head) - len(count) - len(tail) - 2
    if room < 8:  # a narrow terminal: the errors and time go before the bar does
        tail, room = "", width - 1 - len(head) - len(count) - 2
    if room < 4:
        return (head + count.strip())[: width - 1]
    size = min(BAR_MAX, room)
    filled = int(size * min(it, total) / max(total, 1))
    return f"{head}|{'#' * filled}{' ' * (size - filled)}|{count}{tail}"[: width - 1]


@dataclass
class Watched:
    """A running run as the Watch follows it."""
    name: str
    run: RunDir
    total: int
    evaluated: int  # the newest evaluation already shown (or there before the run started)
    said_s: float  # when a line last said where this run is
    latest: Latest = field(default_factory=lambda: Latest(None, None))
    first: tuple[int, float] | None = None  # (iteration, time) first seen: the rate is measured from there

    def rate(self, now: float) -> float | None:
        """Seconds per iteration since this command first saw the run train (its own pace now,
        whatever an earlier attempt did)."""
        it = self.latest.iteration
        if self.first is None or it is None or it <= self.first[0]:
            return None
        return (now - self.first[1]) / (it - self.first[0])


class Watch:
    """The suite's output while runs train: `say` a line, `add`/`remove` a run as it starts and
    ends, `poll` often (it reads the folders at most every `every_s`), `close` at the end.
    `bars`: the terminal to draw bars on (None: in a pipe, lines only)."""

    def __init__(self, echo: Callable[[str], None], bars: TextIO | None = None, every_s: float = EVERY_S,
                 quiet_s: float = QUIET_S, clock: Callable[[], float] = time.monotonic):
        self.echo, self.bars, self.every_s, self.quiet_s, self.clock = echo, bars, every_s, quiet_s, clock
        self.runs: dict[str, Watched] = {}
        self.drawn = 0  # bar lines on the screen below the last line said
        self.next_s = 0.0

    def say(self, line: str) -> None:
        self._clear()
        self.echo(line)
        self._draw()

    def add(self, name: str, run: RunDir, total: int) -> None:
        shown = max((r["iter"] for r in read_metrics(run.metrics)), default=0)  # a resumed run's earlier ones
        self.runs[name] = Watched(name, run, total, shown, self.clock())
        self.next_s = 0.0  # its bar at once

    def remove(self, name: str) -> None:
        """The run ended: its last evaluations are shown, its bar goes."""
        if name in self.runs:
            self._read(self.runs[name], self.clock())
            del self.runs[name]
            self._clear()
            self._draw()

    def poll(self) -> None:
        now = self.clock()
        if now < self.next_s:
            return
        self.next_s = now + self.every_s
        for watched in list(self.runs.values()):
            self._read(watched, now)
            if self.bars is None and now - watched.said_s >= self.quiet_s and watched.latest.iteration is not None:
                watched.said_s = now
                self.echo(progress_line(watched.name, watched.latest, watched.total, watched.rate(now)))
        self._clear()
        self._draw()

    def close(self) -> None:
        self._clear()
        self.runs.clear()

    def _read(self, watched: Watched, now: float) -> None:
        """The run's newest records; its new evaluations said as lines."""
        watched.latest = Latest.of(watched.run)
        it = watched.latest.iteration
        if it is not None and (watched.first is None or it < watched.first[0]):
            watched.first = (it, now)
        if watched.latest.evaluation and watched.latest.evaluation["iter"] > watched.evaluated:
            for record in read_metrics(watched.run.metrics):
                if record["iter"] > watched.evaluated:
                    watched.evaluated, watched.said_s = record["iter"], now
                    self._clear()
                    self.echo(evaluation_line(watched.name, record, watched.total))

    def _clear(self) -> None:
        if self.bars is not None and self.drawn:
            # to the first bar's line, then erase to the end of the screen
            self.bars.write(f"\x1b[{self.drawn}F\x1b[J")
            self.bars.flush()
            self.drawn = 0

    def _draw(self) -> None:
        if self.bars is None or not self.runs:
            return
        now, width = self.clock(), columns()
        name_width = max(len(name) for name in self.runs)
        lines = [bar_line(w.name, w.latest, w.total, w.rate(now), width, name_width) for w in self.runs.values()]
        self.bars.write("".join(line + "\n" for line in lines))
        self.bars.flush()
        self.drawn = len(lines)
