"""Shared fixtures: small CIFAR-10-layout data sets the tests write themselves, uninterrupted
reference runs, and ways to run the real CLI (in a subprocess with a timeout, so a hang fails
instead of stalling CI, or in this process). Other shared helpers: tests/helpers.py."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

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


# Under pytest-xdist, `--dist loadscope` (.ci/run) runs each test module on one worker, so its
# module-scoped fixtures (trained runs) are made once; the scheduler below also puts every test
# on this machine's shared daemons and names (the Docker engine and its image tags, the Slurm
# test clusters, network namespaces) in one scope, so those run one at a time. (Not xdist_group
# marks with --dist loadgroup: pytest 9.2 no longer honours them, pytest-xdist issue #1386.)
MACHINE_WIDE_FILES = ("tests/test_docker.py::", "tests/test_slurm.py::", "tests/test_multinode.py::")


def machine_wide(nodeid: str) -> bool:
    """By the test's id alone (all the scheduler sees): those files, and any test named for Slurm."""
    return nodeid.startswith(MACHINE_WIDE_FILES) or "slurm" in nodeid.rsplit("::", 1)[-1]


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: pytest runs without xdist too
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class MachineWideInOneScope(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "machine-wide" if machine_wide(nodeid) else super()._split_scope(nodeid)

    return MachineWideInOneScope(config, log)


def pytest_collection_modifyitems(config, items):
    """A test on the Docker engine, a Slurm cluster or network namespaces that machine_wide does
    not recognise could run beside another under xdist: refuse to run at all."""
    shared = [item for item in items if {"docker", "slurm"} & {m.name for m in item.iter_markers()}
              or "namespaces_possible" in item.fixturenames]  # tests/test_multinode.py's nodes
    stray = [item.nodeid for item in shared if not machine_wide(item.nodeid)]
    if stray:
        raise pytest.UsageError(f"tests on this machine's shared daemons outside conftest.machine_wide: {stray}")


def made_once(tmp_path_factory, name: str, make: Callable[[Path], object]) -> Path:
    """<session temp>/name, made by make(path) once per pytest session. Under pytest-xdist the
    workers share it: the first to get here makes it under a lock while the others wait (a
    worker's own temp folder is popen-gwN inside the session's)."""
    root = tmp_path_factory.getbasetemp()
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker and root.name == f"popen-{worker}":  # not a pytest that a test started, which inherits the variable
        root = root.parent
    path, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)  # a maker that failed part-way
            make(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """5 x 200 training records, 200 test records, official layout. Read only."""
    return made_once(tmp_path_factory, "tiny_cifar", lambda path: write_dataset(path, 200, 200))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_data) -> Path:
    """model.pt of a ResNet-8 trained 6 iterations on tiny_data, once per session: what `eval`
    and `export` read (the export tests write their files beside it)."""

    def train(out: Path) -> None:
        cli_in_process(["train", *TINY, "--iters", "6", "--data-dir", str(tiny_data), "--out", str(out),
                        "--set", "train.eval_every=6"])

    return made_once(tmp_path_factory, "tiny_model", train) / "model.pt"


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, tiny_data) -> Callable[..., Path]:
    """reference_run(args, nproc=1) -> the run directory of an uninterrupted `train *args` on
    tiny_data (torchrun with nproc workers when nproc > 1): the weights and metrics an
    interrupted, resumed run must match bitwise. Each is trained once per session, keyed on the
    exact arguments, however many test modules ask for it. Read only."""

    def reference(args: list[str], nproc: int = 1) -> Path:
        key = hashlib.sha256(json.dumps([nproc, list(args)]).encode()).hexdigest()[:12]

        def train(out: Path) -> None:
            where = [*args, "--data-dir", str(tiny_data), "--out", str(out)]
            if nproc == 1:
                run_cli(["train", *where])
            else:
                run_torchrun(nproc, where, timeout=240)

        return made_once(tmp_path_factory, f"reference-{nproc}x-{key}", train)

    return reference


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


def cli(args: list, code: int = 0):
    """The CLI in this process, expecting exit `code` (report, export and argument errors need no
    fresh interpreter); arguments may be paths."""
    from typer.testing import CliRunner

    from resnetdist.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
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

# The run the fault, preemption and resume tests interrupt and resume, and whose uninterrupted
# run (reference_run(RESUMABLE)) they must then match: 30 iterations, a checkpoint every 10, a
# log point (where a stop lands) every 5. Settings that change no arithmetic (dist.timeout_s,
# train.keep_checkpoints) are added by the tests that need them, so all share one reference.
RESUMABLE = [*TINY, "--iters", "30", "--set", "train.eval_every=15", "--set", "train.checkpoint_every=10",
             "--set", "log.log_every=5"]
