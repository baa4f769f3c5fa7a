"""Read an offline W&B run back (`wandb/offline-run-*/run-<id>.wandb`), so that the tests can check
that the logged metrics are the ones in results.json.

File layout: a 7-byte header (":W&B", 2 magic bytes, 1 version byte), then LevelDB-log records in
32 KiB blocks: each record has a 7-byte header (CRC32C, little-endian length, type FULL=1,
FIRST=2, MIDDLE=3, LAST=4); a block tail shorter than a header is zero padding. Each assembled
payload is a `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def _payloads(data: bytes):
    if data[:4] != b":W&B":
        raise ValueError("not a W&B run file (missing :W&B header)")
    pos, parts = HEADER, []
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        pos += HEADER
        chunk = data[pos : pos + length]
        pos += length
        if kind == 0 and length == 0:
            continue
        if kind == 1:
            yield chunk
        elif kind == 2:
            parts = [chunk]
        elif kind == 3:
            parts.append(chunk)
        elif kind == 4:
            parts.append(chunk)
            yield b"".join(parts)
            parts = []


def read_run(path: str | Path) -> dict:
    """{'history': [ {key: value} per logged step ], 'summary': {key: value}, 'config': {key: value}}."""
    from wandb.proto import wandb_internal_pb2 as pb

    out: dict = {"history": [], "summary": {}, "config": {}}
    for payload in _payloads(Path(path).read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(payload)
        which = rec.WhichOneof("record_type")
        if which == "history":
            row = {}
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            out["history"].append(row)
        elif which == "summary":
            for item in rec.summary.update:
                key = item.key or "/".join(item.nested_key)
                out["summary"][key] = json.loads(item.value_json)
        elif which in ("config", "run"):
            updates = rec.config.update if which == "config" else rec.run.config.update
            for item in updates:
                key = item.key or "/".join(item.nested_key)
                out["config"][key] = json.loads(item.value_json)
    return out


def find_run_files(wandb_dir: str | Path) -> list[Path]:
    """Every offline run file below `wandb_dir`, sorted."""
    return sorted(Path(wandb_dir).rglob("offline-run-*/run-*.wandb"))
