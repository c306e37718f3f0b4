"""Where a run stands, in the words of `resnetdist runs DIR`, `reproduce --status OUT` and the
Slurm suite's wait. RunDir.state (rundir.py) decides it from the folder alone; this module names
it: running (host and pid from the lock, the newest iteration and training error, the time left
at its newest evaluation's rate), done (summary.json at the planned length), interrupted (the
log's last line says a Ctrl-C or preemption stopped it) or stopped (nothing says why: a kill, a
crash, a run started by hand) with the checkpoint it resumes from, failed (an error or a
non-zero exit code that is no stop at a checkpoint), not started.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..progress import duration, plural
from ..rundir import Latest, RunDir

STATES = ("running", "interrupted", "stopped", "done", "failed", "not started")


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
    train_error: float | None = None  # running: at its newest log point
    exit_code: int | None = None
    last_line: str | None = None


# RunDir.state's kinds in the words of the table
SHOWN = {"fresh": "not started", "resumable": "stopped", "running": "running", "stopped": "interrupted",
         "failed": "failed", "finished": "done"}


def result_words(summary: dict) -> str:
    """A finished run in words (its line here and in `reproduce`'s skip and done lines)."""
    return f"test error {summary['test_error']:.2f}% after {plural(summary['iterations'], 'iteration')}"


def run_status(run_dir: Path, name: str | None = None, iterations: int | None = None) -> RunStatus:
    """The state of one run folder (`iterations`: its planned length, else its config.toml's)."""
    run = RunDir(run_dir)
    if not iterations and (cfg := run.read_config()) is not None:
        iterations = cfg.optim.iters
    state = run.state(iterations or None, name)
    status = RunStatus(name or run.path.name, str(run.path), SHOWN[state.kind], iteration=state.iteration,
                       iterations=iterations or None, exit_code=state.exit_code, last_line=state.last_line or None)
    resumes = (f"resumes from iteration {state.iteration:,}" if state.iteration is not None
               else "no checkpoint: starts over")
    if state.kind == "running":
        running(status, state.holder or {}, Latest.of(run))
    elif state.kind == "finished":
        status.test_error, status.detail = state.summary["test_error"], result_words(state.summary)
    elif state.kind == "stopped":
        status.detail = resumes + (" (preempted)" if state.last_line.startswith("preempted") else "")
    elif state.kind == "failed":
        code = state.exit_code if state.exit_code is not None else "?"
        status.detail = f"exit code {code}: {state.last_line}; {resumes}"
    elif state.kind == "resumable":
        status.detail = resumes
    return status


def running(status: RunStatus, holder: dict, latest: Latest) -> None:
    """A running run's holder (from the lock), iteration, training error and time left."""
    status.host, status.pid = holder.get("host"), holder.get("pid")
    where = f"on {status.host} (pid {status.pid})" if status.host else "(holder unknown)"
    if status.iteration is None:
        status.detail = f"starting {where}"
        return
    of = f" of {status.iterations:,}" if status.iterations else ""
    status.detail = f"iteration {status.iteration:,}{of} {where}"
    if latest.training and latest.training.get("train_error") is not None:
        status.train_error = latest.training["train_error"]
        status.detail += f", train error {status.train_error:.1f}%"
    if (rate := latest.seconds_per_iteration()) and status.iterations:
        status.eta_s = rate * max(status.iterations - status.iteration, 0)
        status.detail += f", about {duration(status.eta_s)} left"


def counts(statuses: list[RunStatus]) -> dict[str, int]:
    """Runs per state, the states no run is in left out."""
    return {s: n for s in (*STATES, "queued") if (n := sum(r.state == s for r in statuses))}


def labels(statuses: list[RunStatus]) -> list[str]:
    """Each run's name, and where two runs share a name (runs a/ b/, each with resnet20-s0), the
    end of its folder's path that tells them apart (a/resnet20-s0, b/resnet20-s0)."""
    out = []
    for r in statuses:
        same = [Path(o.run_dir) for o in statuses if o.name == r.name]
        if len(same) < 2:
            out.append(r.name)
            continue
        parts = Path(r.run_dir).parts
        for k in range(1, len(parts) + 1):  # the shortest tail of the path no other folder shares
            if all(p.parts[-k:] != parts[-k:] for p in same if p != Path(r.run_dir)):
                break
        tail = str(Path(*parts[-k:]))
        out.append(tail if tail.endswith(r.name) else f"{r.name} ({tail})")
    return out


def table(statuses: list[RunStatus], title: str = "") -> str:
    """One line per run, then the total line."""
    names = labels(statuses)
    width = max((len(n) for n in names), default=0)
    lines = [f"  {n:<{width}}  {r.state:<11}  {r.detail}".rstrip() for n, r in zip(names, statuses)]
    total = f"{len(statuses)} run(s): " + ", ".join(f"{n} {s}" for s, n in counts(statuses).items())
    return "\n".join([*lines, f"{title}: {total}" if title else total])


def to_json(statuses: list[RunStatus]) -> str:
    return json.dumps({"runs": [asdict(r) for r in statuses], "total": len(statuses), "counts": counts(statuses)},
                      indent=2)
