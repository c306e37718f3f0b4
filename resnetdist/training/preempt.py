"""Preemption notices: SIGTERM (Kubernetes, `scancel`, torchrun passing its own on) and SIGUSR1
(Slurm's `--signal=USR1@120` warning) ask the run to stop at a checkpoint; so does a person's
first Ctrl-C (SIGINT, exit 130 instead of 6). A second Ctrl-C stops at once (KeyboardInterrupt,
no checkpoint for that stop: the newest one on disk is where the run resumes).

The handler only notes the signal: raising from it (as Python's default SIGINT handler does)
would unwind whatever the main thread was doing, a checkpoint write included. The loop asks at
its log points, where the ranks already meet: the signal numbers are all-reduced (max), so a
signal that reached one rank stops every rank at the same iteration, and no step pays for it.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

from .. import dist
from .bar import RunBar

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Notice:
    """The first preemption signal this process received (0: none yet)."""

    def __init__(self) -> None:
        self.signum = 0
        self.interrupted = False  # a Ctrl-C came

    def note(self, signum: int, _frame=None) -> None:
        if self.interrupted and signum in (signal.SIGINT, signal.SIGTERM):
            # a person pressing Ctrl-C again wants out now, not at a checkpoint; torchrun passes a
            # second Ctrl-C on as SIGTERM (its shutdown, interrupted, starts over with SIGTERM)
            raise KeyboardInterrupt
        if signum == signal.SIGINT and not self.interrupted:
            acknowledge()
        self.interrupted = self.interrupted or signum == signal.SIGINT
        self.signum = self.signum or signum  # the first one names the stop; repeated notices change nothing

    def agreed(self, it: int) -> str:
        """The signal any rank received, by name ("" for none): the same answer on every rank.
        A collective: every rank must ask at the same iterations (the loop's log points)."""
        with dist.stage(f"stop agreement at iteration {it}"):
            signum = dist.all_reduce_max(self.signum)
        return signal.Signals(signum).name if signum else ""


def acknowledge() -> None:
    """A person's first Ctrl-C answered at once (rank 0): where the run will stop, about when,
    and that a second one stops now. The stop itself waits for the loop's next log point, which
    may be minutes away on a slow machine; without a word a person presses again and loses the
    checkpoint. Written with os.write, which is safe in a signal handler (print is not: it may
    interrupt a print of the main thread), after clearing the bar's line on a terminal."""
    if dist.launch_rank() != 0:
        return
    bar = RunBar.active
    where = (bar.stopping() if bar is not None else "") or "stopping at the next log point to write a checkpoint"
    clear = "\r\x1b[K" if os.isatty(2) else ""
    try:
        os.write(2, f"{clear}{where}; Ctrl-C again to stop now, without a checkpoint\n".encode())
    except OSError:  # stderr closed: the stop goes on without the line
        pass


@contextmanager
def notice(install: bool = True) -> Iterator[Notice]:
    """Note SIGTERM, SIGUSR1 and a first SIGINT while the block runs; the previous handlers come
    back after, unless a signal came (see the end). Nothing is noted off the main thread (where
    Python cannot install handlers) or with install=False (resnetdist.train, unless asked: a
    Ctrl-C is then the interpreter's KeyboardInterrupt)."""
    found = Notice()
    if not install or threading.current_thread() is not threading.main_thread():
        yield found
        return
    previous = {s: signal.signal(s, found.note) for s in SIGNALS}
    try:
        yield found
    finally:
        if not found.signum:
            for s, handler in previous.items():
                signal.signal(s, handler)
        else:  # the stop is decided: a repeated signal (schedulers and people send more than one)
            # must not kill the process while it reports the stop, nor during the interpreter's
            # shutdown, which drops Python-level handlers (a repeated SIGTERM then ended the
            # process as -15 instead of its exit code 6); a second Ctrl-C still stops at once
            for s in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(s, signal.SIG_IGN)
