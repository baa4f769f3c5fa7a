"""Exported weights: the files later stages load (classifier.pt, score.pt, ebm.pt).

A weights file is a plain dict of tensors and strings/numbers, saved with `torch.save` and read
with `torch.load(..., weights_only=True)`, so loading never unpickles code:

    {"format": "advpure-weights/1", "kind": "classifier" | "score",
     "arch": {...the config fields that define the architecture...},
     "state_dict": {...}, "meta": {...free-form numbers/strings: accuracy, steps...}}

Loading checks kind and architecture first and says which one the file holds.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advpure.core.errors import CheckpointError
from advpure.core.safe_load import load_torch_file

FORMAT = "advpure-weights/1"


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 (64 characters) of a file's bytes, read in `chunk`-byte blocks.
    Raises OSError when the file cannot be read."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_weights(
    path: str | Path, kind: str, arch: dict[str, Any], module: nn.Module, meta: dict | None = None
) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves a half-written weights file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    payload = {
        "format": FORMAT,
        "kind": kind,
        "arch": dict(arch),
        "state_dict": state,
        "meta": dict(meta or {}),
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_weights(path: str | Path) -> dict[str, Any]:
    """The payload of an advpure weights file (see the module docstring), read with weights_only=True.

    Raises CheckpointError (one line): missing file, HTML page, truncated / corrupt / non-PyTorch file,
    pickled code (see `advpure.core.safe_load`), or a file that is not in the advpure weights format."""
    path = Path(path)
    payload = load_torch_file(
        path,
        what="weights file",
        missing_message=(
            f"weights file not found: {path} (train it with `make train`, import published weights with "
            f"`advpure import-weights`, or set its path in the config)"
        ),
    )
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an advpure weights file (expected format {FORMAT})")
    return payload


def load_weights(path: str | Path, kind: str, arch: dict[str, Any], module: nn.Module) -> dict[str, Any]:
    """Load into `module` after checking that the file holds a `kind` net of architecture `arch`."""
    payload = read_weights(path)
    if payload["kind"] != kind:
        raise CheckpointError(f"{path} holds a {payload['kind']} network, expected a {kind} network")
    stored = payload["arch"]
    diff = {k: (stored.get(k), v) for k, v in arch.items() if stored.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: file has {a!r}, config asks {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(
            f"{path} holds another {kind} architecture ({detail}); retrain or point the config at the right file"
        )
    try:
        module.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(
            f"{path}: weights do not fit the {kind} network: {str(e).splitlines()[0][:200]}"
        ) from None
    return payload.get("meta", {})
