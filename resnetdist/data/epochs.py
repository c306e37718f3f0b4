"""A resident loader's epochs, on the device, for a step that gathers its own inputs: the step
then needs no host work per iteration beyond launching it (one CUDA-graph replay).

Once per epoch the host builds this rank's sample order (data/order.py) and every iteration's
augmentation draws (data/augment.draw_block: the per-step feed's numbers, for the whole epoch
in a few array operations, a few ms: `bench` reports the figure), and uploads both into fixed device buffers: from
pinned memory with a non-blocking copy on CUDA, queued behind the previous epoch's steps on
the same stream. The next epoch's numbers are built ahead, on a thread of their own, while
the current epoch trains: at the boundary the loop finds them ready and only queues the upload. The
step reads iteration i's batch at position i mod steps-per-epoch with device ops (`gather`),
taking i from its own device-side counter, so the numbers and samples are exactly those of the
per-step feed (loop.Feed): resumes and world sizes agree bitwise as before.

An `EpochTable` is also the step's feed: `batches(start)` yields an empty argument tuple per
iteration (the step takes none) and loads each epoch before its first iteration.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch

from .augment import draw_block
from .order import rank_epoch_order
from .resident import ResidentTrainLoader


# one thread for every EpochTable of the process: epochs are built one at a time, each well within
# an epoch's training (390 steps of >= 2 ms against a few ms of host work, most of it in numpy
# with the GIL released)
_AHEAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="resnetdist-epochs")


class EpochTable:
    def __init__(self, loader: ResidentTrainLoader, seed: int, global_batch: int, rank: int = 0, world_size: int = 1):
        self.images, self.labels = loader.images, loader.labels  # the resident set, on the device
        self.seed, self.global_batch, self.rank, self.world_size = seed, global_batch, rank, world_size
        self.steps, self.b = loader.steps, global_batch // world_size
        device = self.images.device
        self.order = torch.zeros((self.steps, self.b), dtype=torch.long, device=device)
        self.aug = torch.zeros((self.steps, 3, self.b), dtype=torch.long, device=device)
        self.loaded: int | None = None  # the epoch in the buffers
        self.ahead: tuple[int, Future] | None = None  # the next epoch's numbers, being built

    def numbers(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """`epoch`'s sample order (steps, b) and draws (steps, 3, b), on the host."""
        order = rank_epoch_order(len(self.labels), self.global_batch, self.seed, epoch, self.rank, self.world_size)
        draws = draw_block(self.seed, epoch * self.steps, self.steps, self.global_batch, self.rank, self.world_size)
        return order.reshape(self.steps, self.b), draws

    def use_epoch(self, epoch: int) -> None:
        """Put `epoch`'s order and draws in the device buffers (nothing to do if they hold it),
        taking them from the thread that built them ahead if it did; then start building the
        next epoch's."""
        if epoch == self.loaded:
            return
        ready = self.ahead is not None and self.ahead[0] == epoch
        order, draws = self.ahead[1].result() if ready else self.numbers(epoch)
        upload(self.order, order)
        upload(self.aug, draws)
        self.loaded = epoch
        self.ahead = (epoch + 1, _AHEAD.submit(self.numbers, epoch + 1))

    def gather(self, it: torch.Tensor, x: torch.Tensor, y: torch.Tensor, aug: torch.Tensor) -> None:
        """Iteration `it`'s (a 0-d device tensor) images, labels and draws into x, y, aug: device
        ops only (index_select with a device index: no read-back), so a graph can hold them."""
        pos = torch.remainder(it, self.steps).view(1)
        idx = self.order.index_select(0, pos).view(self.b)
        torch.index_select(self.images, 0, idx, out=x)
        torch.index_select(self.labels, 0, idx, out=y)
        aug.copy_(self.aug.index_select(0, pos).view(3, self.b))

    def batch(self, it: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Iteration `it`'s inputs in new tensors (the eager step)."""
        x = torch.empty((self.b, *self.images.shape[1:]), dtype=self.images.dtype, device=self.images.device)
        y = torch.empty(self.b, dtype=self.labels.dtype, device=self.labels.device)
        aug = torch.empty((3, self.b), dtype=torch.long, device=self.images.device)
        self.gather(it, x, y, aug)
        return x, y, aug

    def batches(self, start_iter: int) -> Iterator[tuple]:
        """The feed of a step that gathers its own inputs: () for every iteration from
        start_iter on, each epoch loaded before its first iteration."""
        it = start_iter
        self.use_epoch(it // self.steps)
        while True:
            if it % self.steps == 0:
                self.use_epoch(it // self.steps)
            yield ()
            it += 1


def upload(dst: torch.Tensor, src: np.ndarray) -> None:
    """Copy host numbers into a device buffer without blocking the host: on CUDA from pinned
    memory (the caching host allocator keeps the block until the copy has run)."""
    host = torch.from_numpy(np.ascontiguousarray(src))
    if dst.is_cuda:
        host = host.pin_memory()
    dst.copy_(host.view(dst.shape), non_blocking=dst.is_cuda)


class PackTable:
    """A pack's epochs (pack.py): one EpochTable per member over the same resident images, each
    with its own seed's sample order and draws, so member j sees exactly the batches of its run
    alone. Member j's batch goes to row j of (K, b, ...) buffers (graph.StaticInputs of a
    pack): 3 gathers per member, inside the graph as for one run."""

    def __init__(self, tables: list[EpochTable]):
        self.tables = tables
        self.steps, self.b = tables[0].steps, tables[0].b

    def use_epoch(self, epoch: int) -> None:
        for table in self.tables:
            table.use_epoch(epoch)

    def gather(self, it: torch.Tensor, x: torch.Tensor, y: torch.Tensor, aug: torch.Tensor) -> None:
        for j, table in enumerate(self.tables):
            table.gather(it, x[j], y[j], aug[j])

    def batch(self, it: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Iteration `it`'s inputs of every member, stacked (the eager step)."""
        images, labels, aug = zip(*(table.batch(it) for table in self.tables))
        return torch.stack(images), torch.stack(labels), torch.stack(aug)

    batches = EpochTable.batches  # the same feed: every member's epoch loaded before its first iteration


def epoch_table_for(loader, seeds: int | list[int], global_batch: int, rank: int,
                    world_size: int) -> EpochTable | PackTable | None:
    """The device-side epochs of a resident loader, of one seed or of a pack's (a list of
    several); None for other loaders (FFCV's batches come from its own pipeline, fed per step)."""
    if not isinstance(loader, ResidentTrainLoader):
        return None
    if isinstance(seeds, int) or len(seeds) == 1:
        return EpochTable(loader, seeds if isinstance(seeds, int) else seeds[0], global_batch, rank, world_size)
    return PackTable([EpochTable(loader, seed, global_batch, rank, world_size) for seed in seeds])
