"""Neural networks: classifiers (images in [0, 1], normalization inside), the NCSNv2 score net, and
the factories that build and load them (`load_nets`, `load_net`, `load_defense`)."""

from __future__ import annotations

from torch import nn

from advpure.nets.classifiers import (
    CLASSIFIER_ARCHS,
    Normalize,
    ResNet18,
    SmallCNN,
    WideResNet,
    build_classifier,
)
from advpure.nets.factory import (
    classifier_arch,
    frozen,
    load_defense,
    load_net,
    load_net_with_meta,
    load_nets,
    make_classifier,
    make_score_net,
    score_arch,
)
from advpure.nets.ncsnv2 import (
    SCORE_IMAGE_SIZES,
    InstanceNormPlusPlus2d,
    NCSNv2,
    build_score_net,
)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (buffers excluded); works on the meta device."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "CLASSIFIER_ARCHS",
    "SCORE_IMAGE_SIZES",
    "InstanceNormPlusPlus2d",
    "NCSNv2",
    "Normalize",
    "ResNet18",
    "SmallCNN",
    "WideResNet",
    "build_classifier",
    "build_score_net",
    "classifier_arch",
    "count_parameters",
    "frozen",
    "load_defense",
    "load_net",
    "load_net_with_meta",
    "load_nets",
    "make_classifier",
    "make_score_net",
    "score_arch",
]
