"""`resnetdist eval CHECKPOINT`: the test error of saved weights, computed as training does."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch

from . import checkpoint
from .config import from_dict
from .data.augment import training_mean
from .data.loaders import ResidentEvalLoader
from .dist import resolve_device
from .models import build_model
from .train import autocast, error_rates, resolve_precision
from .worker import load_data


def evaluate_checkpoint(path: Path, data_dir: Path | None, device: str = "auto") -> dict[str, Any]:
    """Load a checkpoint (ckpt_*.pt or model.pt) and report its error on the test set (and
    the validation set, if the run held one out)."""
    state = checkpoint.load(path)
    cfg = from_dict(state["config"], f"{path} (config)")
    if data_dir is not None:
        cfg.data.dir = str(data_dir)
    dev = resolve_device(device, 0)
    model = build_model(cfg.model).to(dev)
    model.load_state_dict(state["model"])
    data = load_data(cfg)
    # the exact mean image the run trained with; older checkpoints lack it
    mean = state["mean"] if "mean" in state else training_mean(cfg.data.mean, cfg.data.channel_mean, data.train.images)
    loaders = {"test": ResidentEvalLoader(data.test, cfg.data.eval_batch, 0, 1, dev)}
    if data.val is not None:
        loaders["val"] = ResidentEvalLoader(data.val, cfg.data.eval_batch, 0, 1, dev)
    precision = resolve_precision(cfg.train.precision, dev)
    errors = error_rates(model, loaders, mean.to(dev), torch.contiguous_format, partial(autocast, precision, dev))
    return {"checkpoint": str(path), "model": cfg.model.name, "iteration": state.get("iteration"), **errors}
