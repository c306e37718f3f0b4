"""Which samples each rank sees at each iteration, the same for every loader and world size.

Epoch e visits the training set in one permutation drawn from (seed, e). The permutation is
cut into global batches of `global_batch` samples (the remainder is dropped); rank r of W
takes slice [r*b, (r+1)*b) of every global batch, b = global_batch // W. So the union of the
ranks' batches at iteration i is the same global batch whatever W is, and iteration i alone
decides where in the data a run is: resuming needs no loader state.
"""

from __future__ import annotations

import numpy as np


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def iters_per_epoch(num_samples: int, global_batch: int) -> int:
    n = num_samples // global_batch
    if n == 0:
        raise ValueError(
            f"a global batch of {global_batch} is larger than the training set ({num_samples})"
        )
    return n


def rank_epoch_order(
    num_samples: int, global_batch: int, seed: int, epoch: int, rank: int, world_size: int
) -> np.ndarray:
    """Sample indices of one epoch for one rank, batch after batch (length iters * b)."""
    b = global_batch // world_size
    steps = iters_per_epoch(num_samples, global_batch)
    perm = epoch_permutation(num_samples, seed, epoch)[: steps * global_batch]
    return perm.reshape(steps, global_batch)[:, rank * b : (rank + 1) * b].reshape(-1)


def eval_shard(num_samples: int, rank: int, world_size: int) -> np.ndarray:
    """A contiguous, disjoint share of an evaluation set; together the shards cover it once."""
    return np.array_split(np.arange(num_samples), world_size)[rank]
