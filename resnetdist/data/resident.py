"""The "resident" loaders: the whole uint8 dataset resident on the training device (150 MB
of CIFAR-10 on a GPU; host memory on the CPU), batches gathered there by index. No worker
processes, nothing crosses the PCIe bus per step.

Every loader (these and data/beton.py's FFCV ones) yields (uint8 images (b,3,32,32), int64
labels) already on the rank's device, in the order of data/order.py, so both kinds deliver
the same samples at the same iteration; augmentation happens afterwards, on that device.
"""

from __future__ import annotations

from typing import Iterator, Protocol

import torch

from .cifar import Split
from .order import eval_shard, iters_per_epoch, rank_epoch_order

Batch = tuple[torch.Tensor, torch.Tensor]


class TrainLoader(Protocol):
    steps: int  # iterations per epoch

    def batches(self, start_iter: int, out: Batch | None = None) -> Iterator[Batch]:
        """Endless batches for iterations start_iter, start_iter+1, ...; with `out` (images,
        labels buffers of one batch), each batch is written there and `out` is yielded."""


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

    def batches(self, start_iter: int, out: Batch | None = None) -> Iterator[Batch]:
        b = self.global_batch // self.world_size
        epoch, pos = divmod(start_iter, self.steps)
        while True:
            order = rank_epoch_order(
                len(self.labels), self.global_batch, self.seed, epoch, self.rank, self.world_size
            )
            order = torch.from_numpy(order).to(self.images.device)
            for p in range(pos, self.steps):
                idx = order[p * b : (p + 1) * b]
                if out is None:
                    yield self.images[idx], self.labels[idx]
                else:  # gathered into the graph's input buffers: no second copy
                    yield (torch.index_select(self.images, 0, idx, out=out[0]),
                           torch.index_select(self.labels, 0, idx, out=out[1]))
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
