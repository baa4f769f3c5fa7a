"""ResNet-50 (He et al., CVPR 2016) with torchvision's key names, and ImageNet input normalization
inside, as RobustBench's ImageNet models wrap it (``normalize_model``: ``normalize.mean`` /
``normalize.std``, then the net).

Written from the published definition and torchvision's layout ("ResNet v1.5": the stride of a
down-sampling bottleneck sits on its 3x3 conv), not from torchvision's code:

    normalize   x -> (x - mean) / std, per channel            x: images in [0, 1], (N, 3, H, W)
    conv1       7x7, 64, stride 2, padding 3, no bias; bn1; ReLU
    maxpool     3x3, stride 2, padding 1
    layer1..4   3, 4, 6, 3 bottlenecks of width 64, 128, 256, 512 (output 4x wider), strides 1, 2, 2, 2
                bottleneck: conv1 1x1 -> bn1 -> ReLU -> conv2 3x3 (stride) -> bn2 -> ReLU -> conv3 1x1
                -> bn3, plus the shortcut (x, or `downsample` = 1x1 conv with the stride -> BN, where
                the shape changes), then ReLU
    avgpool     global average; fc 2048 -> num_classes

Keys: ``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight``, ``layer1.0.downsample.0.weight``,
``layer1.0.downsample.1.*``, ..., ``fc.weight``, ``fc.bias``, plus ``normalize.mean`` and
``normalize.std`` (buffers (1, 3, 1, 1)). BatchNorm eps 1e-5. 25,557,032 parameters with 1000 classes
(torchvision's ResNet50_Weights.IMAGENET1K_V1 lists the same number). Any input size >= 32 works
(the pooling is global); ImageNet evaluation uses 224 x 224.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET50_BLOCKS = (3, 4, 6, 3)


class ImageNormalization(nn.Module):
    """(x - mean) / std per channel; `mean` and `std` are buffers of shape (1, C, 1, 1) (RobustBench's
    ``ImageNormalizer`` keys)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Bottleneck(nn.Module):
    """1x1 (width) -> 3x3 (width, stride) -> 1x1 (4 width) with BN, plus the shortcut, then ReLU."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class NormalizedResNet(nn.Module):
    """A bottleneck ResNet in torchvision's layout behind ImageNet normalization (module docstring).

    Input: images in [0, 1], (N, 3, H, W); output: (N, num_classes) logits. `blocks` per stage
    (3, 4, 6, 3: ResNet-50; smaller ones for tests).
    """

    def __init__(
        self,
        blocks: Sequence[int] = RESNET50_BLOCKS,
        num_classes: int = 1000,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        super().__init__()
        self.normalize = ImageNormalization(mean, std)
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (n, width) in enumerate(zip(blocks, (64, 128, 256, 512))):
            stride = 1 if i == 0 else 2
            stage = []
            for j in range(n):
                stage.append(Bottleneck(cin, width, stride if j == 0 else 1))
                cin = width * Bottleneck.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(self.normalize(x))))
        x = F.max_pool2d(x, 3, stride=2, padding=1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RESNET50_BLOCKS",
    "Bottleneck",
    "ImageNormalization",
    "NormalizedResNet",
]
