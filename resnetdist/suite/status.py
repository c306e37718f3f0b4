"""Where a run stands, read from its folder alone, so any process can ask at any time
(`resnetdist runs DIR`, `reproduce --status OUT`, and the Slurm suite's wait):

- running: a live process holds the run directory's lock (training/rundir.py): its host and pid
  from the lock file, the iteration of the newest metrics record, and the time left at the
  rate of its newest evaluation record;
- done: summary.json records the run's planned iterations (its test error);
- interrupted / stopped: not running, a checkpoint to resume from; `interrupted` when the log's
  last line says a Ctrl-C or a preemption notice stopped it, `stopped` when nothing says why
  (a kill, a crash without a log, a run started by hand);
- failed: the run's log (a suite's train.log) ends with an error or a non-zero exit code that is
  not a stop at a checkpoint (the code and the log's last line);
- not started: nothing trained yet.

The lock is probed with a shared, non-blocking flock released at once (rundir.check_free), as
the launcher probes it: it never blocks the run.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..checkpoint import PATTERN as CHECKPOINT_NAME, list_checkpoints
from ..config import read_toml
from ..errors import INTERRUPTED, PREEMPTED, RunDirBusy
from ..training import rundir
from ..progress import duration
from ..training.announce import plural
from .discover import read_json

STATES = ("running", "interrupted", "stopped", "done", "failed", "not started")
LOG = "train.log"  # a suite run's output (reproduce.Job.log); a run started by hand has none
EXIT_LINE = re.compile(r"^=== .* exit code (-?\d+)$")


@dataclass
class RunStatus:
    name: str
    run_dir: str
    state: str  # one of STATES (or, from the Slurm suite, "queued")
    detail: str = ""  # the state in words, for the line
    iteration: int | None = None  # the newest metrics record's (running) or the checkpoint's (stopped)
    iterations: int | None = None  # the run's planned length
    host: str | None = None
    pid: int | None = None
    eta_s: float | None = None
    test_error: float | None = None
    exit_code: int | None = None
    last_line: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def planned_iterations(run_dir: Path) -> int | None:
    try:
        return int(read_toml(run_dir / "config.toml")["optim"]["iters"])
    except Exception:  # absent or unreadable: the length is unknown, not an error here
        return None


def newest_records(run_dir: Path) -> tuple[int | None, dict | None]:
    """(iteration of the newest metrics record, the newest record with train_seconds)."""
    newest, timed = None, None
    try:
        lines = (run_dir / "metrics.jsonl").read_text(errors="replace").splitlines()
    except OSError:
        return None, None
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line being written
            continue
        if isinstance(record, dict) and isinstance(record.get("iter"), int):
            newest = record["iter"]
            if record.get("train_seconds"):
                timed = record
    return newest, timed


def newest_checkpoint(run_dir: Path) -> int | None:
    """The iteration of the run directory's newest checkpoint file (None: none yet)."""
    found = list_checkpoints(run_dir)
    return int(CHECKPOINT_NAME.search(found[0].name).group(1)) if found else None


def log_lines(log: Path) -> list[str]:
    """A run's log (a suite's train.log), its non-blank lines; none when it is absent."""
    try:
        return [line.rstrip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return []


def own_last_line(lines: list[str]) -> str:
    """The run's own last line: the suite's `=== ...` lines left out ('' if none)."""
    return next((line.strip() for line in reversed(lines) if not line.startswith("===")), "")


def log_ending(run_dir: Path) -> tuple[int | None, str]:
    """(the exit code a suite appended after the run's last start, the run's own last line)."""
    lines = log_lines(run_dir / LOG)
    code = None
    if lines and (m := EXIT_LINE.match(lines[-1])):
        code = int(m.group(1))
    return code, own_last_line(lines)


def is_running(run_dir: Path) -> bool:
    try:
        rundir.check_free(run_dir)
    except RunDirBusy:
        return True
    return False


def run_status(run_dir: Path, name: str | None = None, iterations: int | None = None) -> RunStatus:
    """The state of one run folder (`iterations`: its planned length, else its config.toml's)."""
    run_dir = Path(run_dir)
    status = RunStatus(name or run_dir.name, str(run_dir), "not started",
                       iterations=iterations or planned_iterations(run_dir))
    summary = read_json(run_dir / "summary.json")
    if is_running(run_dir):
        return running(status, run_dir)
    if summary and "test_error" in summary and summary.get("iterations") == status.iterations:
        status.state, status.test_error = "done", summary["test_error"]
        status.iteration = summary.get("iterations")
        status.detail = f"test error {summary['test_error']:.2f}% after {plural(summary['iterations'], 'iteration')}"
        return status
    return stopped(status, run_dir)


def running(status: RunStatus, run_dir: Path) -> RunStatus:
    info = rundir.holder(run_dir) or {}
    status.state, status.host, status.pid = "running", info.get("host"), info.get("pid")
    status.iteration, timed = newest_records(run_dir)
    where = f"on {status.host} (pid {status.pid})" if status.host else "(holder unknown)"
    if status.iteration is None:
        status.detail = f"starting {where}"
        return status
    of = f" of {status.iterations:,}" if status.iterations else ""
    status.detail = f"iteration {status.iteration:,}{of} {where}"
    if timed and status.iterations:
        status.eta_s = timed["train_seconds"] / timed["iter"] * (status.iterations - status.iteration)
        status.detail += f", about {duration(status.eta_s)} left"
    return status


def stopped(status: RunStatus, run_dir: Path) -> RunStatus:
    """Not running and not done: interrupted, stopped, failed or not started."""
    code, last = log_ending(run_dir)
    status.exit_code, status.last_line = code, last or None
    status.iteration = newest_checkpoint(run_dir)
    resumes = (f"resumes from iteration {status.iteration:,}" if status.iteration is not None
               else "no checkpoint: starts over")
    said_stop = last.startswith(("interrupted:", "preempted:"))
    if code in (INTERRUPTED, PREEMPTED) or (code is None and said_stop):
        status.state, status.detail = "interrupted", resumes + (" (preempted)" if last.startswith("preempted") else "")
    elif code not in (None, 0) or last.startswith("error:"):
        status.state = "failed"
        status.detail = f"exit code {code if code is not None else '?'}: {last}; {resumes}"
    elif status.iteration is not None or (run_dir / "metrics.jsonl").exists():
        status.state, status.detail = "stopped", resumes
    return status


def total_line(statuses: list[RunStatus]) -> str:
    counts = {s: sum(r.state == s for r in statuses) for s in (*STATES, "queued")}
    return f"{len(statuses)} run(s): " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)


def table(statuses: list[RunStatus], title: str = "") -> str:
    """One line per run, then the total line."""
    width = max((len(r.name) for r in statuses), default=0)
    lines = [f"  {r.name:<{width}}  {r.state:<11}  {r.detail}".rstrip() for r in statuses]
    total = total_line(statuses)
    return "\n".join([*lines, f"{title}: {total}" if title else total])


def to_json(statuses: list[RunStatus]) -> str:
    counts = {s: sum(r.state == s for r in statuses) for s in (*STATES, "queued")}
    return json.dumps({"runs": [r.as_dict() for r in statuses], "total": len(statuses),
                       "counts": {s: n for s, n in counts.items() if n}}, indent=2)
