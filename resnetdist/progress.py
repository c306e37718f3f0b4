"""Progress bars for long work: shown on an interactive terminal, silent otherwise."""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


def progress_bar(desc: str, total: int | None = None, unit: str = "it", enabled: bool = True, **kwargs):
    """A tqdm bar that stays quiet when stderr is not a terminal (CI, logs, other ranks)."""
    return tqdm(
        desc=desc,
        total=total,
        unit=unit,
        unit_scale=unit == "B",
        disable=not (enabled and sys.stderr.isatty()),
        dynamic_ncols=True,
        leave=False,
        **kwargs,
    )


# the loss first: a narrow terminal cuts the timing at the end, never the loss
RUN_BAR_FORMAT = "{desc}{postfix} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]"


class RunBar:
    """A training run's bar. It moves from the host-side iteration counter (tick: at most once
    per `every_s`, a clock read per step, never a device sync), shows the loss last drained at
    a log point (show), and prints lines above itself (write) so they never break it. On other
    ranks it prints nothing; off a terminal write() is a plain print and there is no bar."""

    def __init__(self, desc: str, total: int, start: int, main: bool, every_s: float = 1.0):
        self.main, self.every_s = main, every_s
        self.bar = progress_bar(desc, total=total, enabled=main, bar_format=RUN_BAR_FORMAT, initial=start)
        self.next_s = time.monotonic() + every_s

    def tick(self, it: int) -> None:
        now = time.monotonic()
        if now >= self.next_s:
            self.next_s = now + self.every_s
            self.to(it)

    def to(self, it: int) -> None:
        if it > self.bar.n:
            self.bar.update(it - self.bar.n)

    def show(self, loss: float, error: float) -> None:
        self.bar.set_postfix_str(f"loss {loss:.3f} err {error:.1f}%", refresh=False)

    def write(self, line: str) -> None:
        if not self.main:
            return
        if self.bar.disable:
            print(line, flush=True)
        else:
            tqdm.write(line, file=sys.stdout)  # clears the bar, prints, draws the bar again below

    def close(self) -> None:
        self.bar.close()
