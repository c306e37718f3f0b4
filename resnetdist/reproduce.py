"""`resnetdist reproduce`: the whole section 4.2 suite in one command, then the report.

    resnetdist reproduce --depths 20,32,44,56 --plain --seeds 3 --gpus 0,1,2,3 --out runs/

Every run (ResNet and, with --plain, plain net, at each depth, seeds 0..K-1) is its own
`python -m resnetdist train` process with its own run folder OUT/<name> (e.g.
runs/resnet20-s0), its stdout and stderr in OUT/<name>/train.log.

Scheduling: a pool of devices, one run per device at a time. With --gpus 0,1,... each run
gets CUDA_VISIBLE_DEVICES=<one id>, so it sees one GPU (cuda:0) and the runs never share a
GPU; with no --gpus and CUDA present, every visible GPU is in the pool; on CPU the pool is
one slot, so runs go one after another (two CPU runs at once would only share the same
cores). One run per GPU, not several: at batch 128 the step is bound by kernel launches, and
packing 2-4 runs on a GPU bought only 12-23% more throughput in DESIGN.md's measurements,
while making every run's own timing meaningless. Single independent runs also keep every
seed bit-for-bit the run `resnetdist train` would give on its own; data-parallel training of
one run over several GPUs is `train --nproc-per-node`, not this.

Runs are started in the order seed, then depth, then ResNet before plain, so a first seed of
every net finishes before any second seed. Restarting the same command is safe: a run whose
summary.json records the planned iterations is skipped; an interrupted one (no summary)
is started again and `train` resumes it from its newest checkpoint. A run that fails does not
stop the others; at the end every failure is listed with its log, and the command exits 1.
The report (report.md, figure6.png, curves/) is written into --out from whatever finished.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .config import ConfigError, depth_to_n, load_config


@dataclass
class Job:
    name: str
    n: int
    plain: bool
    seed: int
    iterations: int
    run_dir: Path
    argv: list[str] = field(default_factory=list)

    @property
    def log(self) -> Path:
        return self.run_dir / "train.log"


@dataclass
class Outcome:
    job: Job
    status: str  # done | skipped | failed
    detail: str = ""


def parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ConfigError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not values:
        raise ConfigError(f"{what}: empty list")
    return values


def plan(depths: list[int], plain: bool, seeds: int, out: Path, iters: int | None,
         overrides: list[str], config: Path | None = None, data_dir: Path | None = None,
         device: str | None = None) -> list[Job]:
    """The runs, in start order, each with its resolved iteration count and train argv."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    jobs = []
    for seed in range(seeds):
        for depth in depths:
            n = depth_to_n(depth)
            for is_plain in ((False, True) if plain else (False,)):
                flags = {"model": {"n": n, "plain": is_plain}, "train": {"seed": seed}}
                cfg = load_config(config, flags, overrides, iters)  # checks every --set up front
                run_dir = out / cfg.name
                argv = ["train", "--n", str(n), "--plain" if is_plain else "--resnet", "--seed", str(seed),
                        "--out", str(run_dir)]
                if config:
                    argv += ["--config", str(config)]
                if iters is not None:
                    argv += ["--iters", str(iters)]
                if data_dir:
                    argv += ["--data-dir", str(data_dir)]
                if device:
                    argv += ["--device", device]
                for text in overrides:
                    argv += ["--set", text]
                jobs.append(Job(cfg.name, n, is_plain, seed, cfg.optim.iters, run_dir, argv))
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise ConfigError("runs would share a folder (is log.name set with --set? leave it to the default)")
    return jobs


def finished(job: Job) -> bool:
    try:
        summary = json.loads((job.run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and summary.get("iterations") == job.iterations


def device_pool(gpus: str | None, device: str | None) -> list[str | None]:
    """GPU ids to hand out one per run; [None] = one slot with the environment as it is."""
    if gpus:
        return [str(g) for g in parse_ints(gpus, "--gpus")]
    if device != "cpu":
        import torch

        if torch.cuda.is_available():
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else []
            return ids or [str(i) for i in range(torch.cuda.device_count())]
    return [None]


def _summary_line(job: Job) -> str:
    try:
        s = json.loads((job.run_dir / "summary.json").read_text())
        return f"test error {s['test_error']:.2f}% after {s['iterations']} iterations"
    except (OSError, ValueError, KeyError, TypeError):
        return "finished"


def start(job: Job, gpu: str | None) -> subprocess.Popen:
    job.run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    log = open(job.log, "a")
    log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {sys.executable} -m resnetdist {' '.join(job.argv)}"
              f"{f'  (CUDA_VISIBLE_DEVICES={gpu})' if gpu is not None else ''}\n")
    log.flush()
    try:
        # same process group as this command: stopping it (Ctrl-C, kill of the group) stops the runs
        return subprocess.Popen([sys.executable, "-m", "resnetdist", *job.argv], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    finally:
        log.close()


def run_all(jobs: list[Job], pool: list[str | None], echo: Callable[[str], None] = print,
            poll_s: float = 0.5) -> list[Outcome]:
    """Run the jobs over the device pool, one per device at a time; return every outcome."""
    outcomes: list[Outcome] = []
    pending = []
    for job in jobs:
        if finished(job):
            echo(f"skip  {job.name}: already finished ({_summary_line(job)})")
            outcomes.append(Outcome(job, "skipped"))
        else:
            pending.append(job)
    free = list(pool)
    running: dict[subprocess.Popen, tuple[Job, str | None, float]] = {}
    total, started = len(pending), 0

    def stop_all(signum, frame):  # noqa: ARG001
        for proc in running:
            if proc.poll() is None:
                proc.terminate()
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, stop_all)
    try:
        while pending or running:
            while pending and free:
                job, gpu = pending.pop(0), free.pop(0)
                started += 1
                resume = " (resuming)" if any(job.run_dir.glob("ckpt_*.pt")) else ""
                where = f"GPU {gpu}" if gpu is not None else "this machine"
                echo(f"[{started}/{total}] start {job.name} on {where}{resume}; log {job.log}")
                running[start(job, gpu)] = (job, gpu, time.monotonic())
            time.sleep(poll_s)
            for proc in [p for p in running if p.poll() is not None]:
                job, gpu, t0 = running.pop(proc)
                free.append(gpu)
                secs = time.monotonic() - t0
                if proc.returncode == 0 and finished(job):
                    echo(f"done  {job.name}: {_summary_line(job)} ({secs:.0f} s)")
                    outcomes.append(Outcome(job, "done"))
                else:
                    why = f"exit code {proc.returncode}" if proc.returncode else "no summary.json written"
                    echo(f"FAIL  {job.name}: {why} ({secs:.0f} s); log {job.log}")
                    outcomes.append(Outcome(job, "failed", f"{why}; log {job.log}"))
    except KeyboardInterrupt:
        for proc in running:
            if proc.poll() is None:
                proc.terminate()
        for proc in running:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        raise
    finally:
        signal.signal(signal.SIGTERM, old)
    return outcomes


def reproduce(depths: list[int], plain: bool, seeds: int, out: Path, gpus: str | None = None,
              iters: int | None = None, overrides: list[str] | None = None, config: Path | None = None,
              data_dir: Path | None = None, device: str | None = None,
              echo: Callable[[str], None] = print) -> tuple[list[Outcome], dict | None]:
    """Plan, run, report. Returns the outcomes and what the report wrote (None if nothing to
    report)."""
    from .report import ReportError, write_report

    overrides = list(overrides or [])
    pool = device_pool(gpus, device)
    if pool != [None] and device is None:
        device = "cuda"
    jobs = plan(depths, plain, seeds, out, iters, overrides, config, data_dir, device)
    out.mkdir(parents=True, exist_ok=True)
    where = f"GPUs {','.join(pool)}" if pool != [None] else "one run at a time on this machine"
    echo(f"{len(jobs)} runs into {out}: {', '.join(j.name for j in jobs)}; {where}")
    outcomes = run_all(jobs, pool, echo)
    written = None
    try:
        written = write_report([out], out)
        echo(f"report: {written['report']} (figure {written['figure']})")
    except ReportError as e:
        echo(f"no report: {e}")
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        echo(f"{len(failed)} of {len(jobs)} runs failed:")
        for o in failed:
            echo(f"  {o.job.name}: {o.detail}")
    return outcomes, written
