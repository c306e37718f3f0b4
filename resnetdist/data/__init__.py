"""A run's data: CIFAR-10 parsed from its binary files (cifar.py), and the loaders that feed
the step: the dataset resident on the training device (resident.py) or FFCV's reader of
.beton files (beton.py). `open_loaders` hides which one, and where the .beton files live."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .. import dist
from ..config import DataConfig
from .cifar import Cifar10, load_cifar10
from .resident import Batch, ResidentEvalLoader, ResidentTrainLoader, TrainLoader


def load_data(cfg: DataConfig) -> Cifar10:
    """Parse and check every file (a bad one is named), downloading first when no dir is set."""
    return load_cifar10(Path(cfg.dir) if cfg.dir else None, cfg.val_split)


def load_data_on_every_rank(cfg: DataConfig) -> Cifar10:
    """load_data on each rank (each node reads its own disk), the ranks agreeing to stop when
    any node lacks the data (presence.py): an initialized process group is needed."""
    from .presence import on_every_rank

    return on_every_rank(lambda: load_data(cfg), cfg.dir, "data check (every node holds the data)")


def beton_dir(cfg: DataConfig, data: Cifar10) -> Path:
    return Path(cfg.beton_dir) if cfg.beton_dir else data.folder.parent / "beton"


def ensure_betons(cfg: DataConfig, data: Cifar10) -> Path | None:
    """data.loader = ffcv: convert the binaries on first use (a no-op when up to date). Rank 0
    converts while the others wait."""
    if cfg.loader != "ffcv":
        return None
    from .beton import beton_paths, prepare_betons, require_ffcv

    require_ffcv()
    out = beton_dir(cfg, data)
    if dist.is_main_process():
        prepare_betons(data.folder, out, announce=lambda what: print(
            f"note: --loader ffcv: first use, {what} (set data.beton_dir to put them elsewhere)",
            file=sys.stderr, flush=True))
    dist.barrier()
    from .presence import on_every_rank, require_files

    on_every_rank(lambda: require_files(list(beton_paths(out))), what="data check (every node holds the betons)")
    return out


@dataclass
class Loaders:
    train: TrainLoader
    evals: dict[str, Iterable[Batch]]  # "test", and "val" when the run holds 5k images out


def open_loaders(cfg: DataConfig, data: Cifar10, ctx: dist.DistContext, global_batch: int, seed: int) -> Loaders:
    """This rank's training loader and evaluation shards, of the kind data.loader names."""
    if cfg.loader != "ffcv":
        train = ResidentTrainLoader(data.train, global_batch, seed, ctx.rank, ctx.world_size, ctx.device)
        return Loaders(train, open_eval_loaders(cfg, data, ctx))
    from .beton import beton_paths
    from .ffcv_loader import FfcvTrainLoader

    betons = ensure_betons(cfg, data)
    train = FfcvTrainLoader(beton_paths(betons)[0], data.train_indices, global_batch, seed, ctx.rank,
                            ctx.world_size, ctx.device, cfg.ffcv_workers)
    return Loaders(train, open_eval_loaders(cfg, data, ctx, betons))


def open_eval_loaders(cfg: DataConfig, data: Cifar10, ctx: dist.DistContext,
                      betons: Path | None = None) -> dict[str, Iterable[Batch]]:
    """This rank's shard of the test set, and of the validation set when the run holds one out."""
    if cfg.loader != "ffcv":
        evals = {"test": ResidentEvalLoader(data.test, cfg.eval_batch, ctx.rank, ctx.world_size, ctx.device)}
        if data.val is not None:
            evals["val"] = ResidentEvalLoader(data.val, cfg.eval_batch, ctx.rank, ctx.world_size, ctx.device)
        return evals
    from .beton import beton_paths
    from .ffcv_loader import FfcvEvalLoader

    train_beton, test_beton = beton_paths(betons or ensure_betons(cfg, data))
    args = (cfg.eval_batch, ctx.rank, ctx.world_size, ctx.device, cfg.ffcv_workers)
    evals = {"test": FfcvEvalLoader(test_beton, None, *args)}
    if data.val is not None:
        evals["val"] = FfcvEvalLoader(train_beton, data.val_indices, *args)
    return evals


__all__ = ["Batch", "Cifar10", "Loaders", "beton_dir", "ensure_betons", "load_data", "load_data_on_every_rank", "open_eval_loaders", "open_loaders"]
