"""CIFAR-10 as FFCV .beton files: conversion (idempotent, atomic) and the "ffcv" loaders.

Layout. Each record holds two fields: `image`, an NDArrayField of uint8 (3, 32, 32), and
`label`, an IntField. The image field stores the 3072 bytes of a record exactly as the .bin
file does (channel-major), so decoding is one memcpy per image into a contiguous
(b, 3, 32, 32) buffer: bit-exact, no JPEG, no HWC->CHW permute (RGBImageField raw would
store HWC and need ToTorchImage, which yields a channels_last view rather than the
contiguous tensor the resident loader gives; for 3 KB images both decoders are a memcpy,
so the permute is pure cost).

Conversion. `prepare_betons` writes train.beton (data_batch_1..5, in order) and
test.beton (test_batch), then beton.json, which records the md5 of every source .bin, the
md5 and size of both betons and FORMAT_VERSION. It is the commit marker: a later call
that finds it consistent with the sources and the betons does nothing. Everything is
written under temporary names (*.partial) and renamed only after a complete, fsynced
write; the old outputs are removed before a rebuild starts, so an interrupted rebuild
(exception, Ctrl-C, SIGKILL) leaves no train.beton/test.beton behind. A lock file
(.beton.lock, flock) serialises concurrent callers, e.g. every torchrun rank calling
prepare; stale *.partial files are removed under that lock by the next call.
The records are written in-process (FFCV's DatasetWriter machinery, without its worker
processes): FFCV's own `from_indexed_dataset` forks writers and busy-waits for them, so a
writer that dies hangs the parent forever, and it prints its own progress bar.

Loading. Both loaders follow data/order.py exactly, via a custom FFCV TraversalOrder; the
Loader itself never shards (distributed=False), and its seed is unused by our orders.
Batches are cloned before they are yielded because FFCV reuses its output buffers
(batches_ahead + 2 slots per pipeline), or copied into a graphed step's input buffers.
FFCV's epoch thread is made to set the rank's CUDA device (see _install_device_hook). Two FFCV 1.0.2 failure modes are handled here: an
exception in its epoch thread left the consumer waiting forever (now a RuntimeError), and an
epoch thread still running at interpreter exit could abort the process (threads are joined
when a stream is closed and at exit). FFCV's num_workers is capped at numba's thread count.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import threading
import types
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..checkpoint import fsync_path
from . import cifar
from .cifar import DataError, Split
from .resident import Batch
from .order import eval_shard, iters_per_epoch, rank_epoch_order

FORMAT_VERSION = 1
TRAIN_BETON = "train.beton"
TEST_BETON = "test.beton"
MANIFEST = "beton.json"
LOCK = ".beton.lock"
PARTIAL = ".partial"  # suffix of files being written; never read as complete
LAYOUT = "image: NDArrayField uint8 (3,32,32) as in the .bin; label: IntField"


# --------------------------------------------------------------------------- FFCV import


def ffcv_missing_message() -> str:
    return (
        "data.loader = 'ffcv' needs FFCV: apt-get install -y libopencv-dev libturbojpeg0-dev "
        "pkg-config && pip install 'resnetdist[ffcv]'"
    )


def require_ffcv():
    """Import FFCV (lazily) or raise RuntimeError with install instructions.

    `import ffcv` sets torch's intra-op thread count to 1 (its Compiler does so at import),
    so the caller's setting is restored."""
    threads = torch.get_num_threads()
    try:
        import ffcv  # noqa: F401
        import ffcv.fields  # noqa: F401
        import ffcv.loader  # noqa: F401
        import ffcv.writer  # noqa: F401
    except (ImportError, OSError) as e:  # OSError: a native library (OpenCV, turbojpeg) is missing
        raise RuntimeError(ffcv_missing_message()) from e
    finally:
        torch.set_num_threads(threads)
    return ffcv


@contextmanager
def _keep_torch_threads():
    """FFCV's Loader calls torch.set_num_threads(num_workers) in __init__ and __iter__."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


# --------------------------------------------------------------------------- conversion


def beton_paths(out_dir: Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    return out_dir / TRAIN_BETON, out_dir / TEST_BETON


@contextmanager
def _locked(out_dir: Path):
    with open(out_dir / LOCK, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released by the kernel if we are killed
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _read_manifest(out_dir: Path) -> dict | None:
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _source_md5s(bin_folder: Path) -> dict[str, str] | None:
    """md5 of every source .bin by name, or None when one is missing/unreadable."""
    try:
        return {p.name: cifar.md5sum(p) for p in cifar.source_files(bin_folder)}
    except OSError:
        return None


def _up_to_date(out_dir: Path, sources: dict[str, str] | None) -> bool:
    manifest = _read_manifest(out_dir)
    if manifest is None or sources is None:
        return False
    if manifest.get("format_version") != FORMAT_VERSION or manifest.get("sources") != sources:
        return False
    betons = manifest.get("betons")
    if not isinstance(betons, dict):
        return False
    for path in beton_paths(out_dir):
        entry = betons.get(path.name)
        try:
            if (
                not isinstance(entry, dict)
                or path.stat().st_size != entry.get("size")
                or cifar.md5sum(path) != entry.get("md5")
            ):
                return False
        except OSError:  # missing or unreadable
            return False
    return True


class _Records:
    """An indexable dataset of (image uint8 (3,32,32), label int) for the writer."""

    def __init__(self, split: Split):
        self.images, self.labels = split.images, split.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


def _write_beton(path: Path, split: Split, desc: str) -> None:
    """Write one .beton at `path` (a temporary name) with FFCV's DatasetWriter, in-process."""
    require_ffcv()
    from ffcv.fields import IntField, NDArrayField
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter, handle_sample

    from ..progress import progress_bar

    dataset = _Records(split)
    fields = {"image": NDArrayField(np.dtype("uint8"), (3, 32, 32)), "label": IntField()}
    # 2 MiB pages (the minimum): a 3 KB record never straddles one, and small sets stay small.
    writer = DatasetWriter(str(path), fields, page_size=MIN_PAGE_SIZE, num_workers=1)
    # What DatasetWriter._write_common does with worker processes, done here: header,
    # records page by page, then metadata + allocation table (finalize).
    writer.num_samples = len(dataset)
    writer.prepare()  # writes header + field descriptors; makes a shared-memory block
    shm = writer.metadata_sm
    size = writer.num_samples * writer.metadata_type.itemsize
    buf = np.zeros(size, dtype=np.uint8)
    shm.close()
    shm.unlink()  # not needed in one process; nothing left in /dev/shm if we die
    writer.metadata_sm = types.SimpleNamespace(buf=buf)
    metadata = np.frombuffer(buf, dtype=writer.metadata_type)
    names = writer.metadata_type.names
    allocator = MemoryAllocator(str(path), writer.data_region_start, writer.page_size)
    chunk = 1000
    with progress_bar(desc, total=len(dataset), unit="img") as bar:
        with allocator:
            for start in range(0, len(dataset), chunk):
                stop = min(start + chunk, len(dataset))
                for i in range(start, stop):
                    handle_sample(dataset[i], i, names, metadata, allocator, fields)
                bar.update(stop - start)
    writer.finalize(allocator.allocations)
    fsync_path(path)


# The writer's layout (measured, and exact for it): 2 MiB pages that each hold 682 whole 3,072-byte
# images, one page of header, and a 24-byte metadata entry per record. 50,000 + 10,000 records:
# 158.5 + 33.8 MB.
PAGE_BYTES = 2 * 1024 * 1024
IMAGES_PER_PAGE = PAGE_BYTES // (3 * 32 * 32)
METADATA_BYTES = 24


def beton_bytes(records: int) -> int:
    """The size of a .beton of `records` CIFAR images, as `_write_beton` writes it."""
    return (1 + -(-records // IMAGES_PER_PAGE)) * PAGE_BYTES + METADATA_BYTES * records


def describe_conversion(out_dir: Path, train: int, test: int) -> str:
    size = beton_bytes(train) + beton_bytes(test)
    return (f"writing {TRAIN_BETON} ({train:,} images) and {TEST_BETON} ({test:,} images), about "
            f"{size / 1e6:,.0f} MB, into {out_dir}")


def _remove_outputs(out_dir: Path) -> None:
    (out_dir / MANIFEST).unlink(missing_ok=True)  # first: the betons are no longer "complete"
    for p in beton_paths(out_dir):
        p.unlink(missing_ok=True)
    for p in out_dir.glob(f"*{PARTIAL}"):
        p.unlink(missing_ok=True)


def prepare_betons(bin_folder: Path, out_dir: Path, force: bool = False,
                   announce: Callable[[str], None] | None = None) -> tuple[Path, Path, bool]:
    """Write out_dir/train.beton and out_dir/test.beton from the .bin files in bin_folder.

    Returns (train, test, rebuilt). Does nothing (rebuilt=False) when beton.json matches the
    sources' md5s and both betons, unless `force`. Bad inputs raise cifar.DataError naming
    the file, and leave no beton behind. `announce` gets one line saying what will be written
    where, and how large, before the first beton byte is."""
    bin_folder, out_dir = Path(bin_folder), Path(out_dir)
    require_ffcv()
    out_dir.mkdir(parents=True, exist_ok=True)
    train_path, test_path = beton_paths(out_dir)
    if not os.access(out_dir, os.W_OK):  # e.g. betons made elsewhere, on a read-only mount
        if not force and _up_to_date(out_dir, _source_md5s(bin_folder)):
            return train_path, test_path, False
        raise DataError(f"{out_dir}: not writable, and its betons are missing or out of date")
    with _locked(out_dir):
        for p in out_dir.glob(f"*{PARTIAL}"):  # left by a killed conversion
            p.unlink(missing_ok=True)
        sources = _source_md5s(bin_folder)
        if not force and _up_to_date(out_dir, sources):
            return train_path, test_path, False
        _remove_outputs(out_dir)
        # Parse (and so check) every input before writing anything.
        train = cifar.read_files(bin_folder, cifar.TRAIN_FILES)
        test = cifar.read_files(bin_folder, cifar.TEST_FILES)
        if announce is not None:
            announce(describe_conversion(out_dir, len(train), len(test)))
        sources = _source_md5s(bin_folder)  # of the bytes just parsed (they were re-read)
        if sources is None:
            raise DataError(f"{bin_folder}: a source file vanished during conversion")
        done: dict[str, dict] = {}
        try:
            for path, split in ((train_path, train), (test_path, test)):
                tmp = path.with_name(path.name + PARTIAL)
                _write_beton(tmp, split, f"write {path.name}")
                done[path.name] = {
                    "size": tmp.stat().st_size, "md5": cifar.md5sum(tmp), "records": len(split)
                }
            os.replace(train_path.with_name(TRAIN_BETON + PARTIAL), train_path)
            os.replace(test_path.with_name(TEST_BETON + PARTIAL), test_path)
            fsync_path(out_dir)
            manifest = {
                "format_version": FORMAT_VERSION,
                "layout": LAYOUT,
                "sources": sources,
                "betons": done,
            }
            tmp = out_dir / (MANIFEST + PARTIAL)
            tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            fsync_path(tmp)
            os.replace(tmp, out_dir / MANIFEST)
            fsync_path(out_dir)
        except BaseException:
            _remove_outputs(out_dir)
            raise
    return train_path, test_path, True


# --------------------------------------------------------------------------- loading


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


def _record_indices(beton: Path, indices: np.ndarray | None) -> np.ndarray:
    """The beton records a loader draws from: `indices`, or all of them."""
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


def _make_loader(
    beton: Path, batch: int, order, drop_last: bool, device: torch.device, workers: int
):
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


def bind_thread(device: torch.device) -> None:
    """Make `device` the current CUDA device of the calling thread (a no-op off CUDA)."""
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
    """One pass of an FFCV Loader, yielding clones (or `out`, copied into); stops its thread
    if abandoned."""
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
            else:  # straight into a graphed step's input buffers: one copy, not two
                yield out[0].copy_(images, non_blocking=True), out[1].copy_(labels, non_blocking=True)
    finally:
        _stop(it)


class FfcvTrainLoader:
    """The "ffcv" training loader: the same samples, in the same order, as ResidentTrainLoader.

    Loader epoch k (FFCV's epoch counter) covers iterations start_iter + k*steps up to
    start_iter + (k+1)*steps - 1, so a run resumed mid-epoch starts at the right batch
    without decoding skipped ones, and every FFCV epoch has the same length. One stream
    at a time: a new batches() call re-targets the shared Loader."""

    def __init__(
        self, beton: Path, indices: np.ndarray | None, global_batch: int, seed: int, rank: int,
        world_size: int, device: torch.device, workers: int,
    ):
        require_ffcv()
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} ranks")
        self.global_batch, self.seed = global_batch, seed
        self.rank, self.world_size = rank, world_size
        self.b = global_batch // world_size
        self.beton = Path(beton)
        self.idx = _record_indices(self.beton, indices)
        self.steps = iters_per_epoch(len(self.idx), global_batch)
        self.start_iter = 0
        self.loader = _make_loader(
            self.beton, self.b, _order_class()(self._window), True, torch.device(device), workers
        )

    def _rank_order(self, epoch: int) -> np.ndarray:
        return rank_epoch_order(
            len(self.idx), self.global_batch, self.seed, epoch, self.rank, self.world_size
        )

    def _window(self, k: int) -> np.ndarray:
        epoch, pos = divmod(self.start_iter + k * self.steps, self.steps)
        order = self._rank_order(epoch)[pos * self.b :]
        if pos:
            order = np.concatenate([order, self._rank_order(epoch + 1)[: pos * self.b]])
        return self.idx[order]

    def batches(self, start_iter: int, out: Batch | None = None) -> Iterator[Batch]:
        self.start_iter = start_iter
        self.loader.next_epoch = 0
        while True:
            yield from _epoch(self.loader, out)


class FfcvEvalLoader:
    """This rank's contiguous shard of an evaluation set, in order; re-iterable."""

    def __init__(
        self, beton: Path, indices: np.ndarray | None, batch: int, rank: int, world_size: int,
        device: torch.device, workers: int,
    ):
        require_ffcv()
        beton = Path(beton)
        idx = _record_indices(beton, indices)
        self.order = idx[eval_shard(len(idx), rank, world_size)]
        self.loader = None
        if len(self.order):
            self.loader = _make_loader(
                beton, batch, _order_class()(lambda _: self.order), False, torch.device(device),
                workers,
            )

    def __iter__(self) -> Iterator[Batch]:
        if self.loader is not None:
            yield from _epoch(self.loader)
