"""`resnetdist reproduce`: the whole section 4.2 suite in one command, then the report
(docs/suite.md). Each run is one `python -m resnetdist train --config OUT/suite/configs/<name>.toml`
(its resolved config, listed in OUT/suite/suite.json) in OUT/<name>, longest first (depth x
iterations, so the short runs fill the end), locally over --runs-per-gpu slots per device or on
Slurm (slurm.py). Separate processes keep each run independent (a seed gives the same weights
alone or packed) and still gained 12% / 23% total throughput with 2 / 4 ResNet-20s on an H100.
Everything is read back from files (and squeue/sacct), so `--status OUT` works from any process
and rerunning the command resumes: finished runs are skipped, the others continue from their
newest checkpoint. A failed run does not stop the others (exit 1 at the end).

Ctrl-C (locally): the runs live in sessions of their own, so SIGINT reaches this process alone,
which passes each press on to every running run once (`Stop`): the first stops each at its next
log point with a checkpoint, a second at once, as with `train`. No new run starts; exit 130
(SIGTERM likewise, exit 6).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, TextIO

from ..checkpoint import atomic_write_json, atomic_write_text
from ..config import ConfigError, RunConfig, depth_to_n, load_config, to_toml
from ..errors import INTERRUPTED, PREEMPTED
from ..rundir import RunDir, append_exit, log_ending, read_json
from .live import Watch
from .status import result_words

SUITE_DIR = "suite"  # inside OUT: suite.json, configs/, the Slurm script and its logs, W&B summary run
MANIFEST = "suite.json"


@dataclass
class Job:
    name: str
    n: int
    plain: bool
    seed: int
    iterations: int
    run_dir: Path
    config: Path  # the resolved configuration file the run trains with
    resolved: RunConfig | None = None  # None when read back from suite.json

    @property
    def run(self) -> RunDir:
        return RunDir(self.run_dir)

    @property
    def log(self) -> Path:
        return self.run.log

    def finished(self) -> dict | None:
        """The run's summary when it is finished (RunDir.finished), else None."""
        return self.run.finished(self.iterations, self.name)

    @property
    def cost(self) -> int:
        """Relative length: blocks x iterations (the step time grows with depth)."""
        return self.n * self.iterations


@dataclass
class Outcome:
    job: Job
    status: str  # done | skipped | failed | interrupted (Ctrl-C or SIGTERM obeyed: a checkpoint, resumable)
    detail: str = ""


def parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ConfigError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not values:
        raise ConfigError(f"{what}: empty list")
    return values


def at_least(flag: str, value: int, least: int = 1) -> None:
    if value < least:
        raise ConfigError(f"{flag} must be >= {least}, got {value}")


def suite_name(out: Path) -> str:
    """The suite is named after its folder: the W&B group and the Slurm job name."""
    return out.resolve().name or "suite"


def plan(depths: list[int], plain: bool, seeds: int, out: Path, iters: int | None,
         overrides: list[str], config: Path | None = None, data_dir: Path | None = None,
         device: str | None = None) -> list[Job]:
    """The runs, longest first, each with its resolved configuration (nothing is written)."""
    at_least("--seeds", seeds)
    out = out.resolve()
    configs = out / SUITE_DIR / "configs"
    jobs = []
    for depth in depths:
        n = depth_to_n(depth)
        for seed in range(seeds):
            for is_plain in ((False, True) if plain else (False,)):
                # the suite's W&B group is a flag, so a --set log.wandb_group still wins
                flags = {"model": {"n": n, "plain": is_plain}, "train": {"seed": seed},
                         "log": {"wandb_group": suite_name(out)}}
                if data_dir:
                    flags["data"] = {"dir": str(data_dir.resolve())}
                if device:
                    flags["train"]["device"] = device
                # checks every --set up front; device, precision and W&B mode stay as given, so each
                # run resolves them where it trains (a Slurm node may have GPUs the login node lacks)
                cfg = load_config(config, flags, overrides, iters)
                cfg.train.out = str(out / cfg.name)
                jobs.append(Job(cfg.name, n, is_plain, seed, cfg.optim.iters, out / cfg.name,
                                configs / f"{cfg.name}.toml", cfg))
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise ConfigError("runs would share a folder (is log.name set with --set? leave it to the default)")
    # stable sort: equal lengths keep depth, seed, ResNet-before-plain order
    return sorted(jobs, key=lambda j: -j.cost)


def write_plan(jobs: list[Job], out: Path, launcher: str) -> None:
    """Each run's resolved config file, and suite.json naming them (kept: earlier Slurm
    submissions and the W&B summary run id stay in it)."""
    for job in jobs:
        job.config.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(job.config, to_toml(job.resolved))
    manifest = read_manifest(out) or {}
    # runs an earlier command planned into the same folder (e.g. --depths 110 --no-plain after
    # the rest) stay listed, so --status shows the whole folder
    runs = {r["name"]: r for r in manifest.get("runs", [])}
    runs.update({j.name: {"name": j.name, "n": j.n, "plain": j.plain, "seed": j.seed, "iterations": j.iterations,
                          "run_dir": str(j.run_dir), "config": str(j.config)} for j in jobs})
    manifest.update(suite=suite_name(out), launcher=launcher,
                    runs=sorted(runs.values(), key=lambda r: -r["n"] * r["iterations"]))
    write_manifest(out, manifest)


def read_manifest(out: Path) -> dict | None:
    return read_json(out / SUITE_DIR / MANIFEST)


def write_manifest(out: Path, manifest: dict) -> None:
    (out / SUITE_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / SUITE_DIR / MANIFEST, manifest)


def jobs_from_manifest(out: Path) -> list[Job]:
    manifest = read_manifest(out)
    if not manifest or not manifest.get("runs"):
        raise ConfigError(f"{out}: no suite here ({out / SUITE_DIR / MANIFEST} is missing or unreadable)")
    return [Job(r["name"], r["n"], r["plain"], r["seed"], r["iterations"], Path(r["run_dir"]), Path(r["config"]))
            for r in manifest["runs"]]


# ----- local schedule ----------------------------------------------------------------------------


def device_pool(gpus: str | None, device: str | None) -> list[str | None]:
    """GPU ids to hand out; [None] = one device with the environment as it is."""
    if gpus:
        return [str(g) for g in parse_ints(gpus, "--gpus")]
    if device != "cpu":
        import torch

        if torch.cuda.is_available():
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else []
            return ids or [str(i) for i in range(torch.cuda.device_count())]
    return [None]


def slots(pool: list[str | None], runs_per_gpu: int) -> list[str | None]:
    """K slots per device, interleaved (0,1,0,1), so the first runs spread over all devices."""
    at_least("--runs-per-gpu", runs_per_gpu)
    return [device for _ in range(runs_per_gpu) for device in pool]


def packs(jobs: list[Job], size: int) -> list[list[Job]]:
    """The jobs in groups of up to `size` seeds of one net (--pack: each group one process, one
    fused model, pack.py), in the jobs' order (the longest first); size 1: one job each."""
    at_least("--pack", size)
    groups: dict[tuple[int, bool], list[list[Job]]] = {}
    order = []
    for job in jobs:
        chunks = groups.setdefault((job.n, job.plain), [])
        if not chunks or len(chunks[-1]) == size:
            chunks.append([])
            order.append(chunks[-1])
        chunks[-1].append(job)
    return order


def start(jobs: list[Job], gpu: str | None, out: Path) -> subprocess.Popen:
    """The process of a job, or of a pack (the first one's config with every member's seed, each
    run in out/<net>-s<seed>): its output in the first one's train.log (the others' logs say so)."""
    job, argv = jobs[0], ["train", "--config", str(jobs[0].config)]
    if len(jobs) > 1:
        argv += ["--seeds", ",".join(str(j.seed) for j in jobs), "--out", str(out.resolve())]
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    stamp = f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {sys.executable} -m resnetdist {' '.join(argv)}"
    for other in jobs[1:]:
        other.run_dir.mkdir(parents=True, exist_ok=True)
        with open(other.log, "a") as f:
            f.write(f"{stamp}  (packed with {job.name}: the output is in {job.log})\n")
    job.run_dir.mkdir(parents=True, exist_ok=True)
    with open(job.log, "a") as log:
        log.write(f"{stamp}{f'  (CUDA_VISIBLE_DEVICES={gpu})' if gpu is not None else ''}\n")
        log.flush()
        # a session of its own: the terminal's Ctrl-C reaches this command alone, which passes it on
        # once (Stop); were the run in the terminal's group too, it would count two presses. If this
        # command dies without passing anything on (SIGKILL, a closed terminal), the kernel sends the
        # run SIGTERM, which stops it at a checkpoint
        return subprocess.Popen([sys.executable, "-m", "resnetdist", *argv], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True, preexec_fn=_terminate_with_parent)


def _terminate_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent exits (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: a killed suite leaves its runs running
        pass


class Stop:
    """Ctrl-C (SIGINT) and SIGTERM while the suite runs. The handler only counts; the suite's
    loop passes each press on to every running run once (`pass_on`), so a run started a moment
    after a press gets it too, and nothing is printed from inside a signal handler."""

    def __init__(self) -> None:
        self.presses = 0
        self.signum = 0  # the first signal: SIGINT (exit 130) or SIGTERM (exit 6)
        self.sent: dict[subprocess.Popen, int] = {}
        self.told = 0  # presses already acknowledged on the terminal

    def note(self, signum: int, _frame=None) -> None:
        self.presses += 1
        self.signum = self.signum or signum

    def pass_on(self, running, echo: Callable[[str], None]) -> None:
        for proc in running:
            while self.sent.get(proc, 0) < self.presses and proc.poll() is None:
                proc.send_signal(self.signum)
                self.sent[proc] = self.sent.get(proc, 0) + 1
        if self.presses > self.told:
            self.told = self.presses
            what = "Ctrl-C" if self.signum == signal.SIGINT else signal.Signals(self.signum).name
            if self.presses == 1:
                again = "; Ctrl-C again to stop them now without one" if self.signum == signal.SIGINT else ""
                echo(f"{what}: no new run starts; {len(running)} running run(s) stop at their next log point "
                     f"with a checkpoint{again}")
            else:
                echo(f"{what} again: the running runs stop now; each resumes from its newest checkpoint")

    @contextmanager
    def installed(self) -> Iterator[Stop]:
        old = {s: signal.signal(s, self.note) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)


def _collect(proc: subprocess.Popen, job: Job, secs: float, echo: Callable[[str], None]) -> Outcome:
    append_exit(job.log, proc.returncode)
    if proc.returncode == 0 and (summary := job.finished()):
        echo(f"done  {job.name}: {result_words(summary)} ({secs:.0f} s)")
        return Outcome(job, "done")
    if proc.returncode in (INTERRUPTED, PREEMPTED):
        last = log_ending(job.log)[1].removeprefix("interrupted: ").removeprefix("preempted: ")
        echo(f"interrupted  {job.name}: {last or f'exit code {proc.returncode}'}")
        return Outcome(job, "interrupted", last)
    why = f"exit code {proc.returncode}" if proc.returncode else "no summary.json written"
    echo(f"FAIL  {job.name}: {why} ({secs:.0f} s); log {job.log}")
    return Outcome(job, "failed", f"{why}; log {job.log}")


POLL_S = 0.25  # how often the running processes are checked


def run_all(jobs: list[Job], pool: list[str | None], echo: Callable[[str], None], bars: TextIO | None, pack: int,
            out: Path) -> list[Outcome]:
    """Run the jobs in order over the slots (a device listed K times takes K processes at
    once), up to `pack` seeds of a net in one process (packs), showing each running run's
    progress (live.Watch: on `bars`, a terminal, else as lines). After Ctrl-C or SIGTERM (Stop)
    no new run starts, the running ones stop at a checkpoint and the rest are "not started"."""
    done = {j.name: summary for j in jobs if (summary := j.finished())}
    outcomes = [Outcome(j, "skipped") for j in jobs if j.name in done]
    for o in outcomes:
        echo(f"skip  {o.job.name}: already finished ({result_words(done[o.job.name])})")
    pending = packs([j for j in jobs if j.name not in done], pack)
    free = list(pool)
    running: dict[subprocess.Popen, tuple[list[Job], str | None, float]] = {}
    total, started = len(pending), 0
    watch = Watch(echo, bars)
    with Stop().installed() as stop:
        try:
            while (pending and not stop.presses) or running:
                while pending and free and not stop.presses:
                    group, gpu = pending.pop(0), free.pop(0)
                    started += 1
                    resume = " (resuming)" if group[0].run.checkpoints.newest_first() else ""
                    where = f"GPU {gpu}" if gpu is not None else "this machine"
                    names = " + ".join(j.name for j in group) + (" as one fused model" if len(group) > 1 else "")
                    watch.say(f"[{started}/{total}] start {names} on {where}{resume}; log {group[0].log}")
                    running[start(group, gpu, out)] = (group, gpu, time.monotonic())
                    for job in group:
                        watch.add(job.name, job.run, job.iterations)
                stop.pass_on(running, watch.say)
                time.sleep(POLL_S)
                watch.poll()
                for proc in [p for p in running if p.poll() is not None]:
                    group, gpu, t0 = running.pop(proc)
                    free.append(gpu)
                    for job in group:
                        watch.remove(job.name)
                        outcomes.append(_collect(proc, job, time.monotonic() - t0, watch.say))
        finally:
            watch.close()  # no bar left on the terminal, whatever ends the loop
    if stop.presses:
        return outcomes + [Outcome(j, "not started") for group in pending for j in group]
    return outcomes


# ----- report --------------------------------------------------------------------------------------


def report(out: Path, base: RunConfig, echo: Callable[[str], None]) -> dict | None:
    """report.md / figure6.png from whatever finished, then the suite's W&B summary run."""
    from .wandb_report import log_suite_report
    from .report import ReportError, write_report

    try:
        written = write_report([out], out)
    except ReportError as e:
        echo(f"no report: {e}")
        return None
    echo(written_line(written))
    manifest = read_manifest(out) or {}
    group = base.log.wandb_group or suite_name(out)
    run_id = log_suite_report(base.log, out / SUITE_DIR, group, manifest.get("wandb_report_id"), written)
    if run_id:
        manifest["wandb_report_id"] = run_id
        write_manifest(out, manifest)
        from ..training import wandb_mode_here

        if wandb_mode_here(base.log.wandb_mode) == "offline":  # nothing reached W&B yet
            echo(f"W&B (offline): report recorded, not uploaded, in the summary run {group}-report ({run_id}) "
                 f"in group {group}; `wandb sync {out / SUITE_DIR / 'wandb'}/offline-run-*` uploads it")
        else:
            echo(f"W&B: report logged to the summary run {group}-report ({run_id}) in group {group}")
    return written


def written_line(written: dict) -> str:
    """The closing line: the report and every figure written beside it (the per-run curves
    named one by one up to CURVES_NAMED, then counted)."""
    out = Path(written["report"]).parent
    figures = [Path(written["figure"]).name] + ([Path(written["figure7"]).name] if written.get("figure7") else [])
    curves = [str(Path(c).relative_to(out)) for c in written.get("curves", [])]
    figures += curves if len(curves) <= CURVES_NAMED else [f"curves/ ({len(curves)} per-run PNGs)"]
    return f"report: {written['report']}; figures in {out}: {', '.join(figures)}"


CURVES_NAMED = 6


def list_failures(outcomes: list[Outcome], total: int, echo: Callable[[str], None]) -> None:
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        echo(f"{len(failed)} of {total} runs failed:")
        for o in failed:
            echo(f"  {o.job.name}: {o.detail}")


# A launcher other than the local pool (slurm.run_suite): the planned jobs -> their outcomes,
# or None when it does not wait for them. Passed in by the CLI, so this module imports no launcher.
Schedule = Callable[[list[Job]], Optional[list[Outcome]]]


def reproduce(depths: list[int], plain: bool, seeds: int, out: Path, gpus: str | None = None,
              iters: int | None = None, overrides: list[str] | None = None, config: Path | None = None,
              data_dir: Path | None = None, device: str | None = None, runs_per_gpu: int = 1,
              schedule: Schedule | None = None, echo: Callable[[str], None] = print,
              pack: int = 1) -> tuple[list[Outcome], dict | None]:
    """Plan, schedule (the local pool, or `schedule`), report. Returns the outcomes and what
    the report wrote (None if nothing to report, or not waited for)."""
    overrides = list(overrides or [])
    pool = None
    if schedule is None:
        pool = slots(device_pool(gpus, device), runs_per_gpu)
        if pool[0] is not None and device is None:
            device = "cuda"
    jobs = plan(depths, plain, seeds, out, iters, overrides, config, data_dir, device)
    base = load_config(config, {}, overrides, iters)  # the suite's logging settings
    if schedule is not None:
        outcomes = schedule(jobs)
        if outcomes is None:  # --dry-run or --no-wait
            return [], None
    else:
        write_plan(jobs, out, "local")
        per = f", {runs_per_gpu} at a time on each" if runs_per_gpu > 1 else ""
        where = (f"GPUs {','.join(p for p in dict.fromkeys(pool))}{per}" if pool[0] is not None
                 else f"{len(pool)} at a time on this machine")
        packed = f"; up to {pack} seeds of a net in one process (packs)" if pack > 1 else ""
        echo(f"{len(jobs)} runs into {out}, longest first: {', '.join(j.name for j in jobs)}; {where}{packed}")
        outcomes = run_all(jobs, pool, echo, bars=sys.stdout if sys.stdout.isatty() else None, pack=pack, out=out)
    if interrupted(outcomes):
        list_failures(outcomes, len(jobs), echo)
        say_how_to_resume(outcomes, echo)
        return outcomes, None
    written = report(out, base, echo)
    list_failures(outcomes, len(jobs), echo)
    return outcomes, written


def interrupted(outcomes: list[Outcome]) -> bool:
    return any(o.status in ("interrupted", "not started") for o in outcomes)


def say_how_to_resume(outcomes: list[Outcome], echo: Callable[[str], None]) -> None:
    """After a stop: what is kept, and the command that carries on (no report: the suite is unfinished)."""
    counts = {s: sum(o.status == s for o in outcomes) for s in ("interrupted", "not started")}
    done = sum(o.status in ("done", "skipped") for o in outcomes)
    argv = shlex.join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith(("resnetdist", "__main__.py")) else ""
    echo(f"interrupted: {counts['interrupted']} run(s) stopped (each resumes from its newest checkpoint), "
         f"{counts['not started']} not started, {done} finished; no report yet. To resume, run the same "
         f"command again" + (f": resnetdist {argv}" if argv else ""))
