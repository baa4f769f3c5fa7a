"""Helpers shared by the importers: prefixes, key/shape checks (file hashes: `advpure.nets.weights.file_sha256`)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from advpure.core.errors import CheckpointError
from advpure.nets.weights import file_sha256

__all__ = ["file_sha256", "strip_prefixes", "check_state_dict"]


def strip_prefixes(state: Mapping[str, object], prefixes: tuple[str, ...]) -> dict[str, object]:
    """Keys without any leading `prefixes` (each removed wherever it starts a key, repeatedly:
    "module.model.conv1.weight" -> "conv1.weight"). Raises CheckpointError if two keys collide."""
    out: dict[str, object] = {}
    for key, value in state.items():
        k = key
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if k.startswith(p):
                    k, changed = k[len(p) :], True
        if k in out:
            raise CheckpointError(f"keys {key!r} and another both map to {k!r} once {prefixes} are removed")
        out[k] = value
    return out


def check_state_dict(found: Mapping[str, object], expected: Mapping[str, torch.Tensor], source: str) -> None:
    """Every key of `expected` is in `found` as a floating-point (or, for integer buffers, integer) tensor
    of the same shape, with finite values, and `found` has no other keys. Raises CheckpointError naming
    the first problem (in `expected`'s order, then unexpected keys sorted)."""
    for key, ref in expected.items():
        if key not in found:
            raise CheckpointError(f"{source}: missing key {key!r} (expected shape {tuple(ref.shape)})")
        val = found[key]
        if not isinstance(val, torch.Tensor):
            raise CheckpointError(f"{source}: {key!r} is a {type(val).__name__}, not a tensor")
        if tuple(val.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{source}: {key!r} has shape {tuple(val.shape)}, expected {tuple(ref.shape)}"
            )
        if ref.is_floating_point() != val.is_floating_point():
            raise CheckpointError(f"{source}: {key!r} has dtype {val.dtype}, expected {ref.dtype}")
        if val.is_floating_point() and not bool(torch.isfinite(val).all()):
            bad = int((~torch.isfinite(val)).sum())
            raise CheckpointError(f"{source}: {key!r} holds {bad} non-finite values (NaN or inf)")
    extra = sorted(set(found) - set(expected))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(f"{source}: unexpected key {extra[0]!r}{more}")
