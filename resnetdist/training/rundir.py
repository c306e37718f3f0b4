"""One run directory, one run: an OS lock on RUN_DIR/.lock held by the process that trains.

`acquire` takes an exclusive `fcntl.flock` on the lock file. The kernel drops it when the
holder's file descriptor closes, which includes any death of the process (SIGKILL, OOM kill,
node reboot), so a dead run never leaves a lock that blocks the next launch and there is no
stale-lock guessing. The pid, host, start time and command written into the file are for the
refusal message only; the lock itself is the flock. The file is never deleted (deleting a
lock file races with a process that has just opened it).

Who holds it: rank 0 (or the single process), from before anything in the directory is
written until training returns. A launcher (`resnetdist train --nproc-per-node N`) only
probes with `check_free`, a non-blocking shared lock released at once, so it refuses a busy
directory before torchrun starts yet never blocks its own rank 0.

The descriptor is close-on-exec, so programs the trainer starts (W&B's service, compile
workers) do not inherit the lock. A child that was fork()ed without exec would share it; the
message then says the recorded pid has exited.

flock works on local file systems and on NFS v4 (Linux emulates it with a byte-range lock
there); on file systems without working locks every launch will see a free directory.

What may change between a run directory's restarts (a run directory holds one experiment) is
a policy of the configuration, not of the lock: config.check_same_experiment.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from ..checkpoint import WriteError, remove_stale_temps
from ..errors import RunDirBusy

LOCK_NAME = ".lock"


class RunLock:
    """A held run-directory lock; `release()` (or the end of the process) lets it go."""

    def __init__(self, run_dir: Path, fd: int):
        self.run_dir, self.fd = Path(run_dir), fd

    @property
    def held(self) -> bool:
        return self.fd >= 0

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_path(run_dir: Path) -> Path:
    return Path(run_dir) / LOCK_NAME


def acquire(run_dir: Path) -> RunLock:
    """Create the run directory if needed and hold its lock, or raise RunDirBusy naming the
    holder. Temporary files left by a killed writer are removed: we are the only writer now."""
    run_dir = Path(run_dir)
    path = lock_path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise WriteError(path, e) from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirBusy(busy_message(run_dir)) from None
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    except OSError as e:  # a full disk: the lock is held, but say so rather than train on
        os.close(fd)
        raise WriteError(path, e) from e
    remove_stale_temps(run_dir)
    return RunLock(run_dir, fd)


def check_free(run_dir: Path) -> None:
    """Raise RunDirBusy if a live process holds the run directory; create nothing."""
    try:
        fd = os.open(lock_path(run_dir), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:  # no lock file yet (or no directory): nobody has ever held it
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: probes never block each other
    except BlockingIOError:
        raise RunDirBusy(busy_message(run_dir)) from None
    finally:
        os.close(fd)


def holder(run_dir: Path) -> dict | None:
    """What the current (or last) holder wrote into the lock file, if readable."""
    try:
        info = json.loads(lock_path(run_dir).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def busy_message(run_dir: Path) -> str:
    info = holder(run_dir)
    if not info:  # the holder has taken the lock but not yet written its details
        who = "another process"
    else:
        who = f"pid {info.get('pid')} on host {info.get('host')}, started {info.get('started')}"
        if info.get("host") == socket.gethostname() and not _alive(info.get("pid")):
            who += f" (pid {info.get('pid')} has exited; a process it forked still holds the lock)"
    return (f"run directory {run_dir} is in use by another run ({who}); "
            f"wait for it to end or stop it, or pass another --out")


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True
    return True
