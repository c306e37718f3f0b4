"""The Python API (docs/api.md): the model factories and registry, resnetdist.load of a run's
model.pt / model.safetensors (its test error is summary.json's), resnetdist.train in this
process (signal handlers untouched), a hang raising instead of ending the process, torch.hub
from the checkout, --version, and every example of docs/api.md run in order."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

import resnetdist
from resnetdist.data.cifar import load_test_only
from resnetdist.errors import CheckpointError, PeerLost
from resnetdist.models import CifarResNet, build_model
from resnetdist.config import ModelConfig

from .conftest import REPO, cli


def test_factories_are_the_trainers_nets_with_the_papers_parameter_counts():
    net = resnetdist.resnet20()
    assert type(net) is type(build_model(ModelConfig(n=3))) is CifarResNet
    assert sum(p.numel() for p in net.parameters()) == 269_722  # the paper's 0.27M
    assert net.state_dict().keys() == build_model(ModelConfig(n=3)).state_dict().keys()
    assert sum(p.numel() for p in resnetdist.resnet110().parameters()) == 1_727_962  # 1.7M
    plain = resnetdist.plain56()
    assert all(not block.residual for block in plain.blocks) and len(plain.blocks) == 27
    assert resnetdist.list_models() == ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202",
                                        "plain20", "plain32", "plain44", "plain56"]
    b = resnetdist.create_model("resnet20", shortcut="B", num_classes=100)
    assert b.fc.out_features == 100 and any("shortcut.0.weight" in k for k in b.state_dict())
    with pytest.raises(ValueError, match="unknown model 'resnet21'; one of: resnet20"):
        resnetdist.create_model("resnet21")
    with pytest.raises(ValueError, match="model.shortcut must be 'A' or 'B', got 'C'"):
        resnetdist.resnet20(shortcut="C")


def test_torch_hub_loads_the_factories_from_the_checkout():
    net = torch.hub.load(str(REPO), "resnet56", source="local", shortcut="A")
    assert type(net) is CifarResNet and len(net.blocks) == 27


def test_version_is_the_package_metadatas():
    assert resnetdist.__version__ == version("resnetdist")
    assert cli(["--version"]).stdout == f"resnetdist {version('resnetdist')}\n"


def errors_in_percent(model, images, labels) -> float:
    """As training counts them (evaluate.error_rates): wrong predictions over images, times 100."""
    with torch.no_grad():
        wrong = int((model(images).argmax(1) != labels).sum())
    return 100.0 * wrong / len(labels)


def test_load_reproduces_the_runs_test_error_exactly_from_either_file(tiny_model, tiny_data):
    run = tiny_model.parent
    summary = json.loads((run / "summary.json").read_text())
    test = load_test_only(tiny_data).test
    images, labels = torch.from_numpy(test.images), torch.from_numpy(test.labels)
    for path in (run / "model.pt", run / "model.safetensors", run):
        model = resnetdist.load(path)
        assert not model.training and model.mean.shape == (3, 32, 32)
        assert errors_in_percent(model, images, labels) == summary["test_error"], path
        assert errors_in_percent(model, images.float() / 255, labels) == summary["test_error"], path
    # safetensors needs no pickle: its tensors are load()'s state dict, its metadata the config
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = load_file(run / "model.safetensors")
    assert tensors.keys() == model.state_dict().keys()
    with safe_open(str(run / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["config"])["model"]["n"] == 1


def test_load_names_a_file_it_cannot_use(tiny_model, tmp_path):
    cut = tmp_path / "model.safetensors"
    cut.write_bytes((tiny_model.parent / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(cut))}: not a readable safetensors file"):
        resnetdist.load(cut)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="a safetensors file, but not a resnetdist model"):
        resnetdist.load(tmp_path / "other.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty: a folder without model.safetensors or model.pt"):
        resnetdist.load(tmp_path / "empty")


def test_train_runs_in_this_process_without_touching_its_signal_handlers(tiny_data, tmp_path):
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    before = {s: signal.getsignal(s) for s in signals}
    config = {"model": {"n": 1}, "optim": {"iters": 4, "batch_size": 32},
              "train": {"device": "cpu", "out": str(tmp_path / "run"), "eval_every": 4},
              "data": {"dir": str(tiny_data), "eval_batch": 100},
              "log": {"tensorboard": False, "wandb_mode": "disabled"}}
    summary = resnetdist.train(config)
    assert {s: signal.getsignal(s) for s in signals} == before
    assert summary == json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["iterations"] == 4 and (tmp_path / "run" / "model.safetensors").is_file()
    assert resnetdist.train(config) == summary  # finished: its summary, nothing trained


def test_a_detected_hang_raises_in_the_main_thread_when_asked(monkeypatch):
    from resnetdist.dist import HangWatch

    watch = HangWatch(0.3, 0, on_hang="raise")
    try:
        watch.armed = True
        watch.enter("training step (gradient all-reduce) in iterations 1-10")
        with pytest.raises(PeerLost, match=r"rank 0 on .*: no progress for 0.3 s .* waiting in the training step"):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # the main thread busy in Python, as a polling wait is
                time.sleep(0.01)
        assert watch.stopped and threading.main_thread().is_alive()
    finally:
        watch.stopped = True


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M)


def test_every_example_in_docs_api_md_runs(tiny_data, tmp_path, monkeypatch, capsys):
    """In order, in one namespace, as a notebook runs them: the data from the cache folder
    ($RESNETDIST_DATA, here the tiny stand-in), the run folder under the working directory."""
    monkeypatch.setenv("RESNETDIST_DATA", str(tiny_data))
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(REPO / "docs" / "api.md")
    assert len(blocks) >= 5
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), namespace)  # noqa: S102 - the page's own examples
    out = capsys.readouterr().out
    assert "269722" in out and "resnet8: test error" in out and "resnet8 torch.Size([3, 32, 32])" in out
