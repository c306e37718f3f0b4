"""One run's folder: its layout, its lock, its checkpoints and where it stands. Every module
that reads or writes a run folder asks a `RunDir`; no other spells a file name of the folder
(docs/run-directory.md lists them). A RunDir holds no state but its path.

The lock: an exclusive `fcntl.flock` on .lock, which the kernel drops when the holder's
descriptor closes, whatever kills the process: no stale locks, no guessing. The pid, host,
start and command written into it are for messages only; the file is never deleted (that races
with a process that has just opened it). Rank 0 holds it from before anything is written until
training returns; a launcher and `runs` only probe it (a shared, non-blocking flock released at
once). flock works on local file systems and NFS v4; where locks do not work, every probe sees
a free folder.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .checkpoint import SIDECAR, atomic_save, atomic_write_json, atomic_write_text, load
from .config import RunConfig, dumps_toml, from_dict, read_toml, to_toml
from .errors import INTERRUPTED, PREEMPTED, RunDirBusy, WriteError

CHECKPOINT = re.compile(r"ckpt_(\d+)\.pt$")
EXIT_LINE = re.compile(r"^=== .* exit code (-?\d+)$")  # what a suite appends to train.log after a run
STATES = ("fresh", "resumable", "running", "stopped", "failed", "finished")


@dataclass(frozen=True)
class RunState:
    """Where a run folder stands (RunDir.state), `kind` one of STATES. fresh: nothing trained;
    resumable: nothing says why it ended (a kill, a crash), `checkpoint` to continue from (None:
    starts over); running: a live process holds the lock (`holder`); stopped: by a Ctrl-C or a
    preemption notice; failed: the log ends with an error or a non-zero exit code; finished."""

    kind: str
    iteration: int | None = None  # running: newest metrics record; others: the newest checkpoint's
    checkpoint: Path | None = None
    holder: dict[str, Any] | None = None
    exit_code: int | None = None
    last_line: str = ""
    summary: dict[str, Any] | None = None


class RunLock:
    """A held run-directory lock; `release()` (or the end of the process) lets it go."""

    def __init__(self, fd: int):
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @classmethod
    def take(cls, folder: Path, path: Path) -> RunLock:
        """The exclusive flock on `path` (close-on-exec), the holder's details written into it."""
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise WriteError(path, e) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirBusy(busy_message(folder, path)) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except OSError as e:  # a full disk: the lock is held, but say so rather than train on
            os.close(fd)
            raise WriteError(path, e) from e
        return cls(fd)

    @staticmethod
    def probe(folder: Path, path: Path) -> None:
        """RunDirBusy if a live process holds `path`."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # no lock file yet (or no folder): nobody has ever held it
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: probes never block each other
        except BlockingIOError:
            raise RunDirBusy(busy_message(folder, path)) from None
        finally:
            os.close(fd)


def busy_message(folder: Path, path: Path) -> str:
    info = read_json(path)
    if not info:  # the holder has taken the lock but not yet written its details
        who = "another process"
    else:
        who = f"pid {info.get('pid')} on host {info.get('host')}, started {info.get('started')}"
        if info.get("host") == socket.gethostname() and not _alive(info.get("pid")):
            who += f" (pid {info.get('pid')} has exited; a process it forked still holds the lock)"
    return (f"run directory {folder} is in use by another run ({who}); "
            f"wait for it to end or stop it, or pass another --out")


class Checkpoints:
    """A run folder's checkpoint files, ckpt_NNNNNNN.pt with their .sha256 sidecars: named,
    listed newest first, saved (atomic, checksummed), pruned to the newest `keep`, loaded."""

    def __init__(self, folder: Path):
        self.folder = folder

    def path(self, iteration: int) -> Path:
        return self.folder / f"ckpt_{iteration:07d}.pt"

    @staticmethod
    def iteration(path: Path) -> int:
        return int(CHECKPOINT.search(path.name).group(1))

    def newest_first(self) -> list[Path]:
        """Checkpoint files, newest (highest iteration) first."""
        return sorted((p for p in self.folder.glob("ckpt_*.pt") if CHECKPOINT.search(p.name)), key=self.iteration,
                      reverse=True)

    def save(self, iteration: int, state: dict[str, Any], keep: int) -> Path:
        """Save, then (only once it is safely in place: a failed write keeps every old one) delete
        all but the newest `keep`, with their sidecars, and sidecars whose checkpoint is gone
        (left by a writer killed between sidecar and checkpoint)."""
        path = self.path(iteration)
        atomic_save(state, path)
        found = self.newest_first()
        for old in found[keep:]:
            old.unlink(missing_ok=True)
        for sidecar in self.folder.glob(f"ckpt_*.pt{SIDECAR}"):
            if sidecar.with_name(sidecar.name[: -len(SIDECAR)]) not in found[:keep]:
                sidecar.unlink(missing_ok=True)
        return path

    def load_newest(self, warn: Callable[[str], None] = print,
                    at_most: int | None = None) -> tuple[Path, dict[str, Any]] | None:
        """The newest readable checkpoint and its state (checksum verified), of iteration
        `at_most` or before when given (a pack's members agree on one); an unreadable or damaged
        one is reported and the previous tried."""
        for path in self.newest_first():
            if at_most is not None and self.iteration(path) > at_most:
                continue
            try:
                state = load(path)
                if "model" not in state or "iteration" not in state:
                    raise ValueError("missing model or iteration")
                return path, state
            except Exception as e:  # a torn or corrupt file: fall back to the one before
                warn(f"warning: checkpoint {path} is unreadable ({type(e).__name__}: {e}); trying the previous one")
        return None


class RunDir:
    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.checkpoints = Checkpoints(self.path)

    # ----- layout: every file name of the folder ----------------------------------------------
    config = property(lambda self: self.path / "config.toml")
    resolved = property(lambda self: self.path / "resolved.toml")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    progress = property(lambda self: self.path / "progress.jsonl")  # one training record per log point
    summary = property(lambda self: self.path / "summary.json")
    model = property(lambda self: self.path / "model.pt")
    safetensors = property(lambda self: self.path / "model.safetensors")  # model.pt's weights, no pickle (pretrained.py)
    log = property(lambda self: self.path / "train.log")
    mean = property(lambda self: self.path / "mean.npy")  # the W&B model artifact's mean image
    tensorboard = property(lambda self: self.path / "tb")
    responses_cache = property(lambda self: self.path / "layer_responses.cache.json")  # the report's Figure 7 values
    lock_file = property(lambda self: self.path / ".lock")

    def is_run(self) -> bool:
        """Does the folder hold a run (its config, metrics or summary)?"""
        return self.path.is_dir() and any(p.exists() for p in (self.summary, self.metrics, self.config))

    def weights(self) -> Path | None:
        """What `eval` and `export` read when given the folder: model.pt once the run is
        finished, else its newest checkpoint (None: neither)."""
        if self.model.exists():
            return self.model
        found = self.checkpoints.newest_first()
        return found[0] if found else None

    # ----- results -----------------------------------------------------------------------------

    def read_config(self) -> RunConfig | None:
        """config.toml as a configuration, or None: absent, unreadable, or from another version."""
        try:
            return from_dict(read_toml(self.config), str(self.config))
        except Exception:  # noqa: BLE001 - any fault of the file means "unknown" to a reader
            return None

    def read_summary(self) -> dict[str, Any] | None:
        return read_json(self.summary)

    def finished(self, iterations: int | None, name: str | None = None) -> dict[str, Any] | None:
        """THE rule for "finished": summary.json records a test error after `iterations` (the
        run's planned length) and, when given, the run's `name`. Its summary, else None (absent,
        unreadable, or from another configuration: then the run goes on as usual)."""
        summary = self.read_summary()
        if summary is None or "test_error" not in summary or summary.get("iterations") != iterations:
            return None
        return summary if name is None or summary.get("name") == name else None

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.summary, summary)

    def write_model(self, weights: dict[str, Any]) -> None:
        atomic_save(weights, self.model)

    def write_config(self, cfg: RunConfig, resolved: dict[str, Any]) -> None:
        """config.toml (the configuration as loaded) and resolved.toml (what this machine made
        of it: training/plan.Plan), atomically, the folder made if needed."""
        self.path.mkdir(parents=True, exist_ok=True)
        for path, text in zip((self.config, self.resolved), config_texts(cfg, resolved)):
            atomic_write_text(path, text)

    def state(self, iterations: int | None, name: str | None = None) -> RunState:
        """Where the run stands, from the folder alone (any process, any time; the lock is only
        probed). `iterations`: the run's planned length."""
        if self.is_running():
            return RunState("running", Latest.of(self).iteration, holder=read_json(self.lock_file))
        summary = self.finished(iterations, name)
        if summary is not None:
            return RunState("finished", summary.get("iterations"), summary=summary)
        code, last = log_ending(self.log)
        checkpoint = next(iter(self.checkpoints.newest_first()), None)
        iteration = None if checkpoint is None else Checkpoints.iteration(checkpoint)
        said_stop = last.startswith(("interrupted:", "preempted:"))
        if code in (INTERRUPTED, PREEMPTED) or (code is None and said_stop):
            kind = "stopped"
        elif code not in (None, 0) or last.startswith("error:"):
            kind = "failed"
        elif checkpoint is not None or self.metrics.exists():
            kind = "resumable"
        else:
            kind = "fresh"
        return RunState(kind, iteration, checkpoint, exit_code=code, last_line=last)

    # ----- the lock ---------------------------------------------------------------------------

    def acquire(self) -> RunLock:
        """Create the folder if needed and hold its lock, or raise RunDirBusy naming the holder.
        Temporaries left by a writer killed mid-write are removed: we are the only writer now."""
        lock = RunLock.take(self.path, self.lock_file)
        for p in self.path.glob(".*.tmp-*"):
            p.unlink(missing_ok=True)
        return lock

    def check_free(self) -> None:
        """Raise RunDirBusy if a live process holds the folder; create nothing."""
        RunLock.probe(self.path, self.lock_file)

    def is_running(self) -> bool:
        try:
            self.check_free()
        except RunDirBusy:
            return True
        return False


# ----- what a run recorded, read by any process -----------------------------------------------


@dataclass(frozen=True)
class Latest:
    """What a run recorded last (Latest.of): its newest training record (progress.jsonl, each
    log point: iter, train_loss, train_error, lr) and evaluation (metrics.jsonl: also test_error,
    train_seconds, images_per_second); either may be None. Any process may read it, any time."""

    training: dict[str, Any] | None
    evaluation: dict[str, Any] | None

    @classmethod
    def of(cls, run: RunDir) -> Latest:
        return cls(last_record(run.progress), last_record(run.metrics))

    @property
    def iteration(self) -> int | None:
        found = [r["iter"] for r in (self.training, self.evaluation) if r is not None]
        return max(found) if found else None

    def seconds_per_iteration(self) -> float | None:
        """The run's training rate (evaluations apart), from its newest evaluation."""
        e = self.evaluation
        return e["train_seconds"] / e["iter"] if e and e.get("train_seconds") and e["iter"] > 0 else None


TAIL_BYTES = 16_384  # a record line is ~250 bytes: the newest complete one is always in the tail


def last_record(path: Path) -> dict[str, Any] | None:
    """The newest complete record (a JSON object with an integer `iter`) of a .jsonl file that
    only grows, read from its tail: polled often, so a long run's file is never read whole. A
    line being written is skipped; None when there is none (or no file)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - TAIL_BYTES))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:  # a line being written, or cut by the tail
            continue
        if isinstance(record, dict) and isinstance(record.get("iter"), int):
            return record
    return None


def append_exit(log: Path, code: int) -> None:
    """A suite run's exit code, last in its log: `state` reads it back from there."""
    with open(log, "a") as f:
        f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} exit code {code}\n")


def append_failure(log: Path, message: str) -> None:
    """Say in a run's log that it failed (RunDir.state reads it so): a pack's member whose loss
    turned NaN, while the process trains the other members on."""
    try:
        with open(log, "a") as f:
            f.write(f"error: {message}\n")
    except OSError as e:
        raise WriteError(log, e) from e


def log_ending(log: Path) -> tuple[int | None, str]:
    """(the exit code a suite appended after the run's last start, the run's own last line:
    the suite's `=== ...` lines left out, '' if none)."""
    try:
        lines = [line.rstrip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    code = int(m.group(1)) if lines and (m := EXIT_LINE.match(lines[-1])) else None
    return code, next((line.strip() for line in reversed(lines) if not line.startswith("===")), "")


def config_texts(cfg: RunConfig, resolved: dict[str, Any]) -> tuple[str, str]:
    """The text of config.toml and of resolved.toml (its one table, [resolved])."""
    return to_toml(cfg), dumps_toml({"resolved": resolved})


def read_table(path: Path, key: str) -> dict[str, Any]:
    """The table `key` of a TOML file (resolved.toml's "resolved": training/plan.Plan's fields); {}
    when the file is absent or unreadable, or has no such table."""
    try:
        table = read_toml(path).get(key)
    except Exception:  # noqa: BLE001 - any fault of the file means "unknown" to a reader
        return {}
    return table if isinstance(table, dict) else {}


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file, or None: absent, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True
    return True


@dataclass(frozen=True)
class StartPoint:
    """Where a run starts (training/worker.py finds it once, the header says it): finished
    (`summary`), resumable (the newest readable `checkpoint` and its `state`), or fresh."""

    iteration: int = 0
    checkpoint: Path | None = None
    state: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
