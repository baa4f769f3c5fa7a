"""Read an offline W&B run back (`wandb/offline-run-*/run-<id>.wandb`), so that the tests can check
that the logged metrics are the ones in results.json.

File layout: a 7-byte header (":W&B", 2 magic bytes, 1 version byte), then LevelDB-log records in
32 KiB blocks: each record has a 7-byte header (CRC32C, little-endian length, type FULL=1,
FIRST=2, MIDDLE=3, LAST=4); a block tail shorter than a header is zero padding. Each assembled
payload is a `wandb_internal_pb2.Record`. The checksum is zlib's CRC-32 of the type byte and the
chunk (checked: the W&B service may still be appending when `run.finish()` has returned, so a
torn tail is re-read, never parsed, and a file without the run's `exit` record yet is re-read too).
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


class TornFile(ValueError):
    """The file ends inside a record or a chunk fails its checksum (still being written)."""


def _payloads(data: bytes) -> list[bytes]:
    if data[:4] != b":W&B":
        raise ValueError("not a W&B run file (missing :W&B header)")
    out, pos, parts = [], HEADER, []
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:
            pos += left_in_block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:
            pos += HEADER
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        if len(chunk) < length or zlib.crc32(bytes([kind]) + chunk) != crc:
            raise TornFile(f"record at byte {pos} is torn or fails its checksum")
        pos += HEADER + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            parts = [chunk]
        elif kind == 3:
            parts.append(chunk)
        elif kind == 4:
            out.append(b"".join(parts + [chunk]))
            parts = []
    return out


def _read_payloads(path: Path, wait_s: float = 30.0) -> list[bytes]:
    """The file's payloads, re-reading for up to `wait_s` while its tail is still being written."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return _payloads(path.read_bytes())
        except TornFile:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _finished_records(path: Path, wait_s: float = 60.0) -> list:
    """The file's records once the run's `exit` record is in it: `run.finish()` can return before the
    W&B service has written everything (seen on a loaded 2-core box), so re-read until it is."""
    from wandb.proto import wandb_internal_pb2 as pb

    deadline = time.monotonic() + wait_s
    while True:
        records = []
        for payload in _read_payloads(path):
            rec = pb.Record()
            rec.ParseFromString(payload)
            records.append(rec)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def read_run(path: str | Path) -> dict:
    """{'history': [ {key: value} per logged step ], 'summary': {key: value}, 'config': {key: value}}."""
    out: dict = {"history": [], "summary": {}, "config": {}}
    for rec in _finished_records(Path(path)):
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
