"""Worker for tests/test_beton.py, run under torchrun (gloo, CPU).

Every rank prepares the betons (the lock serialises them), builds the training and
evaluation loaders of each kind through data.open_loaders (training batches through the
feed, data/feed.py, as a run takes them), identifies the samples it is
given (the record id is stored in pixel bytes [0,0,0] and [0,0,1]), and rank 0 writes what
every rank saw, gathered with all_gather_object, to OUT as JSON. The training streams are
left open at exit on purpose.

usage: torchrun --standalone --nproc_per_node=2 tests/_shard_worker.py BINS BETON_DIR OUT
       GLOBAL_BATCH EPOCHS EVAL_BATCH SEED
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from resnetdist.config import DataConfig
from resnetdist.data import cifar, open_loaders
from resnetdist.data.beton import prepare_betons
from resnetdist.data.feed import Feed
from resnetdist.data.order import iters_per_epoch
from resnetdist.dist import DistContext


OPEN_STREAMS: list = []


def ids_of(images: torch.Tensor) -> list[int]:
    images = images.cpu()
    return (images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()).tolist()


def main() -> None:
    bins, beton_dir, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    global_batch, epochs, eval_batch, seed = map(int, sys.argv[4:8])
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")

    train_beton, test_beton, rebuilt = prepare_betons(bins, beton_dir)
    dist.barrier()
    train = cifar.read_files(bins, cifar.BINARY.train_files)
    test = cifar.read_files(bins, cifar.BINARY.test_files)
    iters = iters_per_epoch(len(train), global_batch)

    result: dict = {"rank": rank, "world": world, "rebuilt": rebuilt}
    data = cifar.Cifar10(train, test, folder=bins)
    for kind in ("resident", "ffcv"):
        # 64 workers: more than numba has threads here; the loader caps it
        cfg = DataConfig(loader=kind, ffcv_workers=64, eval_batch=eval_batch, beton_dir=str(beton_dir))
        loaders = open_loaders(cfg, data, DistContext(rank, rank, world, device), global_batch, seed)
        epochs_seen = []
        gen = Feed(loaders.train).batches(0)
        for _ in range(epochs):
            seen = []
            for _ in range(iters):
                images, labels, _ = next(gen)
                seen.append([ids_of(images), labels.tolist()])
            epochs_seen.append(seen)
        # left open until the interpreter exits, as by a training loop that just ends: the
        # process must still exit cleanly with FFCV's epoch thread alive
        next(gen)  # into the next epoch: FFCV's thread is now mid-epoch, filling its queue
        OPEN_STREAMS.append(gen)
        evals = []
        for images, labels in loaders.evals["test"]:
            evals.append([ids_of(images), labels.tolist()])
        result[kind] = {"train": epochs_seen, "eval": evals}

    gathered: list = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        out.write_text(json.dumps(gathered))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
