"""Per-epoch numbers on the device: an `EpochTable` holds one epoch's host-built numbers (a
resident loader's sample order, a feed's augmentation draws) in a fixed device buffer, so that
each iteration reads its row by position with no host work beyond queueing the read.

The numbers are a few array operations per epoch (data/order.py, data/augment.draw_block: a few
ms, `bench` reports the figure), uploaded from pinned memory with a non-blocking copy on CUDA,
queued behind the previous epoch's steps on the same stream. The next epoch's are built ahead,
on a thread of their own, while the current epoch trains: at the boundary the loop finds them
ready and only queues the upload.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch

# one thread for every EpochTable of the process: epochs are built one at a time, each well within
# an epoch's training (390 steps of >= 2 ms against a few ms of host work, most of it in numpy
# with the GIL released)
_AHEAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="resnetdist-epochs")


class EpochTable:
    """`numbers(epoch)` (a host array of `shape`, one row per iteration of the epoch) in a device buffer."""

    def __init__(self, numbers: Callable[[int], np.ndarray], shape: tuple[int, ...], device: torch.device):
        self.numbers = numbers
        self.table = torch.zeros(shape, dtype=torch.long, device=device)
        self.loaded: int | None = None  # the epoch in the buffer
        self.ahead: tuple[int, Future] | None = None  # the next epoch's numbers, being built

    def use_epoch(self, epoch: int) -> torch.Tensor:
        """The buffer, holding `epoch`'s numbers: uploaded unless it holds them already, taken
        from the thread that built them ahead if it did; then the next epoch's are started."""
        if epoch != self.loaded:
            ready = self.ahead is not None and self.ahead[0] == epoch
            upload(self.table, self.ahead[1].result() if ready else self.numbers(epoch))
            self.loaded = epoch
            self.ahead = (epoch + 1, _AHEAD.submit(self.numbers, epoch + 1))
        return self.table


def upload(dst: torch.Tensor, src: np.ndarray) -> None:
    """Copy host numbers into a device buffer without blocking the host: on CUDA from pinned
    memory (the caching host allocator keeps the block until the copy has run)."""
    host = torch.from_numpy(np.ascontiguousarray(src))
    if dst.is_cuda:
        host = host.pin_memory()
    dst.copy_(host.view(dst.shape), non_blocking=dst.is_cuda)
