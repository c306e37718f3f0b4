"""The hang watchdog (dist.HangWatch, dist.hang_timeout_s), for real: a rank frozen with SIGSTOP
under torchrun while dist.timeout_s is far away; the other rank names the hang and exits 7
within dist.hang_timeout_s plus a few seconds, torchrun restarts the group and the run ends
bitwise equal to an uninterrupted one. Also: the watchdog's clock in a process of its own
(it ends the process, so never in pytest's), and DDP's options leaving training bitwise
unchanged on gloo.

Every process a test starts is killed by pid when it ends (stopped ones too), so a hang fails
the test, not CI.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from resnetdist.rundir import RunDir
from resnetdist import checkpoint
from resnetdist.config import ConfigError, load_config

from .conftest import REPO, TINY, cli_env, run_torchrun
from .helpers import kill_tree, popen, worker

try:  # a stock PyTorch CUDA image may lack it: `pytest -m cuda` must still collect this module
    import psutil
except ImportError:
    psutil = None

HANG_S = 10
# dist.timeout_s far above dist.hang_timeout_s: only the watchdog can end the wait
ARGS = [*TINY, "--iters", "30", "--set", "train.eval_every=15", "--set", "train.checkpoint_every=10",
        "--set", "log.log_every=5", "--set", "dist.timeout_s=300", "--set", f"dist.hang_timeout_s={HANG_S}"]
HANG_LINE = re.compile(r"error: rank (\d) on (\S+): no progress for ([\d.]+) s \(dist.hang_timeout_s\) after iteration (\d+), "
                       r"waiting in the (.+?): another rank hung")


# ----- the watchdog's clock, in a process of its own -----------------------------------------------

WATCHED = """
import sys, time
from resnetdist import dist
watch = dist.HangWatch.start({timeout}, rank=3)
with dist.stage("set-up broadcast"):
    time.sleep({timeout} * 1.3)  # before the first iteration: not watched (dist.timeout_s is)
for it in range(1, 3):  # iterations hand out faster than the timeout: progress
    with dist.stage(f"training step in iterations {{it}}-{{it}}"):
        dist.progress(it)
        time.sleep({timeout} * 0.6)
with dist.stage("evaluation at iteration 3"):
    for _ in range(2):  # evaluation batches: progress, however long the evaluation
        time.sleep({timeout} * 0.6)
        dist.progress()
time.sleep({timeout} * 1.3)  # outside a stage (rank 0 writing a checkpoint): no wait on others
print("healthy part done", flush=True)
with dist.stage("checkpoint barrier at iteration 3"):
    time.sleep(60)
print("not reached", flush=True)
"""


@pytest.mark.slow  # 2.5 s of watched silences after python's start: over the fast suite's budget
def test_a_stage_without_progress_for_the_timeout_ends_the_process_with_7_and_one_line():
    timeout = 0.5
    proc = subprocess.Popen([sys.executable, "-c", WATCHED.format(timeout=timeout)], cwd=REPO, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()  # the healthy part took 2.5 s of silences, each shorter than the timeout
        t0 = time.monotonic()
        code = proc.wait(timeout=60)
    finally:
        proc.kill()
    elapsed = time.monotonic() - t0
    assert code == 7 and first == "healthy part done\n" and proc.stdout.read() == "", proc.stderr.read()
    (line,) = proc.stderr.read().splitlines()
    assert HANG_LINE.match(line).groups()[::2] == ("3", "0.5", "checkpoint barrier at iteration 3"), line
    assert line.endswith("exiting 7: not under torchrun, so nothing restarts it: run the same command again to "
                         "resume from the newest checkpoint")
    assert timeout < elapsed < timeout + 2, elapsed  # the watchdog looks every timeout / 10


def test_hang_timeout_is_checked_when_the_configuration_is_read():
    assert load_config(flags={"dist": {"hang_timeout_s": 0}}).dist.hang_timeout_s == 0  # off
    with pytest.raises(ConfigError, match=r"dist.hang_timeout_s must be 0 \(off\) or >= 10, got 5"):
        load_config(flags={"dist": {"hang_timeout_s": 5}})


# ----- a rank frozen with SIGSTOP under torchrun ---------------------------------------------------


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen) -> float:
    """Seconds until predicate() held."""
    t0 = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before {what}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - t0


def gone(p) -> bool:
    return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE


def final_weights(run_dir: Path) -> dict:
    return checkpoint.load(run_dir / "model.pt")["model"]


def records(run_dir: Path) -> list[dict]:
    timing = ("images_per_second", "train_seconds")
    return [{k: v for k, v in json.loads(line).items() if k not in timing}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference2(tmp_path_factory, tiny_data):
    """An uninterrupted 2-rank torchrun run."""
    ref = tmp_path_factory.mktemp("hang") / "ref2"
    run_torchrun(2, [*ARGS, "--data-dir", str(tiny_data), "--out", str(ref)], timeout=240)
    return ref


def check_same_as(ref: Path, out: Path, stdout: str) -> None:
    assert f"resuming from {RunDir(out).checkpoints.path(10).name} (iteration 10 of 30)" in stdout, stdout[-2000:]
    got, want = final_weights(out), final_weights(ref)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert records(out) == records(ref)
    assert json.loads((out / "summary.json").read_text())["test_error"] == json.loads(
        (ref / "summary.json").read_text())["test_error"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_stopped_rank_is_reported_by_the_other_which_exits_7_and_torchrun_resumes_exactly(
        tmp_path, tiny_data, reference2):
    """SIGSTOP freezes rank 1 after the first checkpoint. Rank 0 waits in a collective that
    dist.timeout_s (300 s) would end much later; its watchdog names the hang after
    hang_timeout_s (10 s) and exits 7. torchrun (--max-restarts 1) then stops the workers: the
    frozen one cannot run its SIGTERM handler and goes with the SIGKILL after the agent's 30 s;
    both restart and resume from iteration 10."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--tee=3",
           "--max-restarts=1", "-m", "resnetdist", "train", *ARGS, "--data-dir", str(tiny_data), "--out", str(out)]
    proc = popen(cmd, tmp_path)
    try:
        wait_for(lambda: RunDir(out).checkpoints.path(10).exists(), 150, "the first checkpoint", proc)
        rank0, frozen = worker(proc, 0), worker(proc, 1)
        frozen.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        exit_s = wait_for(lambda: gone(rank0), HANG_S + 30, "rank 0 to end", proc)
        killed_s = wait_for(lambda: gone(frozen), 60, "the frozen rank to be killed", proc)
        resumed_s = wait_for(lambda: "resuming from" in (tmp_path / "stdout").read_text(), 120, "the resume", proc)
        code = proc.wait(timeout=150)
    finally:
        kill_tree(proc)
    stdout, stderr = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    assert code == 0, stderr[-3000:]
    (hang,) = [m for line in stderr.splitlines() if (m := HANG_LINE.search(line))]
    rank, _, seconds, it, what = hang.groups()
    assert (rank, seconds) == ("0", str(HANG_S)) and 10 <= int(it) <= 30, hang.group(0)
    assert what.startswith(("training step", "metrics all-reduce", "evaluation", "checkpoint barrier",
                            "stop agreement")), what
    assert "exitcode: 7" in stderr  # torchrun names rank 0's exit code
    assert exit_s < HANG_S + 5, exit_s  # the watchdog's clock starts at rank 0's last iteration
    assert killed_s < 40, killed_s  # torchrun's 30 s SIGTERM grace, then SIGKILL
    check_same_as(reference2, out, stdout)
    print(f"SIGSTOP of rank 1: rank 0 exited 7 after {exit_s:.1f} s, the frozen rank was killed "
          f"{killed_s:.1f} s later, the job resumed {resumed_s:.1f} s after that and finished "
          f"{time.monotonic() - t0:.1f} s after the SIGSTOP")


# ----- DDP's options: bitwise the same training ----------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_without_buffer_broadcast_and_with_bucket_views_trains_bitwise_as_before(tmp_path, tiny_data):
    """Two ranks over gloo train 6 iterations with DDP's defaults and with wrap.DDP_OPTIONS: every
    rank's weights and momentum, rank 0's BN statistics (what checkpoints and model.pt hold) and
    the evaluation are bitwise the same; only rank 1's own BN statistics, which nothing reads,
    now differ from rank 0's."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "--tee=3", str(REPO / "tests" / "_ddp_options_worker.py"), str(tiny_data), str(tmp_path)],
                          cwd=REPO, env=cli_env(PYTHONPATH=str(REPO)),  # a script's own folder is sys.path[0]
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = {(r, s): torch.load(tmp_path / f"rank{r}-{s}.pt", weights_only=False) for r in (0, 1) for s in ("former", "now")}
    assert got[0, "former"]["ddp"] == {"sync_buffers": True, "gradient_as_bucket_view": False}
    assert got[0, "now"]["ddp"] == {"sync_buffers": False, "gradient_as_bucket_view": True}
    for rank in (0, 1):
        former, now = got[rank, "former"], got[rank, "now"]
        for key, want in former["model"].items():
            if rank == 0 or not key.endswith(("running_mean", "running_var")):
                assert torch.equal(now["model"][key], want), (rank, key)
        for key, want in former["optimizer"]["state"].items():
            assert torch.equal(now["optimizer"]["state"][key]["momentum_buffer"], want["momentum_buffer"]), (rank, key)
        assert now["errors"] == former["errors"] == got[0, "former"]["errors"]
    rank1_stats = [k for k in got[1, "now"]["model"] if k.endswith("running_mean")]
    assert not all(torch.equal(got[1, "now"]["model"][k], got[0, "now"]["model"][k]) for k in rank1_stats)


COMPILED = """
import time
from torch._dynamo.callback import CallbackTrigger, callback_handler
from resnetdist import dist
dist.HangWatch.start({timeout}, rank=0)
dist.HangWatch.count_compiling_as_progress()
with dist.stage("training step in iterations 1-3"):
    dist.progress(0)
    dist.progress(1)  # armed: an iteration is done
    # what torch.compile's compilation is wrapped in (torch._dynamo), here without the compiler's
    # minutes: the callbacks it runs at the start and the end of a compilation
    with callback_handler.install_callbacks(CallbackTrigger.DYNAMO, "0/0"):
        time.sleep({timeout} * 3)
    print("compiled", flush=True)
dist.cleanup()  # the watchdog stopped with the run
with dist.stage("after the run"):
    time.sleep({timeout} * 2)
print("done", flush=True)
"""


@pytest.mark.slow  # python and torch's start in a process of its own
@pytest.mark.timeout(120)
def test_compilation_stops_the_clock_and_cleanup_stops_the_watchdog():
    """Silence three times the timeout inside a compilation's callbacks (a cold torch.compile
    takes minutes in max-autotune; a real one takes 1-80 s on this CPU, too long and too variable
    for a test): no hang. After dist.cleanup, no watchdog."""
    proc = subprocess.run([sys.executable, "-c", COMPILED.format(timeout=0.5)], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0 and proc.stdout.split() == ["compiled", "done"], proc.stderr[-3000:]


# ----- issue 29: the bounds, the phases watched, an exit that cannot block, the raise mode ---------


def test_the_hang_timeout_must_be_below_the_collective_timeout_with_one_line_naming_both():
    default = load_config().dist
    assert default.hang_timeout_s < default.timeout_s and default.timeout_s - default.hang_timeout_s >= 300
    with pytest.raises(ConfigError, match=r"^dist.hang_timeout_s \(600\) must be below dist.timeout_s \(600\)"):
        load_config(flags={"dist": {"hang_timeout_s": 600, "timeout_s": 600}})
    assert load_config(flags={"dist": {"hang_timeout_s": 0, "timeout_s": 20}}).dist.timeout_s == 20  # off: any


def test_on_hang_raise_ends_the_main_threads_wait_with_peer_lost_in_this_process(monkeypatch):
    """setup(on_hang="raise") (resnetdist.train's mode in a notebook): the hang is raised as
    PeerLost in the main thread, the process lives on, the watchdog is gone."""
    from resnetdist import dist
    from resnetdist.errors import PeerLost

    monkeypatch.delenv("TORCHELASTIC_MAX_RESTARTS", raising=False)
    dist.setup("cpu", timeout_s=60, hang_timeout_s=0.3, on_hang="raise")
    t0 = time.monotonic()
    try:
        with pytest.raises(PeerLost, match=r"no progress for 0.3 s \(dist.hang_timeout_s\) after iteration 1, waiting "
                                           r"in the checkpoint barrier at iteration 1: .*raising PeerLost \(7\): not "
                                           r"under torchrun"):
            with dist.stage("checkpoint barrier at iteration 1"):
                dist.progress(0)
                dist.progress(1)  # armed
                while time.monotonic() - t0 < 10:
                    time.sleep(0.01)  # a wait in Python: the exception lands at the next instruction
    finally:
        dist.cleanup()
    assert time.monotonic() - t0 < 0.3 + 2 and dist.HangWatch.current is None
    with pytest.raises(ValueError, match="on_hang must be one of"):
        dist.setup("cpu", timeout_s=60, on_hang="abort")


def test_the_restart_hint_says_what_comes_next(monkeypatch):
    from resnetdist.dist import restart_hint

    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    assert "restarts are off (--max-restarts 0)" in restart_hint() and "MAX_RESTARTS=N" in restart_hint()
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert restart_hint() == "torchrun restarts the job from the newest checkpoint (restart 2 of --max-restarts 3)"


def test_a_compile_pauses_the_clock_only_up_to_compile_pause_s():
    from resnetdist import dist

    watch = dist.HangWatch(1.0, 0, compile_pause_s=5.0)
    try:
        watch.enter("training step in iterations 1-1")
        watch.beat(0)
        watch.beat(1)
        dist.HangWatch.current, saved = watch, dist.HangWatch.current
        dist.HangWatch._compiling(True)
        dist.HangWatch.current = saved
        watch.last = watch.compiling_since = time.monotonic() - 4.0  # 4 s into a compile: paused
        assert watch.stalled_for() == 0.0
        watch.last = watch.compiling_since = time.monotonic() - 7.0  # 7 s: 2 s past the pause
        assert 1.9 < watch.stalled_for() < 2.5
        assert "compiling for longer than dist.compile_pause_s=5 s" in dist.hang_report(watch)
    finally:
        watch.stopped = True


BLOCKED = """
import sys, threading, time
from resnetdist import dist
dist.HangWatch.start({timeout}, rank=0)
with dist.stage("metrics all-reduce at iteration 1"):
    dist.progress(0)
    dist.progress(1)  # armed
    sys.stderr.write("x" * (1 << 22))  # nobody reads the pipe: this write blocks, holding stderr's lock
    sys.stderr.flush()
"""


@pytest.mark.slow  # a process of its own: the exit is what is tested
@pytest.mark.timeout(60)
def test_the_exit_comes_within_the_bound_with_stderr_blocked():
    """stderr is a pipe nobody reads and the main thread is blocked writing to it: fire()'s
    report cannot be written, and the process still exits 7 within hang_timeout_s plus the
    report's wait (HangWatch.REPORT_WAIT_S) and a poll."""
    from resnetdist.dist import HangWatch

    timeout = 0.5
    proc = subprocess.Popen([sys.executable, "-c", BLOCKED.format(timeout=timeout)], cwd=REPO, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        t0 = time.monotonic()
        code = proc.wait(timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        proc.kill()
        proc.stderr.close()
    assert code == 7
    assert elapsed < 10 + timeout + HangWatch.REPORT_WAIT_S + 1, elapsed  # torch's import (~3-8 s here) included


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_a_hang_in_rank_0s_checkpoint_write_is_reported_by_the_other_rank(tmp_path, tiny_data):
    """Rank 0 freezes as its checkpoint write at iteration 10 starts (tests/_stall_checkpoint.py;
    its own watchdog frozen with it): rank 1, waiting in the checkpoint barrier, reports it
    after dist.hang_timeout_s and exits 7. Restarts are off here: the line says how to turn
    them on. (The test ends the job then, rather than wait for torchrun's 30 s grace.)"""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--tee=3",
           "--max-restarts=0", str(REPO / "tests" / "_stall_checkpoint.py"), "10", "train", *ARGS,
           "--data-dir", str(tiny_data), "--out", str(out)]
    proc = popen(cmd, tmp_path, PYTHONPATH=str(REPO))
    stderr = tmp_path / "stderr"
    try:
        wait_for(lambda: any(line.startswith("[default1]:error: rank 1") for line in stderr.read_text().splitlines()),
                 150, "rank 1's report", proc)
        time.sleep(0.5)
    finally:
        kill_tree(proc)
    lines = {int(m.group(1)): (m, line) for line in stderr.read_text().splitlines() if (m := HANG_LINE.search(line))}
    match, line = lines[1]
    assert match.group(3) == str(HANG_S) and match.group(5) == "checkpoint barrier at iteration 10", line
    assert "restarts are off (--max-restarts 0)" in line and "--max-restarts N" in line
    assert 0 not in lines  # frozen
    assert not RunDir(out).checkpoints.path(10).exists()


def test_torchruns_shutdown_grace_is_set_only_where_torchrun_reads_it(monkeypatch):
    """TORCH_ELASTIC_SHUTDOWN_TIMEOUT exists from torch 2.12 on; on 2.11 (the GPU machines')
    torchrun waits a fixed 30 s, and the launcher sets nothing."""
    import torch

    from resnetdist import launcher

    def at_least(major: int, minor: int, version: str) -> bool:
        monkeypatch.setattr(torch, "__version__", version)
        return launcher.torch_at_least(major, minor)

    assert not at_least(2, 12, "2.11.0+cu130") and at_least(2, 12, "2.12.1")
    assert at_least(2, 12, "2.13.0a0+git1234") and not at_least(3, 0, "2.13.0")
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    assert launcher.shutdown_grace_env() == {}
    monkeypatch.setattr(torch, "__version__", "2.12.0")
    assert launcher.shutdown_grace_env() == {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "300"}
