"""Neural networks (plain torch): classifiers (images in [0, 1], normalization inside), the NCSNv2
score net, the EBM, diffusion nets, noise schedules, weights files, the network-kind registry
(`advpure.nets.registry`) and the precision context of a net call. Loading a configured net:
`advpure.jobs.artifacts`; any weights file: `advpure.api.load_net`."""

from __future__ import annotations

from torch import nn

from advpure.nets.classifiers import (
    CLASSIFIER_ARCHS,
    Normalize,
    ResNet18,
    SmallCNN,
    WideResNet,
    build_classifier,
    make_classifier,
)
from advpure.nets.ncsnv2 import (
    SCORE_IMAGE_SIZES,
    InstanceNormPlusPlus2d,
    NCSNv2,
    build_score_net,
    make_score_net,
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
    "count_parameters",
    "make_classifier",
    "make_score_net",
]
