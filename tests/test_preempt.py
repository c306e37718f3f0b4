"""What clusters do to running jobs, done for real: a preemption notice (SIGTERM, SIGUSR1) sent
to a single-process run, to torchrun, to one torchrun worker, and by Slurm to a batch job that
requeues itself; a burst of signals while the stop checkpoint is written; a rank frozen with
SIGSTOP under torchrun --max-restarts. Every interrupted run is started again and must end with
the weights of an uninterrupted run, bitwise. Every process has a timeout, and processes a test
stopped or started are killed by pid when it ends, so a hang fails the test, not CI.

In-process tests (fast) cover the pieces: the signal handler only notes, a signal in the middle
of a checkpoint write does not tear it, and the stage that names a lost peer (the loop's stop is
in test_loop.py).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist

from resnetdist import checkpoint, dist
from resnetdist.rundir import RunDir
from resnetdist.training import preempt
from resnetdist.errors import Preempted

from .conftest import REPO, RESUMABLE, TINY, cli_env, run_cli, run_torchrun
from .slurm_cluster import slurm_cluster  # noqa: F401 - the fixture
from .helpers import assert_bitwise_equal, final_weights, finish, kill_tree, popen, read_jsonl, temp_files, wait_for, worker

try:  # a stock PyTorch CUDA image may lack it: `pytest -m cuda` must still collect this module
    import psutil
except ImportError:
    psutil = None

# log every 5 iterations: a stop lands at most 5 iterations after the signal
ARGS = [*RESUMABLE, "--set", "dist.timeout_s=20", "--set", "dist.hang_timeout_s=0"]  # the collective timeout alone
STOPPED = re.compile(r"(?:preempted|interrupted): stopped on (SIG\w+) at iteration (\d+), after writing its checkpoint")


@pytest.fixture
def restore_handlers():
    """A noted signal leaves the note handler installed (the process is meant to exit): put the
    previous handlers back after in-process tests."""
    before = {s: signal.getsignal(s) for s in preempt.SIGNALS}
    yield
    for s, handler in before.items():
        signal.signal(s, handler)


# ----- in process ---------------------------------------------------------------------------------


def test_signals_are_only_noted_and_the_first_names_the_stop(restore_handlers):
    with preempt.notice() as notice:
        assert notice.agreed(5) == ""
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # would end this process, were it not only noted
        assert notice.signum == signal.SIGUSR1 and notice.agreed(10) == "SIGUSR1"
    os.kill(os.getpid(), signal.SIGTERM)  # after a stop repeats are ignored: the process is on its way out
    assert signal.getsignal(signal.SIGTERM) == signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
    assert signal.getsignal(signal.SIGINT) == notice.note  # a second Ctrl-C still stops at once


def test_without_a_signal_the_previous_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with preempt.notice():
        assert signal.getsignal(signal.SIGTERM) != before
    assert signal.getsignal(signal.SIGTERM) == before


def test_signals_in_the_middle_of_a_checkpoint_write_do_not_tear_it(tmp_path, monkeypatch, restore_handlers):
    """Two real SIGTERMs arrive while the checkpoint's bytes are being fsynced (between write
    and rename): the write completes, the file and its checksum are whole."""
    real_fsync, sent = os.fsync, []

    def fsync_under_fire(fd):
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGTERM)
            sent.append(fd)
        return real_fsync(fd)

    state = {"model": {"w": torch.arange(100_000, dtype=torch.float32)}, "iteration": 10}
    with preempt.notice() as notice:
        monkeypatch.setattr(checkpoint.os, "fsync", fsync_under_fire)
        path = RunDir(tmp_path).checkpoints.save(10, state, keep=2)
        monkeypatch.undo()
    assert sent and notice.signum == signal.SIGTERM
    assert torch.equal(checkpoint.load(path)["model"]["w"], state["model"]["w"])  # the sha256 sidecar matches
    assert temp_files(tmp_path) == []


def test_a_failed_collective_becomes_one_error_naming_the_stage():
    """A one-rank gloo group, so that stage() sees an initialized process group; the failure is
    gloo's own message for a peer that did not answer."""
    store = tdist.HashStore()
    tdist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with pytest.raises(dist.PeerLost) as info:
            with dist.stage("metrics all-reduce at iteration 30"):
                raise RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 20000ms for recv")
        assert "the metrics all-reduce at iteration 30 failed" in str(info.value)
        assert info.value.exit_code == 7
        with pytest.raises(ValueError):  # anything else passes through untouched
            with dist.stage("evaluation"):
                raise ValueError("not a peer")
        assert dist.all_reduce_max(6) == 6
    finally:
        tdist.destroy_process_group()
    with pytest.raises(RuntimeError, match="Timed out"):  # no process group: nothing to blame on a peer
        with dist.stage("x"):
            raise RuntimeError("Timed out")


# ----- end to end: signals to real processes --------------------------------------------------------


def ctrl_c(proc: subprocess.Popen) -> None:
    """What a terminal does on Ctrl-C: SIGINT to every process of the foreground process group."""
    os.killpg(proc.pid, signal.SIGINT)


def started(out: Path, proc: subprocess.Popen) -> None:
    """Mid-run: its first checkpoint (iteration 10) is written; 20 iterations are left."""
    wait_for(lambda: RunDir(out).checkpoints.path(10).exists(), 150, "the first checkpoint", proc)


def check_stopped_at_a_checkpoint(out: Path, stderr: str, sig: signal.Signals, ranks: int = 1) -> int:
    stops = STOPPED.findall(stderr)
    assert len(stops) == ranks and {s for s, _ in stops} == {sig.name}, stderr[-3000:]
    (it,) = {int(i) for _, i in stops}  # every rank stopped at the same iteration
    assert it % 5 == 0 and 15 <= it < 30, it  # a log point after the signal, before the end
    assert RunDir(out).checkpoints.newest_first()[0] == RunDir(out).checkpoints.path(it)
    assert checkpoint.load(RunDir(out).checkpoints.path(it))["iteration"] == it  # whole, checksum matches
    assert temp_files(out) == [] and not (out / "summary.json").exists()
    return it


def check_same_as(ref: Path, out: Path, resumed_stdout: str, it: int) -> None:
    assert f"resuming from {RunDir(out).checkpoints.path(it).name} (iteration {it} of 30)" in resumed_stdout
    assert_bitwise_equal(final_weights(ref), final_weights(out))
    timing = ("images_per_second", "train_seconds")
    assert [{k: v for k, v in r.items() if k not in timing} for r in read_jsonl(out / "metrics.jsonl")] == [
        {k: v for k, v in r.items() if k not in timing} for r in read_jsonl(ref / "metrics.jsonl")]


@pytest.fixture  # reference_run trains it once per session
def reference(reference_run):
    """An uninterrupted single-process run (also the Slurm job's: torchrun with one worker
    makes no process group, so it is the same computation); shared with test_faults.py."""
    return reference_run(RESUMABLE)


@pytest.fixture  # reference_run trains it once per session
def reference2(reference_run):
    """An uninterrupted 2-rank torchrun run."""
    return reference_run(RESUMABLE, nproc=2)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig, burst", [(signal.SIGTERM, 20), (signal.SIGUSR1, 0)], ids=["SIGTERM-x21", "SIGUSR1"])
def test_a_signal_stops_a_single_process_run_at_a_checkpoint_and_it_resumes_exactly(
        tmp_path, tiny_data, reference, sig, burst):
    """SIGTERM comes with 20 more right behind it (schedulers and people repeat themselves): they
    land while the stop checkpoint is written and must neither tear it nor kill the process."""
    out = tmp_path / "run"
    args = ["train", *ARGS, "--data-dir", str(tiny_data), "--out", str(out)]
    proc = popen([sys.executable, "-m", "resnetdist", *args], tmp_path)
    started(out, proc)
    t0 = time.monotonic()
    proc.send_signal(sig)
    for _ in range(burst):
        time.sleep(0.01)
        proc.send_signal(sig)
    code, _, stderr = finish(proc, tmp_path, timeout=120)
    stop_s = time.monotonic() - t0
    assert code == 6, stderr[-3000:]
    it = check_stopped_at_a_checkpoint(out, stderr, sig)
    t1 = time.monotonic()
    resumed = run_cli(args)
    check_same_as(reference, out, resumed.stdout, it)
    print(f"{sig.name} x{burst + 1}: stopped at {it} in {stop_s:.1f} s, resumed run {time.monotonic() - t1:.1f} s")


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("sig, target", [(signal.SIGTERM, "torchrun"), (signal.SIGUSR1, "rank 1")],
                         ids=["SIGTERM-to-torchrun", "SIGUSR1-to-rank1"])
def test_a_signal_stops_every_rank_of_a_torchrun_job_at_one_iteration_and_it_resumes_exactly(
        tmp_path, tiny_data, reference2, sig, target):
    """SIGTERM to torchrun, which passes it on to both workers; SIGUSR1 to rank 1 alone, which
    the all-reduce at the next log point makes rank 0's stop too."""
    out = tmp_path / "run"
    args = [*ARGS, "--data-dir", str(tiny_data), "--out", str(out)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--tee=3",
           "-m", "resnetdist", "train", *args]
    proc = popen(cmd, tmp_path)
    started(out, proc)
    t0 = time.monotonic()
    (proc if target == "torchrun" else worker(proc, 1)).send_signal(sig)
    code, _, stderr = finish(proc, tmp_path, timeout=120)
    stop_s = time.monotonic() - t0
    assert code != 0
    assert "exitcode  : 6" in stderr or "SignalException" in stderr, stderr[-3000:]
    it = check_stopped_at_a_checkpoint(out, stderr, sig, ranks=2)
    t1 = time.monotonic()
    resumed = run_torchrun(2, args, timeout=240)
    check_same_as(reference2, out, resumed.stdout, it)
    print(f"{sig.name} to {target}: both ranks stopped at {it} in {stop_s:.1f} s, "
          f"resumed run {time.monotonic() - t1:.1f} s")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_stopped_rank_fails_the_job_within_the_timeout_and_torchrun_restarts_it_exactly(
        tmp_path, tiny_data, reference2):
    """SIGSTOP freezes rank 1 mid-run. Rank 0 waits in its next collective (the gradient
    all-reduce, or a log point's) until dist.timeout_s (20 s), then exits 7 naming the stage; torchrun (--max-restarts 1) stops the
    workers (the frozen one only goes with SIGKILL, after torchrun's 30 s grace: its SIGTERM
    handler cannot run while it is stopped), restarts both, and they resume from iteration 10."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--tee=3",
           "--max-restarts=1", "-m", "resnetdist", "train", *ARGS, "--data-dir", str(tiny_data), "--out", str(out)]
    proc = popen(cmd, tmp_path)
    started(out, proc)
    frozen = worker(proc, 1)
    frozen.send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    resumed_line = "resuming from"
    wait_for(lambda: resumed_line in (tmp_path / "stdout").read_text(), 150, "the restarted job to resume", proc)
    recover_s = time.monotonic() - t0
    code, stdout, stderr = finish(proc, tmp_path, timeout=150)
    assert code == 0, stderr[-3000:]
    assert not frozen.is_running() or frozen.status() == psutil.STATUS_ZOMBIE
    # the wait rank 0 was in when rank 1 froze: on a loaded machine rank 1 may get a few
    # iterations past the first checkpoint before the SIGSTOP lands (into iteration 15's evaluation)
    assert (re.search(r"\[default0\]:error: rank 0: the (training step \(gradient all-reduce\) in iterations 1[1-9]-"
                      r"|metrics all-reduce at iteration 1|stop agreement at iteration 1|evaluation at iteration 1)",
                      stderr)
            and "within dist.timeout_s=20 s" in stderr
            # gloo words its timeout two ways, depending on where the wait was when it fired
            and re.search(r"Timed out waiting 20000ms|Application timeout caused pair closure", stderr)), stderr[-3000:]
    assert "exitcode: 7" in stderr  # torchrun names rank 0's exit code
    assert recover_s < 20 + 30 + 60, recover_s  # timeout + torchrun's grace + a restart, with slack
    check_same_as(reference2, out, stdout, 10)
    print(f"SIGSTOP of rank 1: job resumed {recover_s:.1f} s later, finished {time.monotonic() - t0:.1f} s later")


# ----- Ctrl-C: a person at the terminal ---------------------------------------------------------------


def test_a_first_ctrl_c_is_noted_and_a_second_stops_at_once(restore_handlers):
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with preempt.notice() as notice:
            os.kill(os.getpid(), signal.SIGINT)  # would raise KeyboardInterrupt here, were it not noted
            assert notice.agreed(5) == "SIGINT" and Preempted(5, "SIGINT").exit_code == 130
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs between bytecodes: the interrupt comes before this ends
        pytest.fail("the second Ctrl-C did not interrupt")  # pragma: no cover
    signal.signal(signal.SIGINT, before)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ctrl_c_stops_at_a_checkpoint_says_how_to_resume_and_the_rerun_resumes_exactly(tmp_path, tiny_data, reference):
    """It used to print ^C, exit 130 and leave no checkpoint: a rerun started from 0. W&B (offline)
    marks the stopped run preempting, with exit code 130, not failed; the rerun finishes it."""
    from .wandb_file import OfflineRun

    out = tmp_path / "run"
    args = ["train", *ARGS, "--data-dir", str(tiny_data), "--out", str(out), "--set", "log.wandb_mode=offline"]
    proc = popen([sys.executable, "-m", "resnetdist", *args], tmp_path, session=True)
    started(out, proc)
    ctrl_c(proc)
    code, _, stderr = finish(proc, tmp_path, timeout=120)
    assert code == 130, stderr[-3000:]
    it = check_stopped_at_a_checkpoint(out, stderr, signal.SIGINT)
    assert "run the same command again to resume" in stderr and "Traceback" not in stderr
    (stopped,) = [OfflineRun(f) for f in (out / "wandb").glob("offline-run-*")]
    (exit_record,) = [r.exit for r in stopped.records if r.WhichOneof("record_type") == "exit"]
    assert "preempting" in stopped.kinds and exit_record.exit_code == 130
    check_same_as(reference, out, run_cli(args).stdout, it)
    resumed = [OfflineRun(f) for f in (out / "wandb").glob("offline-run-*") if f.name != stopped.file.parent.name]
    (exit_record,) = [r.exit for r in resumed[0].records if r.WhichOneof("record_type") == "exit"]
    assert resumed[0].run.run_id == stopped.run.run_id and exit_record.exit_code == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(tmp_path, tiny_data):
    """The only log point is the end (5000 iterations away): the first Ctrl-C would wait for it,
    the second must not."""
    out = tmp_path / "run"
    args = ["train", *TINY, "--iters", "5000", "--set", "log.log_every=5000", "--set", "train.eval_every=5000",
            "--set", "train.checkpoint_every=5000", "--data-dir", str(tiny_data), "--out", str(out)]
    proc = popen([sys.executable, "-m", "resnetdist", *args], tmp_path, session=True)
    wait_for(lambda: (out / "config.toml").exists(), 150, "the run to start training", proc)
    time.sleep(1)
    ctrl_c(proc)
    time.sleep(1)
    assert proc.poll() is None  # the first one waits for a log point
    t0 = time.monotonic()
    ctrl_c(proc)
    code, _, stderr = finish(proc, tmp_path, timeout=60)
    assert code == 130, stderr[-3000:]
    assert time.monotonic() - t0 < 15
    assert "interrupted at once" in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert RunDir(out).checkpoints.newest_first() == [] and temp_files(out) == [] and not (out / "summary.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_under_the_torchrun_launcher(tmp_path, tiny_data, reference2, presses):
    """`train --nproc-per-node 2`: Ctrl-C reaches the launcher (its workers run in sessions of
    their own), which passes it on; once: both ranks stop at one iteration with a checkpoint and
    the rerun resumes exactly; twice: the workers stop at once."""
    out = tmp_path / "run"
    # twice: no stop point for 10,000 iterations, so only the second Ctrl-C can end the run soon
    extra = [] if presses == 1 else ["--set", "log.log_every=10000", "--set", "train.checkpoint_every=30000",
                                     "--set", "train.eval_every=30000", "--iters", "30000"]
    args = ["train", *ARGS, *extra, "--data-dir", str(tiny_data), "--out", str(out)]
    proc = popen([sys.executable, "-m", "resnetdist", *args, "--nproc-per-node", "2"], tmp_path, session=True)
    if presses == 1:
        started(out, proc)
    else:  # rank 0 writes config.toml once its signal handlers are in place
        wait_for(lambda: (out / "config.toml").exists(), 150, "the run to start", proc)
        time.sleep(2)
    ctrl_c(proc)
    if presses == 2:
        time.sleep(1)
        ctrl_c(proc)
    t0 = time.monotonic()
    code, _, stderr = finish(proc, tmp_path, timeout=120)
    assert code == 130, stderr[-3000:]
    if presses == 1:
        it = check_stopped_at_a_checkpoint(out, stderr, signal.SIGINT)  # one line: rank 0's
        check_same_as(reference2, out, run_torchrun(2, args[1:], timeout=240).stdout, it)
    else:
        assert time.monotonic() - t0 < 40, stderr[-3000:]
        assert "interrupted at once" in stderr and not STOPPED.search(stderr), stderr[-3000:]
        assert not psutil.pid_exists(proc.pid) or psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE


# ----- Slurm: the warning signal, a checkpoint, a requeue, a resume --------------------------------------


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.timeout(400)
def test_slurm_warning_signal_checkpoints_requeues_and_resumes_exactly(slurm_cluster, tmp_path, tiny_data, reference):
    """launch/slurm.sbatch as a user submits it, on one CPU (one torchrun worker). The test sends
    the warning Slurm sends before the time limit, `scancel --signal=USR1 --batch`: the batch
    shell passes it on (srun -> torchrun -> the worker), the worker checkpoints and stops, the
    script requeues the job; released, it resumes and finishes with the reference weights."""
    out, log = tmp_path / "run", tmp_path / "job.out"
    env = cli_env(SLURM_CONF=slurm_cluster.env["SLURM_CONF"], GPUS_PER_NODE="1", RDZV_HOST="127.0.0.1",
                  PYTHON=sys.executable, MAX_RESTARTS="0")
    job = slurm_cluster.submit(REPO / "launch" / "slurm.sbatch", [*ARGS, "--data-dir", str(tiny_data), "--out", str(out)],
                               nodes=1, log=log, name="preempt", env=env, cwd=REPO)
    t0 = time.monotonic()
    try:
        _warn_and_release(slurm_cluster, job, out, log)
        slurm_cluster.wait_completed(job, log, 180)
    finally:
        slurm_cluster.cancel_all()
    text = log.read_text()
    (stop,) = STOPPED.findall(text)
    it = int(stop[1])
    assert stop[0] == "SIGUSR1" and f"resuming from {RunDir(out).checkpoints.path(it).name} (iteration {it} of 30)" in text
    assert "requeueing job" in text and "(restart 1)" in text
    check_same_as(reference, out, text, it)
    print(f"Slurm USR1: stopped at {it}, requeued, resumed; {time.monotonic() - t0:.1f} s from submission")
    print("\n".join(line for line in text.splitlines() if line.startswith(("resnetdist:", "preempted:", "srun:"))))


def _warn_and_release(cluster, job: str, out: Path, log: Path) -> None:
    deadline = time.monotonic() + 150
    while not RunDir(out).checkpoints.path(10).exists():
        assert time.monotonic() < deadline, (cluster.job_state(job), log.read_text() if log.exists() else "", cluster.logs())
        time.sleep(0.2)
    cluster.warn_and_release(job, log, deadline + 60)
