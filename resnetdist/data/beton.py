"""CIFAR-10 as FFCV .beton files: their layout and conversion (idempotent, atomic).

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

The loaders that read these files are in data/ffcv_loader.py.
"""

from __future__ import annotations

import fcntl
import json
import os
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..checkpoint import fsync_path
from . import cifar
from .cifar import DataError, Split

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
        return {name: cifar.md5sum(bin_folder / name) for name in cifar.version_of(bin_folder).files}
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
        version = cifar.version_of(bin_folder)  # binary or Python version
        train = cifar.read_files(bin_folder, version.train_files)
        test = cifar.read_files(bin_folder, version.test_files)
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
