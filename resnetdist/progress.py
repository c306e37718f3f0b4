"""Progress bars for long work: shown on an interactive terminal, silent otherwise."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(desc: str, total: int | None = None, unit: str = "it", enabled: bool = True):
    """A tqdm bar that stays quiet when stderr is not a terminal (CI, logs, other ranks)."""
    return tqdm(
        desc=desc,
        total=total,
        unit=unit,
        unit_scale=unit == "B",
        disable=not (enabled and sys.stderr.isatty()),
        dynamic_ncols=True,
        leave=False,
    )
