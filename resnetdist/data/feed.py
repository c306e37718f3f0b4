"""Where each iteration's batch comes from, on the rank's device: the data side's feed. The
loop asks it for the batches from an iteration on (`batches(start)`) and hands each to the step.
`Feed`: a loader's batches with draw_params(seed, iteration), this rank's slice of both
(with `out`, gathered straight into those buffers: a graphed step's inputs, one copy, not two);
data/epochs.EpochTable: a resident loader's epochs on the device, for a step that gathers its
own inputs (it yields () per iteration). `feed_for` picks one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from .augment import draw_params
from .epochs import EpochTable
from .resident import Batch, TrainLoader


@dataclass
class Feed:
    loader: TrainLoader
    seed: int | list[int]  # a pack's seeds: its loader yields (K, b, ...) batches, member j's in row j
    global_batch: int
    rank: int = 0
    world_size: int = 1
    out: Batch | None = None  # buffers each batch is gathered into (a graphed step's inputs)

    def batches(self, start_iter: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        it = start_iter
        for images, labels in self.loader.batches(start_iter, out=self.out):
            yield images, labels, self.draws(it)
            it += 1

    def draws(self, it: int) -> torch.Tensor:
        """Iteration `it`'s augmentation numbers: (3, b), or a pack's (K, 3, b), each member's of its seed."""
        if isinstance(self.seed, list):
            return torch.stack([draw_params(s, it, self.global_batch, self.rank, self.world_size) for s in self.seed])
        return draw_params(self.seed, it, self.global_batch, self.rank, self.world_size)


def feed_for(loader: TrainLoader, source: EpochTable | None, seed: int | list[int], global_batch: int, rank: int,
             world_size: int, out: Batch | None = None) -> Feed | EpochTable:
    """The device-side epochs when there are (`source`: the step gathers each batch itself),
    else the loader's batches, gathered into `out` when given."""
    return source if source is not None else Feed(loader, seed, global_batch, rank, world_size, out)
