"""Evaluation the same way everywhere: true fp32 (TF32 off for matmul and cuDNN, kernels chosen by
cuDNN's heuristics, deterministic), flags restored after, in the layout the model trained in, so
`resnetdist eval model.pt` equals summary.json's test error (CPU here; CUDA skipped)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from resnetdist.config import load_config
from resnetdist.training.evaluate import error_rates, model_layout

from .conftest import TINY, cli_in_process

FLAGS = ("matmul_tf32", "cudnn_tf32", "cudnn_benchmark", "cudnn_deterministic")


def flags() -> tuple:
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
            torch.backends.cudnn.deterministic)


class Recorder(nn.Module):
    """Predicts class 0 for every image, and notes the global flags and input layout it ran under."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 10)
        self.seen = []

    def forward(self, x):
        self.seen.append((*flags(), x.is_contiguous(memory_format=torch.channels_last), torch.is_autocast_enabled()))
        return torch.zeros(len(x), 10).index_fill_(1, torch.tensor([0]), 1.0)


@pytest.fixture
def training_flags(monkeypatch):
    """Flags as a CUDA training run leaves them: TF32 on for both, cudnn.benchmark on."""
    torch.set_float32_matmul_precision("high")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    yield
    torch.set_float32_matmul_precision("highest")


def test_evaluation_is_true_fp32_with_heuristic_kernels_and_restores_the_flags(training_flags):
    model = Recorder()
    images = torch.zeros(6, 3, 32, 32, dtype=torch.uint8)
    labels = torch.tensor([0, 0, 1, 2, 0, 3])
    before = flags()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller inside autocast changes nothing
        errors = error_rates(model, {"test": [(images[:4], labels[:4]), (images[4:], labels[4:])]},
                             torch.zeros(3, 32, 32), torch.channels_last)
    assert errors == {"test_error": 50.0}
    assert model.seen == [(False, False, False, True, True, False)] * 2  # TF32 off, heuristics, channels_last input
    assert flags() == before == (True, True, True, False) and model.training


def test_the_evaluation_layout_is_the_training_layout():
    cfg = load_config(flags={"train": {"channels_last": True}})
    assert model_layout(cfg, torch.device("cuda")) == torch.channels_last
    assert model_layout(cfg, torch.device("cpu")) == torch.contiguous_format
    cfg.train.channels_last = False
    assert model_layout(cfg, torch.device("cuda")) == torch.contiguous_format


@pytest.mark.timeout(300)
def test_eval_of_a_finished_runs_model_equals_its_summary(tmp_path, tiny_data):
    out = tmp_path / "run"
    cli_in_process(["train", *TINY, "--iters", "20", "--set", "train.eval_every=10", "--data-dir", str(tiny_data),
                    "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    evaluated = json.loads(cli_in_process(["eval", str(out / "model.pt"), "--device", "cpu", "--json"]).stdout)
    assert evaluated["test_error"] == summary["test_error"] and evaluated["iteration"] == 20


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
@pytest.mark.timeout(300)
def test_cuda_evaluation_of_a_trained_model_equals_that_of_its_saved_weights(tiny_data):
    """A CUDA model as training leaves it (channels_last, bf16 steps, cudnn.benchmark and TF32
    on) and its weights loaded the way `resnetdist eval` loads them give the same errors.
    (tests/test_step.py's end-to-end graph run checks the CLI's eval against summary.json.)"""
    from resnetdist.data import load_data, open_eval_loaders
    from resnetdist.data.augment import training_mean
    from resnetdist.dist import DistContext
    from resnetdist.models import build_model
    from resnetdist.training.trainer import make_model

    cfg = load_config(flags={"model": {"n": 1}, "data": {"dir": str(tiny_data)},
                             "train": {"device": "cuda", "precision": "bf16"}})
    ctx = DistContext(0, 0, 1, torch.device("cuda", 0))
    data = load_data(cfg.data)
    model, optimizer = make_model(cfg, ctx)  # channels_last, cudnn.benchmark on
    torch.backends.cudnn.allow_tf32 = True
    x = torch.randn(64, 3, 32, 32, device=ctx.device).contiguous(memory_format=torch.channels_last)
    for _ in range(3):  # moves weights and BN statistics
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x).float().square().mean()
        loss.backward()
        optimizer.lr.fill_(0.1)
        optimizer.step()
        optimizer.zero_grad()
    mean = training_mean(cfg.data.mean, cfg.data.channel_mean, data.train.images).to(ctx.device)
    loaders = open_eval_loaders(cfg.data, data, ctx)
    layout = model_layout(cfg, ctx.device)
    trained = error_rates(model, loaders, mean, layout)
    saved = build_model(cfg.model).to(ctx.device, memory_format=layout)
    saved.load_state_dict(model.state_dict())
    assert error_rates(saved, loaders, mean, layout) == trained and layout == torch.channels_last
    assert torch.backends.cudnn.benchmark and torch.backends.cudnn.allow_tf32  # restored
