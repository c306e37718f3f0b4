"""`reproduce --launcher slurm` on a real one-node Slurm cluster (tests/slurm_cluster.py),
and the checks that need no cluster: the generated script under shellcheck, bad input
refused before anything is submitted.

Tiny runs on the CPU (--gpus-per-task 0): every array task is a real `resnetdist train`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from .conftest import REPO, cli, cli_env
from .slurm_cluster import slurm_cluster  # noqa: F401 - the fixture
from .helpers import check_png

SUITE = ["reproduce", "--iters", "20", "--device", "cpu", "--launcher", "slurm", "--gpus-per-task", "0",
         "--poll-s", "1", "--set", "optim.batch_size=32", "--set", "data.eval_batch=100",
         "--set", "train.eval_every=10", "--set", "train.checkpoint_every=5", "--set", "log.log_every=5",
         "--set", "log.tensorboard=false", "--set", "log.wandb_mode=disabled"]


def reproduce(cluster, args: list[str], timeout: float = 240, code: int = 0) -> subprocess.CompletedProcess:
    """The CLI in a fresh process, as a user runs it (sbatch and squeue reach the test cluster)."""
    env = cli_env(SLURM_CONF=cluster.env["SLURM_CONF"])
    proc = subprocess.run([sys.executable, "-m", "resnetdist", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == code, (f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}\n"
                                     f"{cluster.logs()}")
    return proc


def manifest(out) -> dict:
    return json.loads((out / "suite" / "suite.json").read_text())


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.timeout(360)
def test_four_run_array_with_a_cancelled_task_resubmitted_and_resumed(slurm_cluster, tiny_data, tmp_path):
    """One flow, to keep CI short: 4 runs as one array (--no-wait); task 0 cancelled mid-run;
    --status from another process; the same command again resubmits that run alone, which
    resumes from its checkpoint, waits with the live table, and writes the report of all four."""
    out = tmp_path / "suite4"
    args = [*SUITE, "--iters", "40", "--depths", "8,14", "--plain", "--data-dir", str(tiny_data), "--out", str(out)]
    t0 = time.monotonic()
    first = reproduce(slurm_cluster, [*args, "--no-wait"])
    assert "not waiting" in first.stdout and f"--status {out}" in first.stdout
    (sub,) = manifest(out)["submissions"]
    job = sub["job_id"]
    # one array task per run, longest first
    assert sub["tasks"] == {"0": ["resnet14-s0"], "1": ["plain14-s0"], "2": ["resnet8-s0"], "3": ["plain8-s0"]}
    assert f"submitted job array {job}: 4 run(s) in 4 task(s)" in first.stdout
    victim = out / "resnet14-s0"
    deadline = time.monotonic() + 120
    while not any(victim.glob("ckpt_*.pt")):
        assert time.monotonic() < deadline, (victim / "train.log").read_text() if victim.exists() else "no run"
        time.sleep(0.1)
    slurm_cluster.run("scancel", f"{job}_0")
    slurm_cluster.wait_idle(timeout=180)
    assert not (victim / "summary.json").exists(), "the run finished before it was cancelled"
    states = slurm_cluster.run("squeue", "-h", "-r", "--states=all", "-j", job, "-o", "%i|%T").stdout.split()
    assert sorted(states) == [f"{job}_0|CANCELLED", *(f"{job}_{t}|COMPLETED" for t in (1, 2, 3))]

    status = reproduce(slurm_cluster, ["reproduce", "--status", str(out)]).stdout
    # scancel's SIGTERM is a preemption notice: the run stopped at a checkpoint, and says so
    assert "suite4: 4 run(s): 1 interrupted, 3 done" in status, status
    assert "resnet14-s0  interrupted  resumes from iteration" in status and "(preempted)" in status, status

    again = reproduce(slurm_cluster, args).stdout
    wall = time.monotonic() - t0
    assert again.count(": done (test error") == 3 and "skip  resnet14-s0" not in again
    second = manifest(out)["submissions"][1]
    assert second["tasks"] == {"0": ["resnet14-s0"]}
    assert f"submitted job array {second['job_id']}: 1 run(s) in 1 task(s)" in again
    assert "suite4: 4 run(s): 4 done" in again  # the live table's last state
    log = (victim / "train.log").read_text()
    assert "resuming from" in log and f"array task {second['job_id']}_0" in log
    for name in ("resnet8-s0", "resnet14-s0", "plain8-s0", "plain14-s0"):
        assert json.loads((out / name / "summary.json").read_text())["iterations"] == 40
    md = (out / "report.md").read_text()
    for net in ("ResNet-8", "ResNet-14", "Plain-8", "Plain-14"):
        assert f"| {net} | 40 | 1 |" in md, net
    check_png(out / "figure6.png", (1000, 400))
    print(f"4-run suite on Slurm, one task cancelled and resubmitted: {wall:.1f} s")


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.timeout(360)
def test_scancel_signal_int_stops_the_runs_at_a_checkpoint_and_the_same_command_resumes_them(
        slurm_cluster, tiny_data, tmp_path):
    """The suite's Ctrl-C on Slurm: `scancel --signal=INT --full` reaches the runs of the array
    task, which stop at their next log point with a checkpoint; the batch shell waits for them,
    the log ends with exit code 130, --status says interrupted, and the command again resumes."""
    out = tmp_path / "int"
    args = [*SUITE, "--iters", "300", "--depths", "8", "--no-plain", "--set", "train.checkpoint_every=100",
            "--set", "log.log_every=10", "--set", "train.eval_every=100", "--data-dir", str(tiny_data),
            "--out", str(out)]
    reproduce(slurm_cluster, [*args, "--no-wait"])
    (sub,) = manifest(out)["submissions"]
    metrics = out / "resnet8-s0" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert time.monotonic() < deadline, slurm_cluster.logs()
        time.sleep(0.1)
    status = reproduce(slurm_cluster, ["reproduce", "--status", str(out)]).stdout
    assert "resnet8-s0  running      iteration" in status, status
    slurm_cluster.run("scancel", "--signal=INT", "--full", sub["job_id"])
    slurm_cluster.wait_idle(timeout=120)
    log = (out / "resnet8-s0" / "train.log").read_text()
    assert "interrupted: stopped on SIGINT at iteration" in log and log.rstrip().endswith("exit code 130"), log[-3000:]
    it = max(int(ckpt.name[5:12]) for ckpt in (out / "resnet8-s0").glob("ckpt_*.pt"))
    assert 0 < it < 300 and not (out / "resnet8-s0" / "summary.json").exists()
    status = reproduce(slurm_cluster, ["reproduce", "--status", str(out)]).stdout
    assert f"resnet8-s0  interrupted  resumes from iteration {it}" in status, status

    again = reproduce(slurm_cluster, args).stdout
    assert "int: 1 run(s): 1 done" in again, again
    assert f"resuming from ckpt_{it:07d}.pt" in (out / "resnet8-s0" / "train.log").read_text()
    assert json.loads((out / "resnet8-s0" / "summary.json").read_text())["iterations"] == 300


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_sbatch_refusal_is_reported_before_anything_is_queued(slurm_cluster, tmp_path):
    out = tmp_path / "refused"
    proc = reproduce(slurm_cluster, [*SUITE, "--depths", "8", "--no-plain", "--partition", "nosuch",
                                     "--out", str(out)], code=2)
    assert "sbatch refused the job array" in proc.stderr and "nosuch" in proc.stderr.lower()
    assert "submissions" not in manifest(out)
    assert not slurm_cluster.run("squeue", "-h", "-o", "%i").stdout.strip()


# ----- without a cluster ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_dry_run_script_passes_shellcheck(tmp_path):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    out = tmp_path / "dry"
    result = cli(["reproduce", "--depths", "8,14,110", "--seeds", "2", "--launcher", "slurm", "--dry-run",
                  "--runs-per-task", "2", "--partition", "gpu", "--account", "proj", "--time", "04:00:00",
                  "--sbatch-arg=--mem=8G", "--out", out])
    script = result.stdout
    assert script.startswith("#!/usr/bin/env bash\n")
    for line in ("#SBATCH --array=0-5", "#SBATCH --requeue", "#SBATCH --gpus-per-task=1", "#SBATCH --partition=gpu",
                 "#SBATCH --account=proj", "#SBATCH --time=04:00:00", "#SBATCH --mem=8G"):
        assert line + "\n" in script, line
    # longest first, two runs per task
    assert "    0) runs=(resnet110-s0 plain110-s0) ;;" in script
    assert "    5) runs=(resnet8-s1 plain8-s1) ;;" in script
    assert not out.exists(), "--dry-run wrote files"
    check = subprocess.run(["shellcheck", "-"], input=script, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout


@pytest.mark.timeout(60)
def test_dry_run_script_of_packs_trains_each_nets_seeds_in_one_process(tmp_path):
    """--pack 2 on Slurm: each process of a task trains up to 2 seeds of a net (train --seeds,
    each run in <out>/<net>-s<seed>), the packs' other runs' logs saying where the output is."""
    out = tmp_path / "dry"
    script = cli(["reproduce", "--depths", "8,14", "--seeds", "3", "--launcher", "slurm", "--dry-run",
                  "--pack", "2", "--runs-per-task", "2", "--out", out]).stdout
    # 12 runs: per net a pack of seeds 0,1 and seed 2 alone; two processes per task, longest first
    assert "# resnetdist suite dry: 12 run(s) in 4 array task(s)." in script and "#SBATCH --array=0-3\n" in script
    assert ('    0) runs=(resnet14-s0 plain14-s0) seeds=("0,1" "0,1") packed=("resnet14-s1" "plain14-s1") ;;'
            in script), script
    assert "    1) runs=(resnet14-s2 plain14-s2) ;;" in script  # runs alone: the script of unpacked runs
    assert '    2) runs=(resnet8-s0 plain8-s0) seeds=("0,1" "0,1") packed=("resnet8-s1" "plain8-s1") ;;' in script
    assert f'args+=(--seeds "${{seeds[$i]}}" --out "$out")' in script and f"out={out.resolve()}" in script
    assert not out.exists(), "--dry-run wrote files"
    if shutil.which("shellcheck"):
        check = subprocess.run(["shellcheck", "-"], input=script, capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout


@pytest.mark.timeout(60)
def test_bad_slurm_input_is_named_before_submission(tmp_path, monkeypatch):
    base = ["reproduce", "--depths", "8", "--launcher", "slurm", "--out", tmp_path / "s"]
    assert "21 is not 6n+2" in cli([*base, "--depths", "8,21"], code=2).stderr
    proc = cli([*base, "--sbatch-arg", "--mem 8G"], code=2)
    assert "--sbatch-arg '--mem 8G'" in proc.stderr and "--name=value" in proc.stderr
    assert "--array is set by reproduce itself" in cli([*base, "--sbatch-arg=--array=0-3"], code=2).stderr
    assert "--runs-per-task must be >= 1" in cli([*base, "--runs-per-task", "0"], code=2).stderr
    assert "--pack must be >= 1" in cli([*base, "--pack", "0"], code=2).stderr
    bad_launcher = cli([*base, "--launcher", "pbs"], code=2).stderr  # a choice: listed in -h, completed
    assert "Invalid value for '--launcher'" in bad_launcher and "'pbs' is not one of 'local'," in bad_launcher
    assert "on Slurm use --gpus-per-task and --runs-per-task" in cli([*base, "--runs-per-gpu", "2"], code=2).stderr
    assert "are for --launcher slurm" in cli([*base, "--launcher", "local", "--no-wait"], code=2).stderr
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    assert "`sbatch` is not on PATH" in cli(base, code=2).stderr
    assert not (tmp_path / "s").exists()
