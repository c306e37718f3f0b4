"""Evaluation the same way everywhere: true fp32 (TF32 off for matmul and cuDNN, kernels chosen by
cuDNN's heuristics, deterministic), flags restored after, in the layout the model trained in, so
`resnetdist eval model.pt` equals summary.json's test error (CPU here; CUDA skipped)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from resnetdist.config import load_config
from resnetdist.train.evaluate import error_rates, model_layout

from .conftest import TINY, cli_in_process, run_cli

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
    evaluated = json.loads(cli_in_process(["eval", str(out / "model.pt"), "--device", "cpu"]).stdout)
    assert evaluated["test_error"] == summary["test_error"] and evaluated["iteration"] == 20


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
@pytest.mark.timeout(600)
def test_cuda_eval_of_a_bf16_channels_last_graph_run_equals_its_summary(tmp_path, tiny_data):
    """The run trains in bf16, channels_last, cudnn.benchmark, graphed; its evaluations and
    `resnetdist eval` (a new process, its own kernel choices) must agree exactly."""
    out = tmp_path / "run"
    run_cli(["train", "-n", "1", "--iters", "40", "--device", "cuda", "--data-dir", str(tiny_data), "--out", str(out),
             "--set", "optim.batch_size=32", "--set", "train.eval_every=20", "--set", "train.precision=bf16",
             "--set", "log.wandb_mode=disabled", "--set", "log.tensorboard=false"], timeout=500)
    summary = json.loads((out / "summary.json").read_text())
    evaluated = json.loads(run_cli(["eval", str(out / "model.pt"), "--device", "cuda"]).stdout)
    assert evaluated["test_error"] == summary["test_error"]
