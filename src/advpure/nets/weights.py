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
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advpure.core.errors import CheckpointError
from advpure.core.fsio import atomic_write, check_output_file
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


def check_weights_output(
    path: str | Path,
    *,
    force: bool = False,
    force_hint: str = "force=True",
    inputs: Iterable[str | Path] = (),
) -> Path:
    """Refuse, before any work, an output weights path that `save_weights` must not write:

    * empty, a folder, or not a regular file (a device node such as /dev/full, a pipe, a socket);
    * one of the `inputs` (the same file: same realpath, or same device and inode through a link);
    * an existing file, unless `force` (`force_hint` says how the user asks for it: "--force" for
      `advpure import-weights`, "train.force=true" for training).

    Returns `path` as a Path. Raises CheckpointError (one line)."""
    path = check_output_file(path, "weights output", error=CheckpointError)
    for src in inputs:
        if _same_file(path, Path(src)):
            raise CheckpointError(
                f"the weights output {path} is the input file {src}; write the weights to another path"
            )
    if os.path.lexists(path) and not force:
        raise CheckpointError(f"{path} exists; pass {force_hint} to replace it")
    return path


def _same_file(a: Path, b: Path) -> bool:
    try:
        if os.path.realpath(a) == os.path.realpath(b):
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def save_weights(
    path: str | Path,
    kind: str,
    arch: dict[str, Any],
    module: nn.Module,
    meta: dict | None = None,
    *,
    force: bool = False,
    force_hint: str = "force=True",
    inputs: Iterable[str | Path] = (),
) -> Path:
    """Write the weights file `path` (format in the module docstring) atomically: a temporary file in
    the same folder, fsync'ed, then renamed, so a crash never leaves a half-written file; created with
    mode 0666 & ~umask (readable by the other users of a shared cluster under the usual umask 022).

    An existing file is replaced only with `force`; the path may not be one of `inputs`, a folder or a
    non-regular file (`check_weights_output`, CheckpointError). A filesystem error (read-only, no
    space left, permission denied) is a one-line StorageError naming the path; the old file, if any,
    is left intact. Returns `path` as a Path."""
    path = check_weights_output(path, force=force, force_hint=force_hint, inputs=inputs)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    payload = {
        "format": FORMAT,
        "kind": kind,
        "arch": dict(arch),
        "state_dict": state,
        "meta": dict(meta or {}),
    }

    def exists(p: Path) -> CheckpointError:
        return CheckpointError(f"{p} exists; pass {force_hint} to replace it")

    with atomic_write(path, what="weights file", overwrite=force, on_exists=exists) as f:
        torch.save(payload, f)
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
