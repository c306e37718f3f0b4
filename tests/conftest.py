"""Shared fixtures: small CIFAR-10-layout data sets the tests write themselves, and a way to
run the real CLI in a subprocess with a timeout (so a hang fails instead of stalling CI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resnetdist.data.cifar import synthetic_split, write_synthetic

# One intra-op thread, as the CLI subprocesses get (OMP_NUM_THREADS=1 in cli_env): on the 2-core
# CI machine two threads per process only contend, and in-process runs then take twice as long.
torch.set_num_threads(1)

# the one small data set of the tests, in the official layout (resnetdist/data/cifar.py)
write_dataset = write_synthetic
learnable_split = synthetic_split

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """5 x 200 training records, 200 test records, official layout."""
    return write_dataset(tmp_path_factory.mktemp("tiny_cifar"), 200, 200)


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        WANDB_MODE="disabled",
        TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def entry(kill_at: tuple[int, int] | None) -> list[str]:
    """How a CLI process starts: `-m resnetdist`, or with kill_at=(iteration, rank) the test-side
    fault injector tests/_kill_worker.py (that rank SIGKILLs itself after that iteration, first
    attempt only), which then runs the same command."""
    if kill_at is None:
        return ["-m", "resnetdist"]
    return [str(REPO / "tests" / "_kill_worker.py"), str(kill_at[0]), str(kill_at[1])]


def run_cli(args: list[str], timeout: float = 240, check: bool = True, kill_at: tuple[int, int] | None = None,
            **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, *entry(kill_at), *args], cwd=REPO, env=cli_env(**env),
        capture_output=True, text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def cli_in_process(args: list[str], check: bool = True, **env: str):
    """The real CLI in this process (typer's runner): for tests where the process boundary adds
    nothing. Returns click's Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from resnetdist.cli import app

    result = CliRunner().invoke(app, args, env={"WANDB_MODE": "disabled", **env})
    if check and result.exit_code != 0:
        raise AssertionError(f"exit {result.exit_code}\nstdout:\n{result.stdout[-4000:]}\n"
                             f"stderr:\n{result.stderr[-4000:]}") from result.exception
    return result


def run_torchrun(nproc: int, args: list[str], timeout: float = 300, check: bool = True, extra: list[str] = (),
                 command: str = "train", kill_at: tuple[int, int] | None = None, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--tee=3", *extra, *entry(kill_at), command, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(**env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


# Small, quick training settings shared by the end-to-end tests.
# "-n", as a user writes it under torchrun (whose parser rejects "--n" as ambiguous).
TINY = ["-n", "1", "--device", "cpu", "--set", "optim.batch_size=32", "--set", "data.eval_batch=100",
        "--set", "log.log_every=10", "--set", "log.tensorboard=false", "--set", "log.wandb_mode=disabled"]
