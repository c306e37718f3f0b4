"""The Docker image, built for real and run on CPU.

docker/Dockerfile is built FROM a local stand-in for the pytorch/pytorch CUDA base (Debian
bookworm + venv + CPU torch, made without any registry by .ci/docker-base.sh), then:
  * a 20-iteration ResNet-8 training run in a container without network, on a tiny CIFAR-10
    set in the official binary layout, writing its run directory to a bind-mounted folder;
  * launch/docker-run.sh prepare (FFCV .beton files into the data volume) and a short
    training run on the FFCV loader;
  * the image's facts: non-root user, the base image's torch kept, entrypoint.

Skipped when no Docker daemon answers (`docker info`), e.g. on a laptop without Docker.
Needs BuildKit (the Dockerfile uses a secret mount for pip's CA bundle and a pip cache
mount): `docker buildx`, or a Docker CLI older than 23 with DOCKER_BUILDKIT=1 (Debian
bookworm's docker.io at /usr/bin/docker); RESNETDIST_DOCKER_CLI picks one explicitly.

Environment:
  RESNETDIST_TEST_BASE_IMAGE  base image tag (default resnetdist-test-base:bookworm); built
                              with .ci/docker-base.sh when missing and this runs as root
  RESNETDIST_TEST_IMAGE       tag to build (default resnetdist:test; kept for the layer cache)
  RESNETDIST_DOCKER_CLI       docker CLI to build with
  PIP_CERT                    CA bundle handed to pip in the build (default
                              /etc/ssl/certs/ca-certificates.crt when it exists)
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from .conftest import write_dataset

REPO = Path(__file__).resolve().parents[1]
BASE_IMAGE = os.environ.get("RESNETDIST_TEST_BASE_IMAGE", "resnetdist-test-base:bookworm")
IMAGE = os.environ.get("RESNETDIST_TEST_IMAGE", "resnetdist:test")
BUILD_TIMEOUT = 15 * 60
RUN_TIMEOUT = 10 * 60

pytestmark = [pytest.mark.docker, pytest.mark.slow]
try:  # the project's per-test timeout (pyproject) would cut the image build short
    import pytest_timeout  # noqa: F401

    pytestmark.append(pytest.mark.timeout(BUILD_TIMEOUT * 2 + RUN_TIMEOUT))
except ImportError:
    pass


def _docker_works() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


if not _docker_works():
    pytest.skip("no Docker daemon answers `docker info` (CI: .ci/start-dockerd.sh)", allow_module_level=True)


def run(cmd: list[str], timeout: float, check: bool = True, **kw) -> subprocess.CompletedProcess:
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    took = time.monotonic() - t0
    print(f"[{took:6.1f}s] {' '.join(cmd)[:200]}")
    if check and proc.returncode != 0:
        raise AssertionError(
            f"exit {proc.returncode}: {' '.join(cmd)}\n"
            f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-6000:]}"
        )
    return proc


def _client_version(cli: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([cli, "version", "--format", "{{.Client.Version}}"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    digits = []
    for part in out.split("+")[0].split(".")[:2]:
        if not part.isdigit():
            return None
        digits.append(int(part))
    return tuple(digits) or None


def buildkit_cli() -> str | None:
    """A docker CLI whose `docker build` uses BuildKit with DOCKER_BUILDKIT=1."""
    forced = os.environ.get("RESNETDIST_DOCKER_CLI")
    if forced:
        return forced
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "buildx", "version"], capture_output=True, timeout=30).returncode == 0:
        return docker
    # Before 23.0 the CLI drives the daemon's built-in BuildKit itself; 23+ needs buildx.
    for cli in dict.fromkeys(filter(None, [docker, "/usr/bin/docker", "/usr/local/bin/docker"])):
        if os.access(cli, os.X_OK):
            version = _client_version(cli)
            if version is not None and version < (23,):
                return cli
    return None


def ca_bundle() -> str | None:
    for cand in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt"):
        if cand and Path(cand).is_file():
            return cand
    return None


def image_exists(tag: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", tag], capture_output=True, timeout=60).returncode == 0


def user_args(*writable: Path) -> list[str]:
    """Run as the invoking user, so the files it writes are the user's; as root, run as the
    image's own non-root user instead, with the mounted folders opened up for it."""
    if os.getuid() != 0:
        return ["--user", f"{os.getuid()}:{os.getgid()}"]
    for path in writable:
        path.chmod(0o777)
    return []


@pytest.fixture(scope="module")
def image() -> str:
    cli = buildkit_cli()
    if cli is None:
        pytest.skip("no BuildKit-capable docker CLI (install docker buildx, or set RESNETDIST_DOCKER_CLI)")
    if not image_exists(BASE_IMAGE):
        script = REPO / ".ci" / "docker-base.sh"
        if os.getuid() != 0 or shutil.which("debootstrap") is None:
            pytest.skip(f"base image {BASE_IMAGE} missing; build it with {script} (root, debootstrap)")
        run(["bash", str(script)], timeout=BUILD_TIMEOUT, env={**os.environ, "DOCKER_BASE_TAG": BASE_IMAGE})
    cmd = [cli, "build", "--network", "host", "--progress", "plain",
           "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-f", "docker/Dockerfile", "-t", IMAGE]
    ca = ca_bundle()
    if ca:
        cmd += ["--secret", f"id=pip_ca,src={ca}"]
    for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        if os.environ.get(var):
            cmd += ["--build-arg", var]
    cmd.append(".")
    run(cmd, timeout=BUILD_TIMEOUT, cwd=REPO, env={**os.environ, "DOCKER_BUILDKIT": "1"})
    return IMAGE


def test_image_facts(image):
    """Non-root by default, the base image's torch untouched, the extras importable, the CLI
    as entrypoint, the documented environment."""
    base_torch = run(["docker", "run", "--rm", "--network", "none", "--entrypoint", "python3", BASE_IMAGE,
                      "-c", "import torch; print(torch.__version__)"], timeout=RUN_TIMEOUT).stdout.split()[-1]
    probe = ("import json, os, torch, ffcv, wandb, resnetdist.cli; "
             "print(json.dumps({'uid': os.getuid(), 'torch': torch.__version__, 'home': os.environ['HOME'], "
             "'data': os.environ.get('RESNETDIST_DATA'), 'wandb_dir': os.environ.get('WANDB_DIR'), "
             "'key': 'WANDB_API_KEY' in os.environ, 'cwd': os.getcwd(), "
             "'configs': sorted(os.listdir('configs')), 'runs': os.path.realpath('runs')}))")
    out = run(["docker", "run", "--rm", "--network", "none", "--entrypoint", "python3", image, "-c", probe],
              timeout=RUN_TIMEOUT).stdout
    facts = json.loads(out.strip().splitlines()[-1])
    assert facts["uid"] != 0
    assert facts["torch"] == base_torch, "pip replaced the base image's torch"
    assert facts["data"] == "/data" and facts["wandb_dir"] == "/wandb"
    assert facts["key"] is False, "a W&B key is baked into the image"
    assert facts["runs"] == "/runs" and facts["cwd"] == "/workspace"
    assert sorted(p.name for p in (REPO / "configs").glob("*.toml")) == [c for c in facts["configs"] if c.endswith(".toml")]

    config = json.loads(run(["docker", "image", "inspect", "--format", "{{json .Config}}", image],
                            timeout=60).stdout)
    assert config["Entrypoint"] == ["resnetdist"]
    assert set(config["Volumes"]) >= {"/data", "/runs", "/wandb"}
    assert config["User"] not in ("", "0", "root")

    helped = run(["docker", "run", "--rm", "--network", "none", image, "train", "--help"], timeout=RUN_TIMEOUT)
    assert "--nproc-per-node" in helped.stdout


def test_train_in_container(image, tmp_path):
    data = write_dataset(tmp_path / "data", 64, 64)
    runs = tmp_path / "runs"
    runs.mkdir()
    t0 = time.monotonic()
    proc = run(["docker", "run", "--rm", "--network", "none", *user_args(runs),
                "-e", "OMP_NUM_THREADS=1",
                "-v", f"{data}:/data:ro", "-v", f"{runs}:/runs", image,
                "train", "--n", "1", "--iters", "20", "--device", "cpu", "--data-dir", "/data",
                "--out", "/runs/r1", "--set", "train.eval_every=10"], timeout=RUN_TIMEOUT)
    print(f"container training run: {time.monotonic() - t0:.1f}s")
    run_dir = runs / "r1"
    for name in ("config.toml", "metrics.jsonl", "summary.json"):
        path = run_dir / name
        assert path.is_file(), f"{name} missing; stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        assert os.access(path, os.R_OK)
        mode = path.stat().st_mode
        assert mode & stat.S_IRUSR and mode & stat.S_IROTH, f"{name} is not world-readable: {oct(mode)}"
        if os.getuid() != 0:
            assert path.stat().st_uid == os.getuid(), f"{name} is not owned by the invoking user"
        else:
            assert path.stat().st_uid != 0, f"{name} written by root: the container did not run as its user"

    config = tomllib.loads((run_dir / "config.toml").read_text())
    assert config["model"]["n"] == 1 and config["train"]["device"] == "cpu"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert any("test_error" in r for r in records), records
    summary = json.loads((run_dir / "summary.json").read_text())
    assert isinstance(summary["test_error"], (int, float)) and 0 <= summary["test_error"] <= 100
    assert summary["iterations"] == 20
    # W&B had no key and no network: it logged offline into the run directory
    assert list(run_dir.glob("wandb/offline-run-*")), sorted(p.name for p in run_dir.iterdir())


def test_prepare_and_ffcv_train_via_launch_script(image, tmp_path):
    data = write_dataset(tmp_path / "data", 64, 64)
    runs = tmp_path / "runs"
    runs.mkdir()
    ua = user_args(data, runs)
    env = {**os.environ, "IMAGE": image, "DATA_DIR": str(data), "RUNS_DIR": str(runs), "GPUS": "",
           "NETWORK": "none", "RUN_AS": "image" if not ua else ua[1],
           "DOCKER_ARGS": "-e OMP_NUM_THREADS=1", "DRY_RUN": "0"}
    env.pop("WANDB_API_KEY", None)
    script = str(REPO / "launch" / "docker-run.sh")
    run(["bash", script, "prepare"], timeout=RUN_TIMEOUT, env=env, stdin=subprocess.DEVNULL)
    for name in ("train.beton", "test.beton"):
        assert (data / "beton" / name).stat().st_size > 0
    run(["bash", script, "train", "--n", "1", "--iters", "4", "--device", "cpu", "--loader", "ffcv",
         "--set", "data.ffcv_workers=1", "--set", "log.wandb_mode=disabled", "--out", "/runs/ffcv"],
        timeout=RUN_TIMEOUT, env=env, stdin=subprocess.DEVNULL)
    summary = json.loads((runs / "ffcv" / "summary.json").read_text())
    assert summary["iterations"] == 4 and summary["loader"] == "ffcv"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v", "-s"]))
