"""`reproduce --launcher slurm`: the suite as one Slurm job array (docs/suite.md).

One array task per run (or per --runs-per-task processes, side by side over the task's GPUs;
with --pack K each process trains up to K seeds of a net as one fused model, reproduce.packs).
Each runs `python -m resnetdist train --config OUT/suite/configs/<run>.toml`, output appended
to OUT/<run>/train.log. The script asks for `--requeue` and for USR1 shortly before the time
limit, on which it requeues its own task; `train` resumes from the newest checkpoint whenever
it starts. The script (OUT/suite/array-<n>.sbatch) is checked with `sbatch --test-only` (a bad
partition, account, time or --sbatch-arg is refused before anything is queued), then submitted;
suite.json records each submission. A run's state comes from its folder (status.py) and, where
the folder cannot know, from squeue / sacct: queued, starting, or failed (left the queue
without a summary).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..config import ConfigError
from .reproduce import (SUITE_DIR, Job, Outcome, at_least, jobs_from_manifest, packs, read_manifest, suite_name,
                        write_manifest, write_plan)
from .status import RunStatus, run_status, table, to_json

QUEUED_STATES = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESIZING", "SUSPENDED",
                 "STAGE_OUT", "SIGNALING"}
RUNNING_STATES = {"RUNNING", "COMPLETING"}
# what the array script sets itself; a --sbatch-arg may not change them
RESERVED_OPTIONS = {"--array", "--output", "--error", "--parsable", "--wrap", "--job-name", "--requeue",
                    "--no-requeue", "--signal", "--open-mode", "--chdir", "-a", "-o", "-e", "-J", "-D"}
SBATCH_ARG = re.compile(r"^(--[a-z][a-z0-9-]*(=\S+)?|-[a-zA-Z](\S+)?)$")
# seconds before the time limit at which Slurm sends USR1 and the task requeues itself
REQUEUE_WARNING_S = 180


@dataclass
class SlurmOptions:
    partition: str = ""
    account: str = ""
    time: str = ""  # Slurm time limit, e.g. 04:00:00
    gpus_per_task: int = 1
    runs_per_task: int = 1  # processes per task (with pack > 1, each a pack)
    pack: int = 1  # up to this many seeds of a net in one process (train --seeds)
    sbatch_args: list[str] = field(default_factory=list)
    wait: bool = True
    dry_run: bool = False
    poll_s: float = 10.0

    def validate(self) -> None:
        at_least("--gpus-per-task", self.gpus_per_task, 0)
        at_least("--runs-per-task", self.runs_per_task)
        at_least("--pack", self.pack)
        for arg in self.sbatch_args:
            name = arg.split("=", 1)[0]
            if not SBATCH_ARG.match(arg):
                raise ConfigError(f"--sbatch-arg {arg!r}: expected one sbatch option as --name=value or --name "
                                  f"(no spaces, e.g. --sbatch-arg=--mem=8G)")
            if name in RESERVED_OPTIONS or (not name.startswith("--") and name[:2] in RESERVED_OPTIONS):
                raise ConfigError(f"--sbatch-arg {arg!r}: {name} is set by reproduce itself")
        for what, value in (("--partition", self.partition), ("--account", self.account), ("--time", self.time)):
            if value and not re.fullmatch(r"[\w.:,+-]+", value):
                raise ConfigError(f"{what} {value!r}: not a valid Slurm value")


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise ConfigError(f"--launcher slurm: `{tool}` is not on PATH (run this on a Slurm login node, "
                          f"or use the local launcher)")
    return path


# ----- the array script ------------------------------------------------------------------------------


def pack(jobs: list[Job], runs_per_task: int, size: int = 1) -> dict[int, list[list[Job]]]:
    """Array task id -> its processes, in order (longest first stays first): each the runs it
    trains, one, or a pack of up to `size` seeds of a net (reproduce.packs)."""
    groups = packs(jobs, size)
    return {t: groups[i : i + runs_per_task] for t, i in enumerate(range(0, len(groups), runs_per_task))}


def sbatch_lines(out: Path, tasks: dict[int, list[list[Job]]], opts: SlurmOptions) -> list[str]:
    suite = out / SUITE_DIR
    lines = [f"--job-name=resnetdist-{suite_name(out)}", f"--array=0-{len(tasks) - 1}",
             f"--output={suite / 'slurm'}/%A_%a.out", "--open-mode=append", "--ntasks=1",
             f"--chdir={Path.cwd()}", "--requeue", f"--signal=B:USR1@{REQUEUE_WARNING_S}"]
    if opts.gpus_per_task:
        lines.append(f"--gpus-per-task={opts.gpus_per_task}")
    for option, value in (("partition", opts.partition), ("account", opts.account), ("time", opts.time)):
        if value:
            lines.append(f"--{option}={value}")
    return lines + list(opts.sbatch_args)


# the array script after its case: the traps, one `train` per run (side by side), the wait
TRAPS_RUNS_AND_WAIT = """# USR1 comes {warning_s} s before the time limit (--signal): put this task back in the
# queue; when it starts again every run resumes from its newest checkpoint.
# shellcheck disable=SC2317  # called by the trap below
requeue() {{
    echo "time limit near: requeueing ${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}" >&2
    scontrol requeue "${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"
}}
trap requeue USR1
# `scancel --signal=INT --full` (the suite's Ctrl-C) reaches every run of the task, which stops
# at its next log point with a checkpoint; this shell waits for them rather than ending first
# (which would end the task and kill the runs before they write it)
# shellcheck disable=SC2317  # called by the trap below
interrupted() {{
    echo "SIGINT: the runs of ${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}} stop at their next checkpoint" >&2
}}
trap interrupted INT

# Slurm's CUDA_VISIBLE_DEVICES for this task; its runs take the GPUs in turn.
IFS=, read -r -a gpus <<< "${{CUDA_VISIBLE_DEVICES:-}}"
pids=()
for i in "${{!runs[@]}}"; do
    run="${{runs[$i]}}"
    mkdir -p "$out/$run"
    echo "=== $(date '+%F %T') array task ${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}} on $(hostname): $run" >> "$out/$run/train.log"
    # a pack (--pack): the first run's config with every member's seed, each run in $out/<net>-s<seed>
    args=(--config "$out/{suite}/configs/$run.toml")
    if [[ -n "${{seeds[$i]:-}}" ]]; then
        args+=(--seeds "${{seeds[$i]}}" --out "$out")
        read -r -a others <<< "${{packed[$i]}}"
        for other in "${{others[@]}}"; do
            mkdir -p "$out/$other"
            echo "=== $(date '+%F %T') packed with $run: the output is in $out/$run/train.log" >> "$out/$other/train.log"
        done
    fi
    (
        if (( ${{#gpus[@]}} )); then
            export CUDA_VISIBLE_DEVICES="${{gpus[i % ${{#gpus[@]}}]}}"
        fi
        # the exit code last in the log: `reproduce --status` and `resnetdist runs` read it
        code=0
        "$python" -m resnetdist train "${{args[@]}}" || code=$?
        echo "=== $(date '+%F %T') exit code $code"
        exit "$code"
    ) >> "$out/$run/train.log" 2>&1 &
    pids+=("$!")
done

# bash runs a trap only between commands: waiting on background runs, not a foreground
# one, lets the traps run at once; a trap ends a `wait` early, so each run is waited for
# until it has really exited
status=0
for pid in "${{pids[@]}}"; do
    while true; do
        code=0
        wait "$pid" || code=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    (( code == 0 )) || status=$code
done
exit "$status"
"""


def task_case(t: int, groups: list[list[Job]]) -> str:
    """Task t's line of the script's case: its processes' first runs, and for packs each one's
    seeds and other runs (empty for a run alone)."""
    q = shlex.quote
    line = f"    {t}) runs=({' '.join(q(g[0].name) for g in groups)})"
    if any(len(g) > 1 for g in groups):
        # double-quoted: run names are [a-z0-9-] and seeds digits, and "0,1" is one element
        seeds = " ".join('"' + (",".join(str(j.seed) for j in g) if len(g) > 1 else "") + '"' for g in groups)
        others = " ".join('"' + " ".join(j.name for j in g[1:]) + '"' for g in groups)
        line += f" seeds=({seeds}) packed=({others})"
    return line + " ;;"


def array_script(out: Path, tasks: dict[int, list[list[Job]]], opts: SlurmOptions) -> str:
    """The job array's batch script: task id -> processes, then one `train` per process (a run,
    or a pack's runs: train --seeds), side by side."""
    out = out.resolve()
    q = shlex.quote
    cases = "\n".join(task_case(t, groups) for t, groups in tasks.items())
    header = "\n".join(f"#SBATCH {line}" for line in sbatch_lines(out, tasks, opts))
    runs = sum(len(g) for groups in tasks.values() for g in groups)
    return f"""#!/usr/bin/env bash
# resnetdist suite {suite_name(out)}: {runs} run(s) in {len(tasks)} array task(s).
# Written by `resnetdist reproduce --launcher slurm`; each run trains with its resolved config
# {out / SUITE_DIR}/configs/<run>.toml and resumes from its newest checkpoint when restarted.
{header}
set -euo pipefail

out={q(str(out))}
python="${{RESNETDIST_PYTHON:-{q(sys.executable)}}}"

seeds=() packed=()  # per process of a pack (--pack): its seeds and its other runs; set below
case "${{SLURM_ARRAY_TASK_ID:?submit this with sbatch: it is a job array}}" in
{cases}
    *) echo "array task $SLURM_ARRAY_TASK_ID has no runs" >&2; exit 2 ;;
esac

{TRAPS_RUNS_AND_WAIT.format(suite=SUITE_DIR, warning_s=REQUEUE_WARNING_S)}"""


# ----- submitting -----------------------------------------------------------------------------------


def _sbatch(args: list[str], script: Path) -> str:
    proc = subprocess.run([require("sbatch"), *args, str(script)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise ConfigError(f"sbatch refused the job array ({script}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip()


def submit(out: Path, jobs: list[Job], opts: SlurmOptions) -> tuple[str, dict[int, list[list[Job]]]]:
    """Write, check (sbatch --test-only) and submit the array for `jobs`; record it in suite.json."""
    tasks = pack(jobs, opts.runs_per_task, opts.pack)
    manifest = read_manifest(out) or {}
    submissions = manifest.setdefault("submissions", [])
    script = out / SUITE_DIR / f"array-{len(submissions) + 1}.sbatch"
    (out / SUITE_DIR / "slurm").mkdir(parents=True, exist_ok=True)
    script.write_text(array_script(out, tasks, opts))
    _sbatch(["--test-only"], script)
    job_id = _sbatch(["--parsable"], script).split(";")[0]
    submissions.append({"job_id": job_id, "script": str(script), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                        "tasks": {str(t): [j.name for group in groups for j in group] for t, groups in tasks.items()}})
    write_manifest(out, manifest)
    return job_id, tasks


# ----- states ------------------------------------------------------------------------------------------


def _query(cmd: list[str]) -> dict[str, str]:
    """'<job>_<task>|STATE' lines -> {job_task: STATE}; a tool that fails gives nothing."""
    if shutil.which(cmd[0]) is None:
        return {}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return {}
    states = {}
    for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
        key, _, state = line.strip().partition("|")
        if key and state:
            states[key] = state.split()[0].rstrip("+")  # "CANCELLED by 0" -> CANCELLED
    return states


def scheduler_states(job_ids: list[str]) -> dict[str, str]:
    """State of every array task of these jobs: squeue (kept MinJobAge after they end),
    then sacct for what squeue no longer knows, where the cluster keeps accounting."""
    if not job_ids:
        return {}
    ids = ",".join(job_ids)
    states = _query(["sacct", "-n", "-X", "-P", "-j", ids, "-o", "JobID,State"])
    # squeue is the live view: it wins where both know a task
    states.update(_query(["squeue", "-h", "-r", "--states=all", "--me", "-o", "%i|%T"]))
    return states


def run_states(out: Path, jobs: list[Job]) -> dict[str, RunStatus]:
    """Run name -> its status: what its folder says (status.run_status: running, done,
    interrupted, failed, stopped, not started), and where the folder cannot know, the
    scheduler's word: queued, starting, or failed (left the queue without a summary)."""
    where = {name: f"{sub['job_id']}_{task}"  # run -> "<job>_<task>" of its latest submission
             for sub in (read_manifest(out) or {}).get("submissions", []) for task, names in sub["tasks"].items()
             for name in names}
    states = scheduler_states(sorted({w.split("_")[0] for w in where.values()}))
    return {job.name: with_scheduler(run_status(job.run_dir, job.name, job.iterations), where.get(job.name),
                                     states, job.log)
            for job in jobs}


def with_scheduler(status: RunStatus, task: str | None, states: dict[str, str], log: Path) -> RunStatus:
    state = states.get(task, "") if task else ""
    if task is None or status.state in ("running", "done"):
        return status
    if state in QUEUED_STATES:
        status.state, status.detail = "queued", f"{task} {state.lower()}"
    elif state in RUNNING_STATES:
        status.state, status.detail = "running", f"{task} starting"
    elif status.state in ("stopped", "not started"):  # no word from the run itself
        why = state.lower() if state else "left the queue"
        status.state, status.detail = "failed", f"{task} {why} without a summary; log {log}"
    return status


def status_table(out: Path, jobs: list[Job]) -> tuple[str, dict[str, RunStatus]]:
    states = run_states(out, jobs)
    return table(list(states.values()), suite_name(out)), states


def show_status(out: Path, as_json: bool, echo: Callable[[str], None]) -> None:
    """`reproduce --status OUT`: the table, from files and the scheduler, in any process."""
    table_text, states = status_table(out, jobs_from_manifest(out))
    echo(to_json(list(states.values())) if as_json else table_text)


# ----- the suite ------------------------------------------------------------------------------------


def wait(out: Path, jobs: list[Job], poll_s: float, echo: Callable[[str], None]) -> dict[str, RunStatus]:
    """Poll until no run is queued or running, printing the table whenever it changes."""
    last = None
    while True:
        table, states = status_table(out, jobs)
        if table != last:
            echo(f"--- {time.strftime('%H:%M:%S')}\n{table}")
            last = table
        if not any(s.state in ("queued", "running") for s in states.values()):
            return states
        time.sleep(poll_s)


def run_suite(jobs: list[Job], out: Path, opts: SlurmOptions, echo: Callable[[str], None]) -> list[Outcome] | None:
    """Submit the runs that are neither done nor in the queue; wait (unless --no-wait) and
    return the outcomes; None when nothing is waited for (--dry-run, --no-wait)."""
    opts.validate()
    if opts.dry_run:
        echo(array_script(out, pack(jobs, opts.runs_per_task, opts.pack), opts))
        return None
    require("sbatch")
    require("squeue")
    write_plan(jobs, out, "slurm")
    states = run_states(out, jobs)
    todo = [j for j in jobs if states[j.name].state in ("failed", "interrupted", "stopped", "not started")]
    for j in jobs:
        if j not in todo:
            echo(f"skip  {j.name}: {states[j.name].state} ({states[j.name].detail})")
    if todo:
        job_id, tasks = submit(out, todo, opts)
        echo(f"submitted job array {job_id}: {len(todo)} run(s) in {len(tasks)} task(s), longest first: "
             f"{', '.join(j.name for j in todo)}; script {out / SUITE_DIR}/array-*.sbatch")
    if not opts.wait:
        echo(f"not waiting; see where it stands with: resnetdist reproduce --status {out}")
        return None
    try:
        final = wait(out, jobs, opts.poll_s, echo)
    except KeyboardInterrupt:
        echo(f"stopped waiting; the job array keeps running: resnetdist reproduce --status {out}")
        raise
    return [Outcome(j, final[j.name].state if final[j.name].state in ("done", "interrupted") else "failed",
                    final[j.name].detail) for j in jobs]

