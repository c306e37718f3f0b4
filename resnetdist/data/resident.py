"""The "resident" loaders: the whole uint8 dataset resident on the training device (150 MB
of CIFAR-10 on a GPU; host memory on the CPU), batches gathered there by index. No worker
processes, nothing crosses the PCIe bus per step.

Every training loader (this one and data/ffcv_loader.py's) writes each iteration's uint8 images
(b,3,32,32) and int64 labels into the buffers it is given (the feed's, data/feed.py), on the
rank's device, in the order of data/order.py, so both kinds deliver the same samples at the
same iteration; augmentation happens afterwards, on that device.
"""

from __future__ import annotations

from typing import Iterator, Protocol

import numpy as np
import torch

from .cifar import Split
from .epochs import EpochTable
from .order import eval_shard, iters_per_epoch, rank_batch, rank_epoch_order

Batch = tuple[torch.Tensor, torch.Tensor]


class TrainLoader(Protocol):
    seeds: list[int]  # one run's seed, or a pack's (member j's batch in row j of (K, b, ...) buffers)
    global_batch: int
    rank: int
    world_size: int
    b: int  # this rank's share of a global batch (order.rank_batch)
    iters_per_epoch: int
    device: torch.device

    def batches(self, start_iter: int, out: Batch) -> Iterator[Batch]:
        """Endless: each iteration's images and labels from start_iter on, written into `out`."""


class ResidentTrainLoader:
    """Each iteration's batch gathered from the resident set by this epoch's order (of each
    seed, a pack's in one gather), the order on the device (an EpochTable, built ahead)."""

    def __init__(self, split: Split, global_batch: int, seeds: list[int], rank: int, world_size: int,
                 device: torch.device):
        self.images = torch.from_numpy(split.images).to(device)
        self.labels = torch.from_numpy(split.labels).to(device)
        self.global_batch, self.seeds, self.rank, self.world_size = global_batch, seeds, rank, world_size
        self.b = rank_batch(global_batch, world_size)
        self.iters_per_epoch, self.device = iters_per_epoch(len(split), global_batch), torch.device(device)
        self.orders = EpochTable(self.order, (self.iters_per_epoch, len(seeds) * self.b), self.device)

    def order(self, epoch: int) -> np.ndarray:
        """`epoch`'s sample indices (iters, K*b): each row member after member."""
        return np.concatenate([rank_epoch_order(len(self.labels), self.global_batch, seed, epoch, self.rank,
                                                self.world_size).reshape(self.iters_per_epoch, self.b)
                               for seed in self.seeds], axis=1)

    def batches(self, start_iter: int, out: Batch) -> Iterator[Batch]:
        # a pack's (K, b, ...) buffers as K*b rows: member j's batch lands in row j
        images, labels = out[0].view(-1, *self.images.shape[1:]), out[1].view(-1)
        it = start_iter
        while True:
            epoch, pos = divmod(it, self.iters_per_epoch)
            idx = self.orders.use_epoch(epoch)[pos]  # a row by host position: a view, no read-back
            torch.index_select(self.images, 0, idx, out=images)
            torch.index_select(self.labels, 0, idx, out=labels)
            yield out
            it += 1


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
