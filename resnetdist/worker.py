"""The thin entry point of one training process (one per rank under torchrun): check the run
directory, set up the process group, load data, train, clean up."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from . import dist, rundir
from .config import RunConfig, check_run_dir, write_run_config
from .data.cifar import Cifar10, load_cifar10
from .train import Trainer


def load_data(cfg: RunConfig) -> Cifar10:
    return load_cifar10(Path(cfg.data.dir) if cfg.data.dir else None, cfg.data.val_split)


def beton_dir(cfg: RunConfig, data: Cifar10) -> Path:
    if cfg.data.beton_dir:
        return Path(cfg.data.beton_dir)
    return data.folder.parent / "beton"


def ensure_betons(cfg: RunConfig, data: Cifar10) -> Path | None:
    """data.loader = ffcv: convert the binaries on first use (a no-op when up to date)."""
    if cfg.data.loader != "ffcv":
        return None
    from .data.beton import prepare_betons, require_ffcv

    require_ffcv()
    out = beton_dir(cfg, data)
    if dist.is_main_process():
        prepare_betons(data.folder, out)
    dist.barrier()
    return out


def main(cfg: RunConfig, data: Cifar10 | None = None) -> dict[str, Any]:
    """Train on this rank; `data` is what the caller already parsed, if anything."""
    if cfg.train.cuda_graph:
        # NCCL's async error handling must be off for DDP inside a captured graph (PyTorch's
        # CUDA graphs notes); it has to be set before the process group exists
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
    ctx = dist.setup(cfg.train.device, cfg.dist.timeout_s)
    run_lock = None
    try:
        if data is None:
            data = load_data(cfg)
        if ctx.is_main:
            run_lock = rundir.acquire(cfg.run_dir)  # before anything is written there (RunDirBusy if held)
            check_run_dir(cfg)
            write_run_config(cfg)
        betons = ensure_betons(cfg, data)
        dist.barrier()
        return Trainer(cfg, ctx, data, betons).fit()
    finally:
        dist.cleanup()
        if run_lock is not None:
            run_lock.release()
