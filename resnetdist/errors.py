"""The failures `resnetdist` reports and the exit code of each: one table (README, "Faults and
bad inputs"); cli.py turns an error into one line on stderr and its code. ConfigError lives in
config.py, which imports nothing of the package.
"""

from __future__ import annotations

from pathlib import Path

from .config import ConfigError

FAILED = 1  # a suite run failed, a doctor check failed, or an unexpected error
BAD_INPUT = 2  # a configuration, data file or argument is wrong; nothing was started
NON_FINITE = 3
WRITE_FAILED = 4
RUN_DIR_BUSY = 5
PREEMPTED = 6  # not a failure: the scheduler's notice was obeyed, a checkpoint written
PEER_LOST = 7
GRAPH_UNAVAILABLE = 8  # train.step = graph asked for by name, and its capture failed: nothing trained
INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, the shell's convention): a run's first one stops it at a checkpoint


class DataError(Exception):
    """A data file is missing, truncated or corrupt; the message names it."""

    exit_code = BAD_INPUT


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""

    exit_code = NON_FINITE


class WriteError(RuntimeError):
    """A file of the run could not be written; the message names it and the OS error."""

    exit_code = WRITE_FAILED

    def __init__(self, path: Path, error: OSError):
        self.path, self.error = Path(path), error
        reason = f"[Errno {error.errno}] {error.strerror}" if error.errno else str(error)
        super().__init__(f"could not write {path}: {reason}")


class CheckpointError(RuntimeError):
    """A file given as a checkpoint is missing, unreadable or not one of ours; the message
    names it (`eval` and `export` print it as one line)."""

    exit_code = BAD_INPUT


class RunDirBusy(RuntimeError):
    """Another live process holds the run directory; the message names it."""

    exit_code = RUN_DIR_BUSY


class Preempted(Exception):
    """The run stopped on a signal after writing a checkpoint at `iteration`."""

    exit_code = PREEMPTED

    def __init__(self, iteration: int, reason: str):
        self.iteration, self.reason = iteration, reason
        if reason == "SIGINT":  # a person's Ctrl-C at the terminal, not a scheduler's notice
            self.exit_code = INTERRUPTED
        super().__init__(f"stopped on {reason} at iteration {iteration}, after writing its checkpoint; "
                         f"run the same command again to resume")


class PeerLost(RuntimeError):
    """A collective failed or timed out: another rank hung, was stopped or died."""

    exit_code = PEER_LOST


class GraphUnavailable(RuntimeError):
    """train.step = graph was asked for by name and the CUDA graph could not be captured; the
    run stops before its first training step (auto would have run the eager step)."""

    exit_code = GRAPH_UNAVAILABLE
