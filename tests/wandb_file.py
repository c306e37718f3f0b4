"""What a W&B offline run wrote, read back from its own transaction log (run-*.wandb).

wandb >= 0.2x writes the .wandb file from its Go core and no longer ships the Python reader
(wandb.sdk.internal.datastore), so `wandb_records` reads the file's documented record framing
(LevelDB log format: 32 KiB blocks, 7-byte headers with a CRC-32 of type + payload,
FULL/FIRST/MIDDLE/LAST fragments) and decodes every record with wandb's own protobuf,
wandb.proto.wandb_internal_pb2.Record (imported on use: test modules skip without wandb).
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> list:
    """Every record of a .wandb transaction log, CRC-checked, as wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B" and magic == 0xBEE1 and version == 0, (ident, magic, version)
    out, pos, parts = [], HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer too small for a header: zero padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left
            continue
        payload = data[pos + HEADER : pos + HEADER + length]
        assert len(payload) == length, f"{path}: truncated record at byte {pos}"
        assert zlib.crc32(bytes([kind]) + payload) & 0xFFFFFFFF == crc, f"{path}: bad CRC at byte {pos}"
        pos += HEADER + length
        if kind == FULL:
            chunk = payload
        elif kind == FIRST:
            parts = payload
            continue
        elif kind == MIDDLE:
            parts += payload
            continue
        else:
            assert kind == LAST, f"{path}: unknown fragment type {kind}"
            chunk = parts + payload
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        out.append(record)
    return out


def _items(items) -> dict:
    """history items / summary updates -> {key: value}."""
    out = {}
    for item in items:
        key = item.key or "/".join(item.nested_key)
        out[key] = json.loads(item.value_json)
    return out


class OfflineRun:
    """What one offline-run-* folder holds: run record, history rows, final summary."""

    def __init__(self, folder: Path, need_run: bool = True):
        (self.file,) = folder.glob("run-*.wandb")
        self.records = wandb_records(self.file)
        kinds = [r.WhichOneof("record_type") for r in self.records]
        self.kinds = kinds
        self.runs = [r.run for r in self.records if r.WhichOneof("record_type") == "run"]
        if need_run or self.runs:
            (self.run,) = self.runs
        self.config = {u.key: json.loads(u.value_json) for r in self.runs for u in r.config.update}
        self.history = [_items(r.history.item) for r in self.records if r.WhichOneof("record_type") == "history"]
        self.summary: dict = {}
        for r in self.records:
            if r.WhichOneof("record_type") == "summary":
                self.summary.update(_items(r.summary.update))
        self.metrics = [r.metric for r in self.records if r.WhichOneof("record_type") == "metric"]


def offline_runs(run_dir: Path) -> list[OfflineRun]:
    return [OfflineRun(p) for p in sorted((run_dir / "wandb").glob("offline-run-*"))]
