"""A run's state to and from a checkpoint, and which checkpoint to resume from.

A checkpoint holds the uncompiled model, the optimizer, the loop's progress (iteration,
training time, the metric window), the RNG states, the resolved config, the mean image and
the W&B run id: everything needed to continue bit for bit, and to evaluate or export alone.
"""

from __future__ import annotations

import io
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
    at 0). Rank 0 alone reads it (and verifies its checksum): the run directory need only be
    on rank 0's disk. The loaded state reaches the other ranks over the process group."""
    found = checkpoint.load_latest(run_dir, warn=dist.print0) if is_main else None
    with dist.stage("resume broadcast (the checkpoint's state)"):
        path, loaded = shared_state(found)
    if loaded is None:
        return Progress(), None
    # the run's header has said where it resumes from (announce.where_it_starts: rank 0's same choice)
    progress, wandb_id = restore(loaded, model, optimizer, device)
    saved_world = int(loaded.get("world_size", 0))
    if saved_world and saved_world != dist.world_size():
        dist.print0(f"world size changed: the checkpoint was written by {saved_world} rank(s), "
                    f"this run has {dist.world_size()}")
    return progress, wandb_id


def shared_state(found: tuple[Path, dict[str, Any]] | None) -> tuple[str | None, dict[str, Any] | None]:
    """Rank 0's (path, state) on every rank. The state travels as torch.save bytes and is read
    back with weights_only=True, as from the file: a round trip that keeps every bit."""
    if not dist.distributed():
        return (str(found[0]), found[1]) if found else (None, None)
    payload = None
    if found:
        buf = io.BytesIO()
        torch.save(found[1], buf)
        payload = (str(found[0]), buf.getvalue())
    payload = dist.broadcast_object(payload)
    if payload is None:
        return None, None
    if found:
        return payload[0], found[1]
    return payload[0], torch.load(io.BytesIO(payload[1]), map_location="cpu", weights_only=True)
