"""Progress bars for long work: shown on an interactive terminal, silent otherwise; a time span
and a count in words."""

from __future__ import annotations

import shutil
import sys

from tqdm.auto import tqdm


def progress_bar(desc: str, total: int | None = None, unit: str = "it", enabled: bool = True, **kwargs):
    """A tqdm bar that stays quiet when stderr is not a terminal (CI, logs, other ranks)."""
    return tqdm(desc=desc, total=total, unit=unit, unit_scale=unit == "B", dynamic_ncols=True, leave=False,
                disable=not (enabled and sys.stderr.isatty()), **kwargs)


NARROW = 80


def columns() -> int:
    return shutil.get_terminal_size((NARROW, 24)).columns


def duration(seconds: float) -> str:
    """A time span in words: "42 s", "17 min", "2 h 05 min" (estimates, the bar, summaries)."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    hours, minutes = divmod(seconds // 60, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min"


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"
