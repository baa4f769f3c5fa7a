"""Helpers shared by the diffusion-net importers (`advpure.importers.score_sde`, `.ddpm`, `.adm`).

Each importer reads a published file with `advpure.core.safe_load.load_torch_file` (``torch.load(weights_only=True)``:
tensors and plain containers only), compares every tensor with the state dict of the advpure net built on
the meta device (nothing allocated, so the 553 M-parameter ADM costs nothing to describe), and returns the
state dict in float32 plus a meta dict of provenance. Nothing is loaded with ``strict=False``: every key of
the net must be in the file with its shape, and the file may hold no other tensors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advpure.core.errors import CheckpointError
from advpure.core.safe_load import load_torch_file
from advpure.importers.common import check_state_dict, strip_prefixes

__all__ = [
    "meta_net",
    "file_digests",
    "unprefixed_state_dict",
    "checked_float32",
    "read_plain_state_dict",
]


def meta_net(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` on the meta device: its state dict gives every key, shape and dtype, its
    ``named_parameters()`` the parameter order, and nothing is allocated."""
    with torch.device("meta"):
        return build()


def file_digests(path: Path, chunk: int = 1 << 20) -> dict[str, Any]:
    """{"source_file", "source_bytes", "source_sha256", "source_md5"} of a file, read once."""
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha.update(block)
            md5.update(block)
    return {
        "source_file": path.name,
        "source_bytes": path.stat().st_size,
        "source_sha256": sha.hexdigest(),
        "source_md5": md5.hexdigest(),
    }


def unprefixed_state_dict(obj: Any, source: str, prefix: str = "module.") -> dict[str, Any]:
    """A dict of named entries with `prefix` (DataParallel's) removed when every key has it.
    CheckpointError for something that is not a non-empty dict of string keys, or for mixed prefixes."""
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(k, str) for k in obj):
        raise CheckpointError(f"{source} is a {type(obj).__name__}, not a state dict of named tensors")
    has = [k.startswith(prefix) for k in obj]
    if any(has) and not all(has):
        first = next(k for k in obj if not k.startswith(prefix))
        raise CheckpointError(f"{source} mixes {prefix!r}-prefixed keys with {first!r}")
    return strip_prefixes(obj, (prefix,)) if all(has) else dict(obj)


def checked_float32(
    found: Mapping[str, Any], expected: Mapping[str, torch.Tensor], source: str, parameters: int | None = None
) -> dict[str, torch.Tensor]:
    """`check_state_dict` (every key, shape, float-ness, finiteness; no extra keys), then the parameter
    count against `parameters` if given; returns the tensors as contiguous float32 in `expected`'s order."""
    check_state_dict(found, expected, source)
    count = sum(int(found[k].numel()) for k in expected)
    if parameters is not None and count != parameters:
        raise CheckpointError(f"{source}: {count:,} parameters, expected {parameters:,}")
    return {k: found[k].detach().to(torch.float32).contiguous() for k in expected}


def read_plain_state_dict(path: Path, what: str, hint: str) -> dict[str, Any]:
    """A file that is one state dict (optionally 'module.'-prefixed), read with weights_only=True."""
    obj = load_torch_file(path, what=what, hint=hint)
    if isinstance(obj, Mapping) and obj and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = ", ".join(sorted(map(str, obj))[:5])
        raise CheckpointError(
            f"{what} {path} is not a plain state dict of tensors (top-level keys: {keys}); wrong file?"
        )
    return unprefixed_state_dict(obj, f"{what} {path}")
