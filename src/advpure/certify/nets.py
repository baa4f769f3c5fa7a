"""Load the classifier and the score net from advpure weights files (the one place that builds nets here).

The architecture comes from the file itself (`arch` of `advpure.checkpoint`), so certification
needs no training config; the classifier's normalization constants are buffers of its state
dict and are restored with the weights. Files are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from advpure.checkpoint import load_weights, read_weights
from advpure.errors import CheckpointError
from advpure.nets import build_classifier, build_score_net


def _arch(path: str | Path, kind: str) -> dict[str, Any]:
    payload = read_weights(path)
    if payload.get("kind") != kind:
        raise CheckpointError(f"{path} holds a {payload.get('kind')} network, expected a {kind} network")
    return dict(payload["arch"])


def load_classifier(path: str | Path) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """(classifier in eval mode without parameter gradients, arch, meta) from a classifier weights file.

    The net takes images (B, C, H, W) in [0, 1] (normalization inside) and returns logits (B, K).
    Raises CheckpointError for a missing, unreadable or non-classifier file.
    """
    arch = _arch(path, "classifier")
    c = int(arch["in_channels"])
    net = build_classifier(
        arch["arch"],
        in_channels=c,
        image_size=int(arch["image_size"]),
        num_classes=int(arch["num_classes"]),
        mean=[0.0] * c,  # placeholders: the stored Normalize buffers overwrite them
        std=[1.0] * c,
    )
    meta = load_weights(path, "classifier", arch, net)
    return net.eval().requires_grad_(False), arch, meta


def load_score_net(path: str | Path) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """(score net f in eval mode without parameter gradients, arch, meta) from a score weights file.

    f maps images (B, C, H, W) to (B, C, H, W), f(x + s eps) ~ -eps. The meta of files written by
    `advpure train` holds the DSM noise range (`sigma_min`, `sigma_max`, `sigma_fixed`).
    Raises CheckpointError for a missing, unreadable or non-score file.
    """
    arch = _arch(path, "score")
    net = build_score_net(
        arch["arch"],
        in_channels=int(arch["in_channels"]),
        image_size=int(arch["image_size"]),
        ngf=int(arch["ngf"]),
    )
    meta = load_weights(path, "score", arch, net)
    return net.eval().requires_grad_(False), arch, meta
