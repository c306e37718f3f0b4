"""ResNet-1202 (He et al. 2015, "Exploring over 1000 layers"): configs/resnet1202.toml builds
the 19.4M-parameter net, `reproduce` plans depth 1202 with the same recipe, and the net
trains, checkpoints and resumes on the CPU at a small batch."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from resnetdist.config import load_config
from resnetdist.suite.reproduce import plan

from .conftest import REPO, cli_env, cli_in_process, run_cli, write_dataset

CONFIG = REPO / "configs" / "resnet1202.toml"


def test_dry_run_shows_the_1202_layer_net(tiny_data):
    result = cli_in_process(["train", "--config", str(CONFIG), "--dry-run", "--device", "cpu",
                             "--data-dir", str(tiny_data)])
    assert "ResNet-1202 (19,421,274 parameters)" in result.stdout, result.stdout


def test_reproduce_plans_depth_1202_with_the_configs_recipe(tmp_path):
    """`reproduce --depths 1202` and configs/resnet1202.toml train the same recipe (the
    ResNet-110 warm-up, the package's default for n >= 18)."""
    (job,) = plan([1202], False, 1, tmp_path, None, [])
    from_file = load_config(CONFIG, {}, [], None)
    assert job.name == "resnet1202-s0" and job.resolved.model.n == 200
    assert job.resolved.optim == from_file.optim and job.resolved.optim.warmup_iters == 400


@pytest.mark.slow  # a 1202-layer net on the CPU: minutes on a busy 2-core machine
@pytest.mark.timeout(1800)
def test_resnet1202_trains_checkpoints_and_resumes_on_the_cpu(tmp_path):
    # 8 test images: one evaluation of the 1202-layer net costs as much as many training steps
    data = write_dataset(tmp_path / "data", 20, 8)
    out = tmp_path / "resnet1202"
    args = ["train", "--config", str(CONFIG), "--iters", "3", "--device", "cpu", "--data-dir", str(data),
            "--out", str(out), "--set", "optim.batch_size=2", "--set", "data.eval_batch=8",
            "--set", "train.checkpoint_every=1", "--set", "train.eval_every=3", "--set", "log.log_every=1",
            "--set", "log.tensorboard=false", "--set", "log.wandb_mode=disabled"]
    log = tmp_path / "first.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "resnetdist", *args], cwd=REPO, env=cli_env(),
                                stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 1200
    # the checkpoint is renamed into place after its sidecar: its name appearing means it is whole
    while not list(out.glob("ckpt_*.pt")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)  # a crash right after the first checkpoint
    proc.wait(timeout=60)
    assert list(out.glob("ckpt_*.pt")), f"no checkpoint was written:\n{log.read_text()[-3000:]}"
    assert not (out / "summary.json").exists()
    again = run_cli(args, timeout=1200)
    assert "resuming from ckpt_" in again.stdout, again.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 3 and summary["parameters"] == 19_421_274 and summary["test_error"] is not None
