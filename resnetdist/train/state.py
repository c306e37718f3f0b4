"""A run's state to and from a checkpoint, and which checkpoint to resume from.

A checkpoint holds the uncompiled model, the optimizer, the loop's progress (iteration,
training time, the metric window), the RNG states, the resolved config, the mean image and
the W&B run id: everything needed to continue bit for bit, and to evaluate or export alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import checkpoint, dist
from ..config import RunConfig
from .loop import Progress


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer, progress: Progress, cfg: RunConfig,
             mean: torch.Tensor, world_size: int, wandb_id: str | None) -> dict[str, Any]:
    state = {
        **final_weights(model, cfg, progress.iteration, mean),
        "optimizer": optimizer.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "train_window": torch.from_numpy(progress.window.copy()),
        "train_seconds": progress.train_seconds,
        "world_size": world_size,
        "wandb_id": wandb_id or "",
    }
    if mean.device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(mean.device)
    return state


def final_weights(model: nn.Module, cfg: RunConfig, iteration: int, mean: torch.Tensor) -> dict[str, Any]:
    """What model.pt holds: enough to evaluate or export the net without this run's files."""
    return {"model": model.state_dict(), "config": cfg.to_dict(), "iteration": iteration,
            "mean": mean.cpu()}  # the preprocessing mean image, for export / inference


def restore(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
            device: torch.device) -> tuple[Progress, str | None]:
    """Load a checkpoint into model and optimizer; returns the progress and the W&B run id."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_cpu"])
    if "rng_cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["rng_cuda"], device)
    progress = Progress(int(state["iteration"]), float(state["train_seconds"]),
                        state["train_window"].numpy().astype(np.float64))
    return progress, state.get("wandb_id") or None


def resume(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
           is_main: bool) -> tuple[Progress, str | None]:
    """Continue from the newest readable checkpoint in the run directory, if any (else start
    at 0). Rank 0 picks it, so every rank resumes from the same file."""
    found = checkpoint.load_latest(run_dir, warn=dist.print0) if is_main else None
    with dist.stage("resume broadcast (which checkpoint)"):
        path = dist.broadcast_object(str(found[0]) if found else None)
    if path is None:
        return Progress(), None
    # the run's header has said where it resumes from (announce.where_it_starts: the same choice)
    return restore(found[1] if found else checkpoint.load(Path(path)), model, optimizer, device)
