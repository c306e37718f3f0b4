"""Training and evaluation loaders. Every loader yields (uint8 images (b,3,32,32), int64
labels) already on the rank's device; augmentation happens afterwards, on that device.

- "gpu": the whole uint8 dataset resident on the device (150 MB for CIFAR-10), batches
  gathered there by index. No worker processes, nothing crosses the PCIe bus per step.
- "ffcv": the same sample order read from .beton files by FFCV's Loader, moved with ToDevice.

Both follow data/order.py, so they deliver the same samples at the same iteration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch

from .cifar import Split
from .order import eval_shard, iters_per_epoch, rank_epoch_order

LOADERS = ("gpu", "ffcv")
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class DataConfig:
    dir: str = ""  # folder with cifar-10-batches-bin/ or the tarball; "" = download to the cache
    loader: str = "gpu"  # gpu | ffcv
    beton_dir: str = ""  # where the .beton files live; "" = <data dir>/beton
    ffcv_workers: int = 4
    val_split: bool = False  # hold out 5k training images (the paper's 45k/5k protocol)
    mean: str = "pixel"  # pixel: per-pixel mean image of the training set; channel: channel_mean
    channel_mean: list[float] = field(default_factory=lambda: [125.3, 123.0, 113.9])
    eval_batch: int = 1000

    def validate(self) -> None:
        if self.loader not in LOADERS:
            raise ValueError(f"data.loader must be one of {LOADERS}, got {self.loader!r}")
        if self.mean not in ("pixel", "channel"):
            raise ValueError(f"data.mean must be 'pixel' or 'channel', got {self.mean!r}")
        if len(self.channel_mean) != 3:
            raise ValueError(f"data.channel_mean needs 3 values, got {self.channel_mean}")
        if self.eval_batch < 1 or self.ffcv_workers < 1:
            raise ValueError("data.eval_batch and data.ffcv_workers must be >= 1")


class TrainLoader(Protocol):
    def batches(self, start_iter: int) -> Iterator[Batch]:
        """Endless batches for iterations start_iter, start_iter+1, ..."""


class ResidentTrainLoader:
    def __init__(
        self, split: Split, global_batch: int, seed: int, rank: int, world_size: int,
        device: torch.device,
    ):
        self.images = torch.from_numpy(split.images).to(device)
        self.labels = torch.from_numpy(split.labels).to(device)
        self.global_batch, self.seed = global_batch, seed
        self.rank, self.world_size = rank, world_size
        self.steps = iters_per_epoch(len(split), global_batch)

    def batches(self, start_iter: int) -> Iterator[Batch]:
        b = self.global_batch // self.world_size
        epoch, pos = divmod(start_iter, self.steps)
        while True:
            order = rank_epoch_order(
                len(self.labels), self.global_batch, self.seed, epoch, self.rank, self.world_size
            )
            order = torch.from_numpy(order).to(self.images.device)
            for p in range(pos, self.steps):
                idx = order[p * b : (p + 1) * b]
                yield self.images[idx], self.labels[idx]
            epoch, pos = epoch + 1, 0


class ResidentEvalLoader:
    """This rank's contiguous shard of an evaluation set, in order."""

    def __init__(self, split: Split, batch: int, rank: int, world_size: int, device: torch.device):
        shard = eval_shard(len(split), rank, world_size)
        self.images = torch.from_numpy(split.images[shard]).to(device)
        self.labels = torch.from_numpy(split.labels[shard]).to(device)
        self.batch = batch

    def __iter__(self) -> Iterator[Batch]:
        for i in range(0, len(self.labels), self.batch):
            yield self.images[i : i + self.batch], self.labels[i : i + self.batch]


def ffcv_missing_message() -> str:
    return (
        "data.loader = 'ffcv' needs FFCV: apt-get install -y libopencv-dev libturbojpeg0-dev "
        "pkg-config && pip install 'resnetdist[ffcv]'"
    )


def make_train_loader(
    cfg: DataConfig, split: Split, indices: np.ndarray | None, beton: Path | None,
    global_batch: int, seed: int, rank: int, world_size: int, device: torch.device,
) -> TrainLoader:
    if cfg.loader == "gpu":
        return ResidentTrainLoader(split, global_batch, seed, rank, world_size, device)
    from .beton import FfcvTrainLoader

    return FfcvTrainLoader(
        beton, indices, global_batch, seed, rank, world_size, device, cfg.ffcv_workers
    )


def make_eval_loader(
    cfg: DataConfig, split: Split, indices: np.ndarray | None, beton: Path | None,
    rank: int, world_size: int, device: torch.device,
):
    if cfg.loader == "gpu":
        return ResidentEvalLoader(split, cfg.eval_batch, rank, world_size, device)
    from .beton import FfcvEvalLoader

    return FfcvEvalLoader(beton, indices, cfg.eval_batch, rank, world_size, device, cfg.ffcv_workers)
