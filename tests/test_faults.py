"""What clusters do to jobs, done for real: a file-size limit (RLIMIT_FSIZE) that makes a
checkpoint write fail, a second launch into a live run's directory, a SIGKILLed holder, and a
checkpoint with a flipped byte. In-process tests use checkpoint/rundir directly; the
end-to-end ones run the real CLI (and torchrun) in subprocesses with timeouts."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from resnetdist import checkpoint
from resnetdist.errors import RunDirBusy
from resnetdist.rundir import Checkpoints, RunDir, append_exit

from .conftest import REPO, RESUMABLE, TINY, cli_env, run_cli
from .helpers import assert_bitwise_equal, final_weights, temp_files, wait_for

# keep 2: the full-disk test checks that pruning waits for the new checkpoint's write
ARGS = [*RESUMABLE, "--set", "train.keep_checkpoints=2"]


def flip_middle_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))  # same size: a bit-rot or bad-disk fault, not a torn write


def fake_state(iteration: int) -> dict:
    # mostly tensor payload, so the middle byte of the file lies inside a tensor's data
    return {"model": {"w": torch.arange(50_000, dtype=torch.float32) + iteration}, "iteration": iteration}


# ----- checksums (in process) ------------------------------------------------------------------


def test_flipped_byte_is_caught_by_the_checksum_and_the_previous_checkpoint_used(tmp_path):
    RunDir(tmp_path).checkpoints.save(10, fake_state(10), keep=3)
    newest = RunDir(tmp_path).checkpoints.save(20, fake_state(20), keep=3)
    flip_middle_byte(newest)
    # the fault is real: torch.load alone reads the damaged file without complaint
    silently_wrong = torch.load(newest, weights_only=True)["model"]["w"]
    assert not torch.equal(silently_wrong, fake_state(20)["model"]["w"])

    warnings = []
    path, state = RunDir(tmp_path).checkpoints.load_newest(warn=warnings.append)
    assert path.name == "ckpt_0000010.pt" and state["iteration"] == 10
    assert len(warnings) == 1 and str(newest) in warnings[0] and "checksum" in warnings[0]
    with pytest.raises(checkpoint.CorruptCheckpoint, match="ckpt_0000020.pt"):
        checkpoint.load(newest)


def test_checkpoint_without_a_checksum_from_an_older_version_still_loads(tmp_path):
    path = RunDir(tmp_path).checkpoints.save(10, fake_state(10), keep=3)
    checkpoint.checksum_path(path).unlink()
    found_path, state = RunDir(tmp_path).checkpoints.load_newest(warn=pytest.fail)
    assert found_path == path and torch.equal(state["model"]["w"], fake_state(10)["model"]["w"])


def test_pruning_removes_sidecars_with_their_checkpoints(tmp_path):
    # a sidecar whose checkpoint never arrived: its writer was killed between the two renames
    checkpoint.checksum_path(RunDir(tmp_path).checkpoints.path(5)).write_text("0" * 64 + "  ckpt_0000005.pt\n")
    for it in (10, 20, 30):
        RunDir(tmp_path).checkpoints.save(it, fake_state(it), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt_0000020.pt", "ckpt_0000020.pt.sha256", "ckpt_0000030.pt", "ckpt_0000030.pt.sha256"]
    # the sidecar is in sha256sum's format, so it can be checked by hand
    check = subprocess.run(["sha256sum", "-c", "ckpt_0000030.pt.sha256"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=30)
    assert check.returncode == 0 and "OK" in check.stdout


def test_a_failed_write_raises_write_error_and_leaves_no_trace(tmp_path):
    """A real OS error: the destination is a directory, so the final rename fails (EISDIR)
    after the data and its sidecar were written."""
    target = RunDir(tmp_path).checkpoints.path(10)
    target.mkdir()
    with pytest.raises(checkpoint.WriteError) as info:
        RunDir(tmp_path).checkpoints.save(10, fake_state(10), keep=2)
    assert str(info.value) == f"could not write {target}: [Errno 21] Is a directory"
    assert info.value.exit_code == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_0000010.pt"]  # no temp file, no sidecar


# ----- the run-directory lock (in process) -------------------------------------------------------


def test_run_directory_lock_refuses_a_second_holder_and_is_released(tmp_path):
    run = tmp_path / "run"
    stale = run / ".ckpt_0000010.pt.tmp-12345"  # left by a writer killed mid-write
    run.mkdir()
    stale.write_bytes(b"partial")
    # a lock file left by a run that has died holds no lock: only the flock counts
    (run / ".lock").write_text('{"pid": 999999, "host": "elsewhere"}\n')
    with RunDir(run).acquire():
        assert not stale.exists()
        for attempt in (RunDir(run).acquire, RunDir(run).check_free):  # flock conflicts across descriptors
            with pytest.raises(RunDirBusy) as info:
                attempt()
            assert str(run) in str(info.value) and f"pid {os.getpid()} on host" in str(info.value)
    RunDir(run).check_free()
    RunDir(run).acquire().release()


def test_a_run_folder_states_where_it_stands_by_one_rule(tmp_path):
    """RunDir.state, from the folder alone: fresh, resumable from the newest checkpoint, stopped
    or failed by the log's end, running while the lock is held, finished only by a summary of
    this run's length (and name) with a test error."""
    run = RunDir(tmp_path / "run")
    assert run.state(30).kind == "fresh" and not (tmp_path / "run").exists()
    run.path.mkdir()
    run.checkpoints.save(10, fake_state(10), keep=2)
    run.checkpoints.save(20, fake_state(20), keep=2)
    state = run.state(30)
    assert (state.kind, state.iteration, state.checkpoint) == ("resumable", 20, run.checkpoints.path(20))
    run.log.write_text("interrupted: stopped at iteration 20\n")
    assert run.state(30).kind == "stopped"
    append_exit(run.log, 1)
    state = run.state(30)
    assert (state.kind, state.exit_code, state.last_line) == ("failed", 1, "interrupted: stopped at iteration 20")
    with run.acquire():
        assert run.state(30).kind == "running" and run.state(30).holder["pid"] == os.getpid()
    run.write_summary({"name": "r", "iterations": 20, "test_error": 9.0})  # another length: not this run's end
    assert run.state(30).kind == "failed" and run.finished(30) is None
    run.write_summary({"name": "r", "iterations": 30, "test_error": 9.0})
    assert run.state(30).summary["test_error"] == 9.0 and run.finished(30, "r") and run.finished(30, "other") is None


def test_probing_a_directory_creates_nothing(tmp_path):
    RunDir(tmp_path / "new").check_free()
    assert not (tmp_path / "new").exists()


# ----- end to end -------------------------------------------------------------------------------


@pytest.fixture  # reference_run trains it once per session
def reference(reference_run):
    """An uninterrupted 30-iteration run: the weights every resumed run must match bitwise
    (shared with test_preempt.py; keep_checkpoints changes no weight)."""
    return reference_run(RESUMABLE)


@pytest.fixture(scope="module")
def killed_at_25(tmp_path_factory, tiny_data):
    """The same run SIGKILLed after iteration 25: checkpoints at 10 and 20. Tests copy it."""
    cut = tmp_path_factory.mktemp("faults") / "killed"
    proc = run_cli(["train", *ARGS, "--data-dir", str(tiny_data), "--out", str(cut)], check=False,
                   kill_at=(25, 0))
    assert proc.returncode == -signal.SIGKILL
    return cut


def run_limited(cmd: list[str], max_file_bytes: int, timeout: float, **env: str) -> subprocess.CompletedProcess:
    """Run with a real RLIMIT_FSIZE: writing past it fails with EFBIG (SIGXFSZ if not ignored)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, resource.RLIM_INFINITY))

    # no .pyc writes: they happen before the CLI could ignore SIGXFSZ
    return subprocess.run(cmd, cwd=REPO, env=cli_env(PYTHONDONTWRITEBYTECODE="1", **env), preexec_fn=limit,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_full_disk_stops_with_one_message_keeps_old_checkpoints_and_resumes_exactly(
        tmp_path, tiny_data, reference, killed_at_25):
    cut = tmp_path / "cut"
    shutil.copytree(killed_at_25, cut)
    ckpt_20 = RunDir(cut).checkpoints.path(20)
    limit = ckpt_20.stat().st_size // 2  # every checkpoint has this size; config.toml etc. are far smaller
    args = ["train", *ARGS, "--data-dir", str(tiny_data), "--out", str(cut)]
    proc = run_limited([sys.executable, "-m", "resnetdist", *args], limit, timeout=240)

    assert proc.returncode == 4, proc.stderr[-3000:]
    failed = RunDir(cut).checkpoints.path(30)
    # the tiny data set's note ("... holds 200 records") may come first; the error is one line
    *notes, last = proc.stderr.strip().splitlines()
    assert last == f"error: could not write {failed}: [Errno 27] File too large"
    assert all(line.startswith("note: ") for line in notes), notes
    assert not failed.exists() and not checkpoint.checksum_path(failed).exists() and temp_files(cut) == []
    for it in (10, 20):  # pruning to keep 2 must not have run before the failed write
        assert checkpoint.load(RunDir(cut).checkpoints.path(it))["iteration"] == it

    resumed = run_cli(args)
    assert "iteration 20" in resumed.stdout
    assert_bitwise_equal(final_weights(reference), final_weights(cut))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_flipped_byte_in_newest_checkpoint_resumes_from_the_previous(tmp_path, tiny_data, reference, killed_at_25):
    cut = tmp_path / "cut"
    shutil.copytree(killed_at_25, cut)
    newest = RunDir(cut).checkpoints.path(20)
    size = newest.stat().st_size
    flip_middle_byte(newest)
    assert newest.stat().st_size == size
    resumed = run_cli(["train", *ARGS, "--data-dir", str(tiny_data), "--out", str(cut)])
    assert f"warning: checkpoint {newest} is unreadable (CorruptCheckpoint" in resumed.stdout
    assert "resuming from ckpt_0000010.pt (iteration 10 of 30)" in resumed.stdout
    assert_bitwise_equal(final_weights(reference), final_weights(cut))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_rank0_write_failure_under_torchrun_ends_the_whole_job(tmp_path, tiny_data, reference):
    """Rank 0 cannot write its first checkpoint; rank 1 waits at the barrier after it. The job
    must end promptly (torchrun sees rank 0 exit 4 and stops rank 1), not after dist.timeout_s
    (600 s, far beyond this subprocess's 150 s timeout)."""
    out = tmp_path / "run"
    limit = RunDir(reference).checkpoints.path(30).stat().st_size // 2
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--tee=3",
           "-m", "resnetdist", "train", *ARGS, "--data-dir", str(tiny_data), "--out", str(out)]
    proc = run_limited(cmd, limit, timeout=150)
    assert proc.returncode != 0
    assert f"[default0]:error: could not write {RunDir(out).checkpoints.path(10)}: [Errno 27]" in proc.stderr
    assert "exitcode  : 4" in proc.stderr  # torchrun's summary names rank 0's exit code as the root cause
    assert RunDir(out).checkpoints.newest_first() == [] and temp_files(out) == []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_live_run_directory_refuses_a_second_launch_and_a_killed_one_does_not(tmp_path, tiny_data):
    out = tmp_path / "run"
    args = ["train", *TINY, "--iters", "5000", "--set", "train.eval_every=5000", "--set", "train.checkpoint_every=10",
            "--data-dir", str(tiny_data), "--out", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "resnetdist", *args], cwd=REPO, env=cli_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: RunDir(out).checkpoints.newest_first(), 120, "its first checkpoint", first)
        config_before = (out / "config.toml").read_bytes()
        for launch in ([], ["--nproc-per-node", "2"]):  # the torchrun launcher refuses before starting it
            t0 = time.monotonic()
            second = run_cli([*args, *launch], check=False, timeout=60)
            assert second.returncode == 5, second.stderr[-3000:]
            assert f"run directory {out} is in use" in second.stderr and f"pid {first.pid} on host" in second.stderr
            assert "torch.distributed" not in second.stderr
            print(f"refused in {time.monotonic() - t0:.1f} s")
        assert first.poll() is None and (out / "config.toml").read_bytes() == config_before
    finally:
        first.kill()
        first.wait(timeout=30)

    # the dead run's lock went with it: the next launch resumes from its newest checkpoint
    newest = RunDir(out).checkpoints.newest_first()[0]
    it = Checkpoints.iteration(newest)
    third = run_cli(args, check=False, timeout=120, kill_at=(it + 1, 0))
    assert third.returncode == -signal.SIGKILL, third.stderr[-3000:]
    assert f"resuming from {newest.name} (iteration {it} of 5000)" in third.stdout
    assert temp_files(out) == []  # a write the SIGKILL cut short left nothing behind either
