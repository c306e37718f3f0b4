"""CIFAR-10: download (md5-checked), safe extraction, parsing, splits, and whether a folder
holds the official files (`identity`). Two distributions are read, with the same checks (VERSIONS):
- the binary version (downloaded when nothing is found): a record is 3073 bytes, one label byte
  (0-9), then the 1024 R, 1024 G and 1024 B bytes of a 32x32 image, row-major;
- the Python version (torchvision's `cifar-10-batches-py/`): each batch a pickled dict, `data` a
  uint8 (10000, 3072) array in the same order, `labels` a list; unpickled by an unpickler that
  builds nothing but numpy arrays, so a hostile file cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import DataError

RECORD_BYTES = 1 + 3 * 32 * 32
RECORDS_PER_FILE = 10_000
VAL_SIZE = 5_000  # the paper's 45k/5k split
VAL_SPLIT_SEED = 20151210  # fixed, so every run holds out the same 5k images


# Beside the .bin files of a folder extracted from the md5-verified tarball (download or
# --data-dir): each file's size and sha256 as the tarball holds it. A folder without it is of
# unknown origin (a stand-in, test data, files copied by hand); with it, the files can be
# checked against the official ones at every run.
MANIFEST = "resnetdist-manifest.json"
IDENTITY_WORDS = {"cifar10": "verified CIFAR-10", "modified": f"NOT CIFAR-10 as downloaded: differs from {MANIFEST}",
                  "unknown": "not verified as CIFAR-10: no manifest"}


@dataclass
class Split:
    images: np.ndarray  # uint8, (N, 3, 32, 32)
    labels: np.ndarray  # int64, (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index) -> Split:  # a slice or an index array
        return Split(self.images[index], self.labels[index])


@dataclass
class Cifar10:
    train: Split
    test: Split
    val: Split | None = None
    # with a validation split: which records of the 50k training files each part holds
    train_indices: np.ndarray | None = None
    val_indices: np.ndarray | None = None
    folder: Path | None = None  # where the .bin files were read from
    file_records: dict[str, int] | None = None  # records in each .bin file read
    identity: str = "unknown"  # cifar10 | modified | unknown (identity())

    def describe(self) -> str:
        return f"{self.folder} ({IDENTITY_WORDS[self.identity]})"

    def eval_images(self) -> int:
        """Images in each evaluation (test, and the held-out validation split if any)."""
        return len(self.test) + (len(self.val) if self.val is not None else 0)

    def record_count_note(self) -> str | None:
        """One line naming each file whose record count is not CIFAR-10's (small stand-ins,
        or a file cut at a record boundary), and how many images the run then uses."""
        odd = [f"{name} holds {n:,} records" for name, n in (self.file_records or {}).items() if n != RECORDS_PER_FILE]
        if not odd:
            return None
        held_out = f" ({len(self.val):,} more held out for validation)" if self.val is not None else ""
        return (f"note: {', '.join(odd)} (CIFAR-10's files hold {RECORDS_PER_FILE:,} each): "
                f"training on {len(self.train):,} images{held_out}, testing on {len(self.test):,}")


@dataclass(frozen=True)
class Version:
    """One distribution of CIFAR-10: its folder, tarball (its md5 and where it is published), the
    suffix of its batch files, and the official md5 of each file where known."""

    name: str
    folder: str
    tarball: str
    md5: str
    url: str
    suffix: str
    file_md5: dict[str, str] | None = None

    @property
    def train_files(self) -> tuple[str, ...]:
        return tuple(f"data_batch_{i}{self.suffix}" for i in range(1, 6))

    @property
    def test_files(self) -> tuple[str, ...]:
        return (f"test_batch{self.suffix}",)

    @property
    def files(self) -> tuple[str, ...]:
        return self.train_files + self.test_files


BINARY = Version("binary", "cifar-10-batches-bin", "cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530",
                 "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz", ".bin")
# md5 of each batch of the official Python version, as torchvision checks them
# (torchvision/datasets/cifar.py, CIFAR10.train_list / test_list): a folder whose six files all
# match is CIFAR-10 whatever way it arrived (torchvision's download extracts no manifest)
PYTHON = Version("python", "cifar-10-batches-py", "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                 "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "", {
    "data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e"})
VERSIONS = (BINARY, PYTHON)  # looked for in this order; only the binary version is downloaded
FOLDER, TARBALL = BINARY.folder, BINARY.tarball  # what --data-dir's messages name


def holds(folder: Path, version: Version) -> bool:
    """The folder holds (some of) that version's batch files."""
    return any((folder / name).exists() for name in (version.test_files[0], version.train_files[0]))


def version_of(folder: Path) -> Version:
    """The version whose files the folder holds, the first of VERSIONS if several (and when none:
    its files are then named missing)."""
    return next((v for v in VERSIONS if holds(folder, v)), VERSIONS[0])


def stream_digest(stream: BinaryIO, algorithm: str, chunk: int = 1 << 20) -> str:
    """The hex digest of what `stream` holds, read in chunks (the data files are up to 160 MB)."""
    h = hashlib.new(algorithm)
    while block := stream.read(chunk):
        h.update(block)
    return h.hexdigest()


def md5sum(path: Path, algorithm: str = "md5") -> str:
    with open(path, "rb") as f:
        return stream_digest(f, algorithm)


def download(dest_dir: Path) -> Path:
    """Download the tarball into dest_dir (atomically) and check its md5."""
    from ..progress import progress_bar

    url, md5 = BINARY.url, BINARY.md5
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / TARBALL
    if dest.exists() and md5sum(dest) == md5:
        return dest
    tmp = dest.with_suffix(".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0)
            with progress_bar("download CIFAR-10", total=total or None, unit="B") as bar:
                while block := resp.read(1 << 20):
                    out.write(block)
                    bar.update(len(block))
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"could not download {url}: {e}. Download it by hand and pass --data-dir DIR "
                        f"(a folder holding {TARBALL} or {FOLDER}/)") from e
    got = md5sum(tmp)
    if got != md5:
        tmp.unlink()
        raise DataError(f"{url}: md5 {got} does not match the expected {md5}")
    os.replace(tmp, dest)
    return dest


def extract(tarball: Path, dest_dir: Path, version: Version = BINARY) -> Path:
    """Extract the version's folder, refusing members that would land outside dest_dir."""
    folder = version.folder
    root = dest_dir.resolve()
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                target = (root / m.name).resolve()
                if not target.is_relative_to(root) or not (m.isfile() or m.isdir()):
                    raise DataError(f"{tarball}: refusing unsafe archive member {m.name!r}")
            # Extract into a temporary folder, then rename: no half-extracted folder remains.
            with tempfile.TemporaryDirectory(dir=dest_dir) as tmp:
                tar.extractall(tmp, members=members)
                if not (Path(tmp) / folder).is_dir():
                    raise DataError(f"{tarball}: no {folder}/ folder inside")
                if not (dest_dir / folder).exists():
                    os.replace(Path(tmp) / folder, dest_dir / folder)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{tarball}: not a readable .tar.gz ({e})") from e
    return dest_dir / folder


def locate(data_dir: Path | None, download_ok: bool = True) -> Path:
    """Return the folder holding the batch files: data_dir/cifar-10-batches-bin (or -py),
    data_dir itself, or the extracted tarball (binary or Python version) found in (or the binary
    one downloaded to) data_dir / the cache. A folder extracted from an md5-verified tarball
    gets its manifest (MANIFEST)."""
    base = Path(data_dir) if data_dir else Path(os.environ.get("RESNETDIST_DATA", Path.home() / ".cache" / "resnetdist"))
    if data_dir is not None and base.exists() and not base.is_dir():
        raise DataError(f"--data-dir {base}: is a file, not a folder (give the folder holding {FOLDER}/ or {TARBALL})")
    if data_dir is not None and not base.is_dir():
        raise DataError(f"--data-dir {base}: no such folder")
    for version in VERSIONS:
        for cand in (base / version.folder, base):
            if holds(cand, version):
                tarball = base / version.tarball
                if cand == base / version.folder and not (cand / MANIFEST).exists() and tarball.exists() \
                        and md5sum(tarball) == version.md5:
                    write_manifest(cand, tarball, version)  # extracted by an older version, or by hand, from the verified tarball
                return cand
    for version in VERSIONS:
        tarball = base / version.tarball
        if tarball.exists():
            got = md5sum(tarball)
            if got != version.md5:
                fix = (f"delete it, and the next run downloads it again ({version.url})"  # the cache
                       if data_dir is None and version.name == "binary" else
                       f"delete it and download {version.url} again into {base} (or put the extracted {version.folder}/ there)")
                raise DataError(f"{tarball}: md5 {got} is not the official {version.md5} (a cut or damaged "
                                f"download?): {fix}")
            return write_manifest(extract(tarball, base, version), tarball, version)
    if data_dir is not None or not download_ok:
        raise DataError(f"{base}: holds neither {FOLDER}/ nor {TARBALL} (nor the Python version's {PYTHON.folder}/ "
                        f"or {PYTHON.tarball})")
    tarball = download(base)
    return write_manifest(extract(tarball, base), tarball)


def write_manifest(folder: Path, tarball: Path, version: Version = BINARY) -> Path:
    """Each .bin file's size and sha256 as `tarball` (already md5-verified) holds it, written
    beside the files; returns the folder. Taken from the archive, not from the folder, so a
    folder changed after extraction is not blessed."""
    files = {}
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for member in tar:
                name = Path(member.name).name
                if member.isfile() and name in version.files:
                    with tar.extractfile(member) as f:
                        files[name] = {"bytes": member.size, "sha256": stream_digest(f, "sha256")}
        text = json.dumps({"source": f"{version.tarball} (md5 {md5sum(tarball)})", "files": files}, indent=2) + "\n"
        tmp = folder / f".{MANIFEST}.tmp"
        tmp.write_text(text)
        os.replace(tmp, folder / MANIFEST)
    except (tarfile.TarError, OSError):  # a read-only folder: the data stays usable, its identity "unknown"
        pass
    return folder


def identity(folder: Path) -> str:
    """cifar10: the folder's manifest names every file, and each matches in size and sha256 (or,
    without a manifest, every file matches the official md5 its version publishes: the Python
    version's, as torchvision checks them); modified: a manifest, but some file differs or is
    missing; unknown: no (readable) manifest, and no official digests matched."""
    version = version_of(folder)
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        known = version.file_md5
        official = bool(known) and all((folder / n).is_file() and md5sum(folder / n) == known[n] for n in version.files)
        return "cifar10" if official else "unknown"
    for name in version.files:
        path, want = folder / name, files.get(name) if isinstance(files, dict) else None
        if not want or not path.is_file() or path.stat().st_size != want.get("bytes") \
                or md5sum(path, "sha256") != want.get("sha256"):
            return "modified"
    return "cifar10"


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Builds numpy arrays and plain containers, nothing else: a batch file that names any other
    callable is refused instead of run."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}  # how a protocol-2 pickle written by Python 3 spells a bytes object

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to build {module}.{name}")
        return super().find_class(module, name)


def read_batch_file(path: Path) -> Split:
    """One batch file, checked: binary (.bin) records, or the Python version's pickled dict with
    `data` (uint8 (N, 3072), R, G, B planes row-major, as the binary records) and `labels`."""
    if not path.exists():
        raise DataError(f"{path}: missing")
    if path.name.endswith(".bin"):
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size == 0 or raw.size % RECORD_BYTES:
            raise DataError(f"{path}: size {raw.size} bytes is not a positive multiple of {RECORD_BYTES} "
                            f"(truncated or corrupt)")
        records = raw.reshape(-1, RECORD_BYTES)
        data, labels = records[:, 1:], records[:, 0]
    else:
        try:
            # latin1: the official batches are Python 2 pickles, whose numpy arrays are byte strings
            batch = NumpyOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
        except Exception as e:  # noqa: BLE001 - pickle raises many kinds on a damaged file; the file is named
            raise DataError(f"{path}: not a CIFAR-10 Python batch (unpickling failed: "
                            f"{str(e)[:120] or type(e).__name__})") from None
        data = batch.get("data") if isinstance(batch, dict) else None
        labels = np.asarray(batch.get("labels", []) if isinstance(batch, dict) else [])
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 \
                or len(data) == 0 or labels.shape != (len(data),) or labels.dtype.kind not in "iu":
            raise DataError(f"{path}: not a CIFAR-10 Python batch (want 'data': uint8 (N, 3072) and 'labels': N ints)")
    if labels.min() < 0 or labels.max() > 9:
        bad = int(np.argmax((labels < 0) | (labels > 9)))
        raise DataError(f"{path}: record {bad} has label {labels[bad]} (must be 0-9)")
    return Split(np.ascontiguousarray(data.reshape(-1, 3, 32, 32)), labels.astype(np.int64))


def write_batch_file(path: Path, split: Split) -> None:
    """Write records in the official layout (used by tests and tools that make small sets)."""
    records = np.concatenate([split.labels.astype(np.uint8)[:, None], split.images.reshape(len(split), -1)], axis=1)
    records.tofile(path)


def synthetic_split(n: int, seed: int) -> Split:
    """Noise plus a class-specific bright band: a small net gets well below chance quickly, and
    speed does not depend on content."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n)
    images = rng.integers(0, 90, size=(n, 3, 32, 32), dtype=np.uint8)
    for i, k in enumerate(labels):
        images[i, k % 3, 3 * k : 3 * k + 3, :] = 230
    return Split(images, labels.astype(np.int64))


def write_synthetic(root: Path, per_train_file: int, test_size: int, seed: int = 0) -> Path:
    """A small stand-in in the official layout under root/cifar-10-batches-bin (tests, bench)."""
    folder = root / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    train = synthetic_split(5 * per_train_file, seed)
    for i, name in enumerate(BINARY.train_files):
        write_batch_file(folder / name, train[i * per_train_file : (i + 1) * per_train_file])
    write_batch_file(folder / BINARY.test_files[0], synthetic_split(test_size, seed + 100))
    (folder / "batches.meta.txt").write_text("\n".join(f"class{i}" for i in range(10)) + "\n")
    return root


def read_files(folder: Path, names: tuple[str, ...], counts: dict[str, int] | None = None) -> Split:
    """The files' records, in order; `counts` (if given) receives each file's record count."""
    parts = [read_batch_file(folder / name) for name in names]
    if counts is not None:
        counts.update({name: len(part) for name, part in zip(names, parts)})
    return Split(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))


def validation_indices(num_train: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) record indices of the 45k/5k split; fixed, so every run holds out the same."""
    if not 0 < VAL_SIZE < num_train:
        raise DataError(f"validation size {VAL_SIZE} does not fit a training set of {num_train}")
    perm = np.random.default_rng(VAL_SPLIT_SEED).permutation(num_train)
    return np.sort(perm[VAL_SIZE:]), np.sort(perm[:VAL_SIZE])


def load_cifar10(data_dir: Path | None, val_split: bool = False) -> Cifar10:
    folder = locate(data_dir)
    version = version_of(folder)
    counts: dict[str, int] = {}
    train = read_files(folder, version.train_files, counts)
    test = read_files(folder, version.test_files, counts)
    if not val_split:
        return Cifar10(train, test, folder=folder, file_records=counts, identity=identity(folder))
    train_idx, val_idx = validation_indices(len(train))
    return Cifar10(train[train_idx], test, train[val_idx], train_idx, val_idx, folder, counts, identity(folder))


def load_test_only(data_dir: Path | None) -> Cifar10:
    """The test set alone (`eval` of a checkpoint that holds its mean image): the training
    files need not be there."""
    folder, counts = locate(data_dir), {}
    test = read_files(folder, version_of(folder).test_files, counts)
    empty = Split(np.zeros((0, 3, 32, 32), np.uint8), np.zeros(0, np.int64))
    return Cifar10(empty, test, folder=folder, file_records=counts, identity=identity(folder))
