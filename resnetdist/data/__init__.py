"""A run's data: CIFAR-10 (cifar.py) and its loaders: the dataset resident on the training device
(resident.py) or FFCV's reader of .beton files (beton.py, ffcv_loader.py). `open_loaders` is the
one place that reads data.loader to pick which."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .. import dist
from ..config import DataConfig
from .cifar import Cifar10, load_cifar10
from .resident import Batch, ResidentEvalLoader, ResidentTrainLoader, TrainLoader


def load_data(cfg: DataConfig) -> Cifar10:
    """Parse and check every file (a bad one is named), downloading first when no dir is set;
    data.loader = ffcv without FFCV installed is named first."""
    if cfg.loader == "ffcv":
        from .beton import require_ffcv

        require_ffcv()
    return load_cifar10(Path(cfg.dir) if cfg.dir else None, cfg.val_split)


def load_data_on_every_rank(cfg: DataConfig) -> Cifar10:
    """load_data on each rank (each node reads its own disk), all stopping when any node lacks
    the data (presence.py)."""
    from .presence import on_every_rank

    return on_every_rank(lambda: load_data(cfg), cfg.dir, "data check (every node holds the data)")


@dataclass
class Loaders:
    train: TrainLoader | None  # None: evaluation only (open_eval_loaders)
    evals: dict[str, Iterable[Batch]]  # "test", and "val" when the run holds 5k images out


def open_loaders(cfg: DataConfig, data: Cifar10, ctx: dist.DistContext, global_batch: int, seed: int | list[int],
                 train: bool = True) -> Loaders:
    """This rank's training loader (with `train`) and evaluation shards (test, and val when the
    run holds it out), of the kind data.loader names. A pack's seeds (a list): each member's
    batch in its seed's order (FFCV: one Loader per member; resident: one gather for all)."""
    seeds = seed if isinstance(seed, list) else [seed]
    if cfg.loader == "ffcv":
        from .ffcv_loader import open_ffcv_loaders

        return Loaders(*open_ffcv_loaders(cfg, data, ctx, global_batch, seeds, train))
    evals = {"test": ResidentEvalLoader(data.test, cfg.eval_batch, ctx.rank, ctx.world_size, ctx.device)}
    if data.val is not None:
        evals["val"] = ResidentEvalLoader(data.val, cfg.eval_batch, ctx.rank, ctx.world_size, ctx.device)
    loader = ResidentTrainLoader(data.train, global_batch, seeds, ctx.rank, ctx.world_size, ctx.device) if train else None
    return Loaders(loader, evals)


def open_eval_loaders(cfg: DataConfig, data: Cifar10, ctx: dist.DistContext) -> dict[str, Iterable[Batch]]:
    return open_loaders(cfg, data, ctx, 0, 0, train=False).evals


__all__ = ["Batch", "Cifar10", "Loaders", "load_data", "load_data_on_every_rank", "open_eval_loaders", "open_loaders"]
