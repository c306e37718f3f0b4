"""`resnetdist bench` on a CPU with tiny iteration counts: both baselines on record with their
exact settings and both ratios, the host time per step, the JSON rewritten after every setting
(a run cut short keeps what it measured), and the peer loop's transforms as torchvision's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from resnetdist.data import load_data
from resnetdist.config import load_config
from resnetdist.tools.bench import CIFAR_MEAN, CIFAR_STD, PerImage, format_table, peer_transform, run_step_bench

from .conftest import REPO, cli_env


@pytest.mark.slow  # three settings measured: over 10 s on 2 cores
@pytest.mark.timeout(300)
def test_both_baselines_and_both_ratios_on_record(tiny_data, tmp_path):
    out = tmp_path / "step.json"
    report = run_step_bench(1, 2, 1, "cpu", ["resident"], ["eager"], ["fp32"], tiny_data, 0, out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report)) and report["complete"]
    base, peer, eager = report["results"]
    assert (base["loader"], peer["loader"], eager["loader"]) == ("baseline", "peer", "resident")
    assert report["baseline"]["loss_read_every"] == 100 and report["baseline"]["non_blocking"]
    assert report["peer"]["loss_read_every"] == 1 and not report["peer"]["non_blocking"]
    assert "RandomCrop" not in report["baseline"]["transforms"]  # written out in torch
    assert "torchvision" in report["peer"]["transforms"] and report["peer"]["dataloader_workers"] == 0
    assert eager["feed"] == "device"  # the batch reaches the step in the feed's device buffers
    for r in report["results"]:
        assert r["speedup_vs_baseline"] == pytest.approx(base["ms_per_iter"] / r["ms_per_iter"])
        assert r["speedup_vs_peer"] == pytest.approx(peer["ms_per_iter"] / r["ms_per_iter"])
        assert 0 < r["host_ms_per_iter"] <= r["ms_per_iter"] * 1.01
    table = format_table(report)
    assert "| vs baseline | vs peer |" in table and "loss.item() every step" in table


@pytest.mark.slow  # a bench process, three settings and the start of a compile: over 15 s on 2 cores
@pytest.mark.timeout(400)
def test_the_json_is_written_after_every_setting(tiny_data, tmp_path):
    """Killed while compiling (its last setting), bench leaves the settings already measured."""
    out = tmp_path / "step.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "resnetdist", "bench", "-n", "1", "--iters", "2", "--warmup", "1", "--device", "cpu",
         "--loaders", "resident", "--modes", "eager,compile", "--precisions", "fp32", "--workers", "0",
         "--data-dir", str(tiny_data), "--out", str(out)],
        cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and len(json.loads(out.read_text())["results"]) == 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "bench finished (or failed) before it could be cut short"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    report = json.loads(out.read_text())
    assert not report["complete"]
    assert [r["loader"] for r in report["results"]] == ["baseline", "peer", "resident"]


def test_peer_transform_is_torchvisions_crop_flip_totensor_normalize(tiny_data):
    data = load_data(load_config(flags={"data": {"dir": str(tiny_data)}}).data)
    dataset = PerImage(data.train, peer_transform()[0])
    for seed in range(8):
        torch.manual_seed(seed)
        got, label = dataset[seed]
        # the reference: the numbers torchvision draws (row, column, flip), applied by hand
        torch.manual_seed(seed)
        y, x = (int(torch.randint(0, 9, size=(1,)).item()) for _ in range(2))
        flip = bool(torch.rand(1) < 0.5)
        img = F.pad(torch.from_numpy(data.train.images[seed]).float() / 255, (4, 4, 4, 4))[:, y : y + 32, x : x + 32]
        img = img.flip(-1) if flip else img
        mean, std = (torch.tensor(v)[:, None, None] for v in (CIFAR_MEAN, CIFAR_STD))
        torch.testing.assert_close(got, (img - mean) / std)
        assert label == int(data.train.labels[seed]) and got.dtype == torch.float32


def test_peer_transform_matches_torchvision_when_installed(tiny_data):
    transforms = pytest.importorskip("torchvision.transforms")
    from PIL import Image

    data = load_data(load_config(flags={"data": {"dir": str(tiny_data)}}).data)
    chain = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD)])
    from resnetdist.tools.bench import _peer_transform_written_out

    mean, std = (torch.tensor(v)[:, None, None] for v in (CIFAR_MEAN, CIFAR_STD))
    for i in range(8):
        img = Image.fromarray(np.ascontiguousarray(data.train.images[i].transpose(1, 2, 0)))
        torch.manual_seed(i)
        want = chain(img)
        torch.manual_seed(i)
        torch.testing.assert_close(_peer_transform_written_out(img, mean, std), want)


def test_the_peer_label_says_which_transforms_ran(monkeypatch):
    from resnetdist.tools import bench

    peer = bench.BASELINES[1]
    for installed in (False, True):
        monkeypatch.setattr(bench, "has_torchvision", lambda installed=installed: installed)
        assert ("torchvision transforms in" in peer.label) == installed, peer.label
    monkeypatch.undo()
    _, source = bench.peer_transform()  # what runs here, as the label says
    assert source.startswith("torchvision ") == ("torchvision transforms in" in peer.label)
