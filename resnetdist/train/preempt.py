"""Preemption notices: SIGTERM (Kubernetes, `scancel`, torchrun passing its own on) and SIGUSR1
(Slurm's `--signal=USR1@120` warning) ask the run to stop at a checkpoint.

The handler only notes the signal. Raising from it (as Python's default SIGINT handler does)
would unwind whatever the main thread was doing, a checkpoint write included; a flag cannot
interrupt anything, so a second signal during the save is harmless. The loop asks at its log
points, where the ranks already meet for the metric all-reduce; there the ranks all-reduce
the signal numbers (max), so a signal that reached one rank stops every rank at the same
iteration, and no step pays for the check.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

from .. import dist
from ..errors import Preempted

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Notice:
    """The first preemption signal this process received (0: none yet)."""

    def __init__(self) -> None:
        self.signum = 0

    def note(self, signum: int, _frame=None) -> None:
        self.signum = self.signum or signum  # the first one names the stop; repeats change nothing

    def agreed(self, it: int) -> str:
        """The signal any rank received, by name ("" for none): the same answer on every rank.
        A collective: every rank must ask at the same iterations (the loop's log points)."""
        with dist.stage(f"stop agreement at iteration {it}"):
            signum = dist.all_reduce_max(self.signum)
        return signal.Signals(signum).name if signum else ""


@contextmanager
def notice() -> Iterator[Notice]:
    """Note SIGTERM and SIGUSR1 while the block runs; the previous handlers come back after,
    unless a signal came: then the process is on its way out to report the stop, and a repeated
    signal (schedulers and people send more than one) must not kill it first, so they stay
    noted. Off the main thread (where Python cannot install handlers) nothing is noted."""
    found = Notice()
    if threading.current_thread() is not threading.main_thread():
        yield found
        return
    previous = {s: signal.signal(s, found.note) for s in SIGNALS}
    try:
        yield found
    finally:
        if not found.signum:
            for s, handler in previous.items():
                signal.signal(s, handler)
