"""The "ffcv" loaders: training and evaluation batches read from the .beton files that
data/beton.py writes, in the same order as the resident loader.

Both loaders follow data/order.py exactly, via a custom FFCV TraversalOrder; the Loader
itself never shards (distributed=False), and its seed is unused by our orders. FFCV reuses its
output buffers (batches_ahead + 2 slots per pipeline), so training batches are copied into the
feed's buffers (data/feed.py) and evaluation batches cloned.

Process-wide patches of FFCV 1.0.2, all here: its epoch thread is made to set the rank's CUDA
device (_install_device_hook); an exception in that thread no longer leaves the consumer
waiting forever (a RuntimeError); an epoch thread still running at interpreter exit could
abort the process (threads are joined when a stream is closed and at exit). FFCV's
num_workers is capped at numba's thread count.
"""

from __future__ import annotations

import atexit
import sys
import threading
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .. import dist
from ..config import DataConfig
from ..errors import DataError
from .beton import beton_paths, prepare_betons, require_ffcv
from .cifar import Cifar10
from .order import eval_shard, iters_per_epoch, rank_batch, rank_epoch_order
from .resident import Batch


@contextmanager
def _keep_torch_threads():
    """FFCV's Loader calls torch.set_num_threads(num_workers) in __init__ and __iter__."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _order_class():
    """A TraversalOrder whose sample_order(k) is a given function of k.

    FFCV 1.0.2's Loader accepts a custom order only as an *instance*, which it then calls
    with itself (`order(loader)`); passing the class, as its docs suggest, raises
    ValueError. So the instance is callable and binds the loader on that call."""
    from ffcv.traversal_order.base import TraversalOrder

    class FunctionOrder(TraversalOrder):
        def __init__(self, fn: Callable[[int], np.ndarray]):  # no loader yet
            self.fn = fn

        def __call__(self, loader) -> "FunctionOrder":
            super().__init__(loader)
            return self

        def sample_order(self, epoch: int) -> np.ndarray:
            return np.ascontiguousarray(self.fn(epoch), dtype=np.uint64)

    return FunctionOrder


def _record_indices(beton: Path, indices: np.ndarray | None) -> np.ndarray:  # `indices`, or all records
    from ffcv.reader import Reader

    if not beton.is_file():
        raise DataError(f"{beton}: missing (run `resnetdist prepare`)")
    n = int(Reader(str(beton)).num_samples)
    if indices is None:
        return np.arange(n, dtype=np.int64)
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(idx) and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"indices outside the {n} records of {beton}")
    return idx


def _make_loader(beton: Path, batch: int, order, drop_last: bool, device: torch.device, workers: int):
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.ndarray import NDArrayDecoder
    from ffcv.loader import Loader
    from ffcv.transforms import Squeeze, ToDevice, ToTensor
    import numba

    # FFCV hands num_workers to numba.set_num_threads, which refuses more threads than numba
    # has (the CPU count by default): data.ffcv_workers = 4 would fail on a 2-core machine.
    workers = max(1, min(int(workers), numba.config.NUMBA_NUM_THREADS))
    pipelines = {
        # NDArray (3,32,32) uint8 -> contiguous (b,3,32,32) uint8; no permute needed.
        "image": [NDArrayDecoder(), ToTensor(), ToDevice(device, non_blocking=True)],
        # (b,1) int64 -> (b,); Squeeze(1), not Squeeze(): a batch of one keeps its dim.
        "label": [IntDecoder(), ToTensor(), Squeeze(1), ToDevice(device, non_blocking=True)],
    }
    _install_device_hook()
    with _keep_torch_threads():
        loader = Loader(
            str(beton), batch_size=batch, num_workers=workers, order=order,
            distributed=False,  # our order does the sharding
            seed=0,  # unused by our orders; given so FFCV does not draw one from np.random
            drop_last=drop_last, pipelines=pipelines,
        )
    loader._device = device  # read by the epoch thread (see _install_device_hook)
    return loader


def _wait_for_batch(it) -> None:
    """Block until FFCV's epoch thread has queued something (a batch or its end marker).

    If a pipeline stage raises, FFCV's thread dies without queueing its end marker, and
    EpochIterator.__next__ would wait on its queue forever; here that becomes an error."""
    q = it.output_queue
    with q.not_empty:  # the queue's own condition; a put() wakes us at once
        while not q.queue:
            if not it.is_alive():
                raise RuntimeError(
                    f"FFCV's loader thread for {it.loader.fname} stopped before the end of the "
                    "epoch (its exception is printed above)"
                )
            q.not_empty.wait(0.5)


def bind_thread(device: torch.device) -> None:  # the calling thread's CUDA device
    if device.type == "cuda":
        torch.cuda.set_device(device)


def _install_device_hook() -> None:
    """FFCV 1.0.2's epoch thread never sets the CUDA device, so entering its CUDA streams
    there creates a context on GPU 0 in every rank (~0.5 GB each under DDP; FFCV PR #190,
    never merged). EpochIterator.run is wrapped, once per process, to first make the
    loader's device current in that thread (`_device`, set by _make_loader; FFCV loaders
    made elsewhere are left alone)."""
    from ffcv.loader.epoch_iterator import EpochIterator

    if getattr(EpochIterator.run, "_binds_device", False):
        return
    original = EpochIterator.run

    def run(self):
        device = getattr(self.loader, "_device", None)
        if device is not None:
            bind_thread(device)
        return original(self)

    run._binds_device = True
    EpochIterator.run = run


_live_epochs: "weakref.WeakSet" = weakref.WeakSet()  # FFCV epoch threads we started


def _stop(it) -> None:
    """Stop and join an FFCV epoch thread. Its close() only sets a flag the thread checks when
    its queue has been full for 0.5 s; a thread still decoding when the interpreter exits
    can abort the process ("terminate called without an active exception": about half the
    runs with batch 128 here), so the thread is joined, not just told to stop."""
    it.close()
    if it.is_alive() and it is not threading.current_thread():
        it.join(timeout=10)
    _live_epochs.discard(it)


@atexit.register
def _stop_all() -> None:  # epochs whose generator was never closed (e.g. training just ended)
    for it in list(_live_epochs):
        _stop(it)


def _epoch(loader, out: Batch | None = None) -> Iterator[Batch]:
    """One pass of an FFCV Loader, yielding `out` copied into (without: clones); stops its
    thread if abandoned."""
    with _keep_torch_threads():
        it = iter(loader)
    _live_epochs.add(it)
    try:
        while True:
            _wait_for_batch(it)
            try:
                images, labels = next(it)
            except StopIteration:
                return
            if out is None:
                yield images.clone(), labels.clone()  # FFCV will overwrite its buffers
            else:
                yield out[0].copy_(images, non_blocking=True), out[1].copy_(labels, non_blocking=True)
    finally:
        _stop(it)


class FfcvTrainLoader:
    """The "ffcv" training loader: the same samples, in the same order, as ResidentTrainLoader.
    A pack's (several `seeds`, pack.py) has one FFCV Loader per member, each in its own seed's
    order, so member j reads exactly the batches of its run alone, copied into row j of the
    (K, b, ...) buffers.

    Loader epoch k (FFCV's epoch counter) covers iterations start_iter + k*iters up to
    start_iter + (k+1)*iters - 1 (iters per epoch), so a run resumed mid-epoch starts at the
    right batch without decoding skipped ones, and every FFCV epoch has the same length. One stream
    at a time: a new batches() call re-targets the shared Loaders."""

    def __init__(self, beton: Path, indices: np.ndarray | None, global_batch: int, seeds: list[int], rank: int,
                 world_size: int, device: torch.device, workers: int):
        require_ffcv()
        self.global_batch, self.seeds = global_batch, seeds
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.b = rank_batch(global_batch, world_size)
        self.idx = _record_indices(Path(beton), indices)
        self.iters_per_epoch = iters_per_epoch(len(self.idx), global_batch)
        self.start_iter = 0
        self.loaders = [_make_loader(Path(beton), self.b, _order_class()(lambda k, s=seed: self._window(s, k)), True,
                                     self.device, workers) for seed in seeds]

    def _window(self, seed: int, k: int) -> np.ndarray:
        epoch, pos = divmod(self.start_iter + k * self.iters_per_epoch, self.iters_per_epoch)
        n, cut = len(self.idx), pos * self.b  # the rest of `epoch`, then the start of the next
        order = rank_epoch_order(n, self.global_batch, seed, epoch, self.rank, self.world_size)
        if pos:
            after = rank_epoch_order(n, self.global_batch, seed, epoch + 1, self.rank, self.world_size)
            order = np.concatenate([order[cut:], after[:cut]])
        return self.idx[order]

    def batches(self, start_iter: int, out: Batch) -> Iterator[Batch]:
        self.start_iter = start_iter
        rows = [out] if len(self.seeds) == 1 else [(out[0][j], out[1][j]) for j in range(len(self.seeds))]
        streams = [_endless(loader, row) for loader, row in zip(self.loaders, rows)]
        try:
            while True:
                for stream in streams:
                    next(stream)
                yield out
        finally:
            for stream in streams:  # each stops its FFCV epoch thread
                stream.close()


def _endless(loader, out: Batch) -> Iterator[Batch]:
    loader.next_epoch = 0
    while True:
        yield from _epoch(loader, out)


class FfcvEvalLoader:
    """This rank's contiguous shard of an evaluation set, in order; re-iterable."""

    def __init__(self, beton: Path, indices: np.ndarray | None, batch: int, rank: int, world_size: int,
                 device: torch.device, workers: int):
        require_ffcv()
        idx = _record_indices(Path(beton), indices)
        self.order = idx[eval_shard(len(idx), rank, world_size)]
        self.loader = None
        if len(self.order):
            self.loader = _make_loader(Path(beton), batch, _order_class()(lambda _: self.order), False,
                                       torch.device(device), workers)

    def __iter__(self) -> Iterator[Batch]:
        if self.loader is not None:
            yield from _epoch(self.loader)


def ensure_betons(cfg: DataConfig, data: Cifar10) -> Path:
    """The .beton files' folder (data.beton_dir, else beside the binaries), converted on first use
    by rank 0 while the others wait; every node must then hold them."""
    out = Path(cfg.beton_dir) if cfg.beton_dir else data.folder.parent / "beton"
    if dist.is_main_process():
        prepare_betons(data.folder, out, announce=lambda what: print(
            f"note: --loader ffcv: first use, {what} (set data.beton_dir to put them elsewhere)",
            file=sys.stderr, flush=True))
    dist.barrier()
    from .presence import on_every_rank, require_files

    on_every_rank(lambda: require_files(list(beton_paths(out))), what="data check (every node holds the betons)")
    return out


def open_ffcv_loaders(cfg: DataConfig, data: Cifar10, ctx: dist.DistContext, global_batch: int,
                      seeds: list[int], train: bool) -> tuple[FfcvTrainLoader | None, dict[str, FfcvEvalLoader]]:
    """data/__init__.open_loaders for data.loader = ffcv: the training loader (with `train`) and
    the evaluation shards."""
    train_beton, test_beton = beton_paths(ensure_betons(cfg, data))
    args = (cfg.eval_batch, ctx.rank, ctx.world_size, ctx.device, cfg.ffcv_workers)
    evals = {"test": FfcvEvalLoader(test_beton, None, *args)}
    if data.val is not None:
        evals["val"] = FfcvEvalLoader(train_beton, data.val_indices, *args)
    if not train:
        return None, evals
    return FfcvTrainLoader(train_beton, data.train_indices, global_batch, seeds, ctx.rank, ctx.world_size,
                           ctx.device, cfg.ffcv_workers), evals
