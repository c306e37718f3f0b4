"""Where each iteration's batch comes from: the data side's feed, one for both loaders. The loop
asks it for the batches from an iteration on (`batches(start)`) and hands each to the step.

The feed owns fixed device buffers, one batch of this rank (a pack's: (K, b, ...), member j in
row j), refilled per iteration: images and labels by its loader, the augmentation draws
(data/augment.draw_block) from this epoch's draws on the device (an EpochTable, built ahead). It
yields those same buffers every iteration, so a graphed step captured with them as its inputs
replays with no copy. Its cost with the resident loader: 3 small kernels per iteration queued
before the step, outside the graph: a few µs against ResNet-20's ~2.4 ms graphed step on an
H100, expected, not measured.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from .augment import draw_block
from .epochs import EpochTable
from .resident import TrainLoader


class Feed:
    def __init__(self, loader: TrainLoader):
        self.loader = loader
        k, b = len(loader.seeds), loader.b
        lead = (b,) if k == 1 else (k, b)
        self.x = torch.zeros((*lead, 3, 32, 32), dtype=torch.uint8, device=loader.device)
        self.y = torch.zeros(lead, dtype=torch.long, device=loader.device)
        self.aug = torch.zeros((*lead[:-1], 3, b), dtype=torch.long, device=loader.device)
        self.draws = EpochTable(self.epoch_draws, (loader.iters_per_epoch, *self.aug.shape), loader.device)

    @property
    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The buffers every batch is written into and yielded as: images, labels, draws."""
        return self.x, self.y, self.aug

    def epoch_draws(self, epoch: int) -> np.ndarray:
        """`epoch`'s draws of each seed: (iters, 3, b), a pack's (iters, K, 3, b)."""
        ld, iters = self.loader, self.loader.iters_per_epoch
        draws = [draw_block(seed, epoch * iters, iters, ld.global_batch, ld.rank, ld.world_size) for seed in ld.seeds]
        return draws[0] if len(draws) == 1 else np.stack(draws, axis=1)

    def batches(self, start_iter: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        images = self.loader.batches(start_iter, (self.x, self.y))
        it, iters = start_iter, self.loader.iters_per_epoch
        try:
            while True:
                next(images)
                epoch, pos = divmod(it, iters)
                self.aug.copy_(self.draws.use_epoch(epoch)[pos])
                yield self.inputs
                it += 1
        finally:
            images.close()  # an FFCV loader's epoch threads stop
