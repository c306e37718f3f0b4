"""CIFAR-10 as FFCV .beton files (read by data/ffcv_loader.py): layout and conversion.

Layout. Each record holds `image`, an NDArrayField of uint8 (3, 32, 32): the 3072 bytes of a
.bin record as they are (channel-major), so decoding is one memcpy per image into a contiguous
(b, 3, 32, 32) buffer, bit-exact (RGBImageField would store HWC and need a permute, yielding a
channels_last view rather than the resident loader's contiguous tensor); and `label`, an IntField.

Conversion (idempotent, atomic). `prepare_betons` writes train.beton (data_batch_1..5, in
order) and test.beton, then beton.json (the md5 of every source, md5 and size of both betons,
FORMAT_VERSION): the commit marker, with which a later call does nothing. Everything is written
under *.partial names and renamed once complete and fsynced; old outputs are removed before a
rebuild, so an interrupted one (exception, Ctrl-C, SIGKILL) leaves no beton behind. A flock on
.beton.lock serialises concurrent callers (every torchrun rank); stale *.partial files are
removed under it. Records are written in-process: FFCV's `from_indexed_dataset` forks writers
and busy-waits for them (a writer that dies hangs the parent forever).
"""

from __future__ import annotations

import fcntl
import json
import os
import types
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..checkpoint import atomic_write_text, fsync_path
from . import cifar
from .cifar import DataError, Split

FORMAT_VERSION = 1
TRAIN_BETON = "train.beton"
TEST_BETON = "test.beton"
MANIFEST = "beton.json"
LOCK = ".beton.lock"
PARTIAL = ".partial"  # suffix of files being written; never read as complete
LAYOUT = "image: NDArrayField uint8 (3,32,32) as in the .bin; label: IntField"


def require_ffcv():
    """Import FFCV or raise RuntimeError with install instructions. `import ffcv` sets torch's
    intra-op thread count to 1 (its Compiler does so at import): the caller's is restored."""
    threads = torch.get_num_threads()
    try:
        import ffcv  # noqa: F401
        import ffcv.fields  # noqa: F401
        import ffcv.loader  # noqa: F401
        import ffcv.writer  # noqa: F401
    except (ImportError, OSError) as e:  # OSError: a native library (OpenCV, turbojpeg) is missing
        raise RuntimeError("data.loader = 'ffcv' needs FFCV: apt-get install -y libopencv-dev libturbojpeg0-dev "
                           "pkg-config && pip install 'resnetdist[ffcv]'") from e
    finally:
        torch.set_num_threads(threads)
    return ffcv


def beton_paths(out_dir: Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    return out_dir / TRAIN_BETON, out_dir / TEST_BETON


def _source_md5s(bin_folder: Path) -> dict[str, str] | None:
    """md5 of every source .bin by name, or None when one is missing/unreadable."""
    try:
        return {name: cifar.md5sum(bin_folder / name) for name in cifar.version_of(bin_folder).files}
    except OSError:
        return None


def _up_to_date(out_dir: Path, sources: dict[str, str] | None) -> bool:
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or sources is None or manifest.get("format_version") != FORMAT_VERSION \
            or manifest.get("sources") != sources or not isinstance(betons := manifest.get("betons"), dict):
        return False
    for path in beton_paths(out_dir):
        entry = betons.get(path.name)
        try:
            if not isinstance(entry, dict) or path.stat().st_size != entry.get("size") \
                    or cifar.md5sum(path) != entry.get("md5"):
                return False
        except OSError:  # missing or unreadable
            return False
    return True


def _write_beton(path: Path, split: Split, desc: str) -> None:
    """Write one .beton at `path` (a temporary name) with FFCV's DatasetWriter, in-process."""
    require_ffcv()
    from ffcv.fields import IntField, NDArrayField
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter, handle_sample

    from ..progress import progress_bar

    fields = {"image": NDArrayField(np.dtype("uint8"), (3, 32, 32)), "label": IntField()}
    # 2 MiB pages (the minimum): a 3 KB record never straddles one, and small sets stay small.
    writer = DatasetWriter(str(path), fields, page_size=MIN_PAGE_SIZE, num_workers=1)
    # What DatasetWriter._write_common does with worker processes, done here: header,
    # records page by page, then metadata + allocation table (finalize).
    writer.num_samples = len(split)
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
    with progress_bar(desc, total=len(split), unit="img") as bar, allocator:
        for i in range(len(split)):
            handle_sample((split.images[i], int(split.labels[i])), i, names, metadata, allocator, fields)
            bar.update(1)
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


def _remove_outputs(out_dir: Path) -> None:
    (out_dir / MANIFEST).unlink(missing_ok=True)  # first: the betons are no longer "complete"
    for p in beton_paths(out_dir):
        p.unlink(missing_ok=True)
    for p in out_dir.glob(f"*{PARTIAL}"):
        p.unlink(missing_ok=True)


def prepare_betons(bin_folder: Path, out_dir: Path, force: bool = False,
                   announce: Callable[[str], None] | None = None) -> tuple[Path, Path, bool]:
    """out_dir/train.beton and test.beton from the batch files in bin_folder: (train, test, rebuilt).
    Nothing is done (rebuilt=False) when beton.json matches the sources and both betons, unless
    `force`. A bad input is a DataError naming the file, and leaves no beton behind. `announce`
    gets one line saying what will be written where, and how large, before the first byte is."""
    bin_folder, out_dir = Path(bin_folder), Path(out_dir)
    require_ffcv()
    out_dir.mkdir(parents=True, exist_ok=True)
    train_path, test_path = beton_paths(out_dir)
    if not os.access(out_dir, os.W_OK):  # e.g. betons made elsewhere, on a read-only mount
        if not force and _up_to_date(out_dir, _source_md5s(bin_folder)):
            return train_path, test_path, False
        raise DataError(f"{out_dir}: not writable, and its betons are missing or out of date")
    with open(out_dir / LOCK, "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # dropped when closed, also if we are killed
        for p in out_dir.glob(f"*{PARTIAL}"):  # left by a killed conversion
            p.unlink(missing_ok=True)
        sources = _source_md5s(bin_folder)
        if not force and _up_to_date(out_dir, sources):
            return train_path, test_path, False
        _remove_outputs(out_dir)
        # Parse (and so check) every input before writing anything.
        version = cifar.version_of(bin_folder)  # binary or Python version
        train = cifar.read_files(bin_folder, version.train_files)
        test = cifar.read_files(bin_folder, version.test_files)
        if announce is not None:
            size = beton_bytes(len(train)) + beton_bytes(len(test))
            announce(f"writing {TRAIN_BETON} ({len(train):,} images) and {TEST_BETON} ({len(test):,} images), "
                     f"about {size / 1e6:,.0f} MB, into {out_dir}")
        sources = _source_md5s(bin_folder)  # of the bytes just parsed (they were re-read)
        if sources is None:
            raise DataError(f"{bin_folder}: a source file vanished during conversion")
        done: dict[str, dict] = {}
        try:
            for path, split in ((train_path, train), (test_path, test)):
                tmp = path.with_name(path.name + PARTIAL)
                _write_beton(tmp, split, f"write {path.name}")
                done[path.name] = {"size": tmp.stat().st_size, "md5": cifar.md5sum(tmp), "records": len(split)}
            os.replace(train_path.with_name(TRAIN_BETON + PARTIAL), train_path)
            os.replace(test_path.with_name(TEST_BETON + PARTIAL), test_path)
            fsync_path(out_dir)
            manifest = {"format_version": FORMAT_VERSION, "layout": LAYOUT, "sources": sources, "betons": done}
            atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        except BaseException:
            _remove_outputs(out_dir)
            raise
    return train_path, test_path, True
