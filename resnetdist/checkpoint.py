"""Checkpoints: written atomically by rank 0, the last K kept, loaded safely.

A checkpoint is a dict of tensors and plain values (model and optimizer state, iteration,
RNG states, resolved config, W&B run id), saved with torch.save and read back with
torch.load(weights_only=True), which refuses anything but tensors and primitive containers.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

PATTERN = re.compile(r"ckpt_(\d+)\.pt$")


def checkpoint_path(run_dir: Path, iteration: int) -> Path:
    return run_dir / f"ckpt_{iteration:07d}.pt"


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write to a temporary file in the same folder, fsync, rename, fsync the folder: a crash
    leaves either the old state or the complete new file, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint files, newest (highest iteration) first."""
    found = [(int(m.group(1)), p) for p in run_dir.glob("ckpt_*.pt") if (m := PATTERN.search(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def save(run_dir: Path, iteration: int, state: dict[str, Any], keep: int) -> Path:
    path = checkpoint_path(run_dir, iteration)
    atomic_save(state, path)
    for old in list_checkpoints(run_dir)[keep:]:
        old.unlink(missing_ok=True)
    return path


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(path, map_location=map_location, weights_only=True)


def load_latest(run_dir: Path, warn=print) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint; an unreadable one is reported and the previous tried."""
    for path in list_checkpoints(run_dir):
        try:
            state = load(path)
            if "model" not in state or "iteration" not in state:
                raise ValueError("missing model or iteration")
            return path, state
        except Exception as e:  # a torn or corrupt file: fall back to the one before
            warn(f"warning: checkpoint {path} is unreadable ({type(e).__name__}: {e}); trying the previous one")
    return None
