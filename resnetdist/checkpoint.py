"""Checkpoint files: written atomically, checksummed, loaded safely. A checkpoint is a dict of
tensors and plain values, saved with torch.save and read back with torch.load(weights_only=True),
which refuses anything but tensors and primitive containers.

Checksums. torch.load does not check a zip archive's CRCs, so a flipped bit in a tensor loads
"fine" as another weight. Every file `atomic_save` writes gets a sidecar `NAME.sha256` in
`sha256sum` format (`sha256sum -c` checks it by hand), so the checkpoint stays a plain torch.save
file. The sidecar is in place before the checkpoint is renamed in: a checkpoint without one comes
from an older version (or by hand) and is loaded unverified; a mismatch is CorruptCheckpoint.

Failed writes. Any OSError while writing (full disk, file-size limit, quota) is one WriteError
naming the file and the OS error; the temporary file is removed: the folder holds what it held.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import signal
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from .errors import CheckpointError, WriteError

SIDECAR = ".sha256"


class CorruptCheckpoint(CheckpointError):
    """A checkpoint's bytes do not match its recorded sha256."""


def ignore_file_size_signal() -> None:
    """Exceeding RLIMIT_FSIZE (`ulimit -f`, set by some batch systems) sends SIGXFSZ, which kills
    without a message; ignored, the write fails with EFBIG: a WriteError naming the file."""
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR)


def fsync_path(path: Path) -> None:
    """fsync a file or a folder by name (a folder's fsync makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write to a temporary file in the same folder, fsync, rename, fsync the folder: a crash
    leaves the old state or the complete new file, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_path(path.parent)
    except OSError as e:
        raise WriteError(path, e) from e


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: Path, data: Any) -> None:
    """`data` as indented JSON, atomically: every JSON file the package writes whole."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def not_a_folder(folder: Path) -> Path | None:
    """The file standing where `folder` or one of its parents should be a folder (the
    first existing one of them, when it is not a folder), else None: an output folder a
    user names is checked with this before anything is written."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    return existing if existing is not None and not existing.is_dir() else None


def atomic_save(obj: Any, path: Path) -> str:
    """torch.save `obj` to `path` with its sha256 sidecar. Serialised in memory first, so a write
    error is a plain OSError of ours, not one deep in torch's zip writer, and the bytes hashed
    are the bytes written."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_save_bytes(buf.getbuffer(), path)


def atomic_save_bytes(data: bytes | memoryview, path: Path) -> str:
    """`data` written to `path` atomically with its sha256 sidecar (written first); the digest."""
    digest = hashlib.sha256(data).hexdigest()
    path, sidecar = Path(path), checksum_path(Path(path))
    atomic_write_text(sidecar, f"{digest}  {path.name}\n")
    try:
        atomic_write(path, lambda f: f.write(data))
    except WriteError:
        sidecar.unlink(missing_ok=True)  # it would describe bytes that were never written
        raise
    return digest


def read_verified(path: Path) -> bytes:
    """The file's bytes, checked against its sidecar when it has one (older runs' have none)."""
    data = Path(path).read_bytes()
    try:
        text = checksum_path(path).read_text()
    except FileNotFoundError:
        return data
    if hashlib.sha256(data).hexdigest() != (text.split()[0] if text.strip() else ""):
        raise CorruptCheckpoint(f"{path} does not match its checksum in {checksum_path(path).name} "
                                f"(the file is damaged)")
    return data


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint or model.pt, verifying its checksum if it has one (CorruptCheckpoint)."""
    return torch.load(io.BytesIO(read_verified(path)), map_location=map_location, weights_only=True)


ZIP_END = b"PK\x05\x06"  # a zip archive's end-of-central-directory record
ZIP_END_SPAN = 22 + 0xFFFF  # the record, and at most a 64 KiB comment after it


def load_model_file(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A model.pt or ckpt_*.pt given by a user (`eval`, `export`): every way the path can be
    wrong (missing, a folder, unreadable, truncated, damaged, a torch file of something else)
    is one CheckpointError naming it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; give a model.pt or ckpt_*.pt inside a run folder")
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(max(0, path.stat().st_size - ZIP_END_SPAN))
            tail = f.read()
    except OSError:  # let torch.load name the failure
        head, tail = b"PK", ZIP_END
    # torch.save writes a zip archive (b"PK"), older versions a pickle (protocol 2+: 0x80)
    if not head.startswith((b"PK", b"\x80")):
        raise CheckpointError(f"{path}: not a readable checkpoint (not a torch file: text, or another format); "
                              f"give a model.pt or ckpt_*.pt from a run folder")
    # a zip archive without its end record was cut short (torch.load's errors vary with where)
    if head == b"PK" and ZIP_END not in tail:
        raise CheckpointError(f"{path}: truncated (its zip archive lacks the end record every torch file has: "
                              f"an interrupted copy or write); copy it again, or use another checkpoint of the run")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles before refusing them
            warnings.simplefilter("ignore")
            state = load(path, map_location)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - torch's errors (zip, pickle, OS) do not name the file
        raise CheckpointError(f"{path}: not a readable checkpoint ({_load_failure(e)})") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict) or not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{path}: a torch file, but not a resnetdist checkpoint (it holds no 'model' and 'config')")
    return state


def load_weights(model: torch.nn.Module, state: dict[str, Any], path: Path) -> None:
    """state["model"] into `model`; weights of another shape or name are a CheckpointError
    (torch's own message lists every tensor, over many lines)."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:200]
        raise CheckpointError(f"{path}: its weights do not fit the net its config describes ({detail})") from None


def _load_failure(e: Exception) -> str:
    """torch.load's error in a few words (its own messages run to paragraphs of advice that
    does not apply: loading with weights_only=False is not an option here)."""
    if isinstance(e, pickle.UnpicklingError):
        return "not a torch file of tensors: text, or another program's pickle"
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if "PytorchStreamReader" in first or "zip archive" in first:
        return f"truncated or damaged torch archive: {first.split('. ')[0][:160]}"
    return f"{type(e).__name__}: {first[:160]}"
