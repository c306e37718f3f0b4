"""Which samples each rank sees at each iteration, the same for every loader and world size.

Epoch e visits the training set in one permutation drawn from (seed, e). The permutation is
cut into global batches of `global_batch` samples (the remainder is dropped); rank r of W
takes slice [r*b, (r+1)*b) of every global batch (`rank_slice`; b = global_batch // W,
`rank_batch`; the augmentation draws are sliced the same way). So the union of the
ranks' batches at iteration i is the same global batch whatever W is, and iteration i alone
decides where in the data a run is: resuming needs no loader state.
"""

from __future__ import annotations

import numpy as np


def iters_per_epoch(num_samples: int, global_batch: int) -> int:
    n = num_samples // global_batch
    if n == 0:
        raise ValueError(f"a global batch of {global_batch} is larger than the training set ({num_samples})")
    return n


def rank_batch(global_batch: int, world_size: int) -> int:
    """b, each rank's share of a global batch: the data side's one place for it (training/plan.py
    checks the configuration's batch divides before any worker starts)."""
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} is not divisible by {world_size} ranks")
    return global_batch // world_size


def rank_slice(global_batch: int, rank: int, world_size: int) -> slice:
    """Rank `rank`'s columns of a global batch."""
    b = rank_batch(global_batch, world_size)
    return slice(rank * b, (rank + 1) * b)


def rank_epoch_order(num_samples: int, global_batch: int, seed: int, epoch: int, rank: int, world_size: int
                     ) -> np.ndarray:
    """Sample indices of one epoch for one rank, batch after batch (length iters * b)."""
    iters = iters_per_epoch(num_samples, global_batch)
    perm = np.random.default_rng([seed, epoch]).permutation(num_samples)[: iters * global_batch]
    return perm.reshape(iters, global_batch)[:, rank_slice(global_batch, rank, world_size)].reshape(-1)


def eval_shard(num_samples: int, rank: int, world_size: int) -> np.ndarray:
    """A contiguous, disjoint share of an evaluation set; together the shards cover it once."""
    return np.array_split(np.arange(num_samples), world_size)[rank]
