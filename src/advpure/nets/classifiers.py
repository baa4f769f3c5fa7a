"""Image classifiers. Every classifier built here takes images in [0, 1] and owns its normalization.

`build_classifier` returns ``nn.Sequential(normalize=Normalize(mean, std), net=<arch>)``, so a
state dict holds the keys ``normalize.mean``, ``normalize.std`` and ``net.*``.

Architectures:
  * ``small_cnn``  -- the two-conv MNIST net (Madry et al. style), 28x28 inputs;
  * ``wrn28_10``   -- pre-activation Wide ResNet 28-10 (Zagoruyko & Komodakis 2016), 32x32 inputs;
  * ``resnet18``   -- CIFAR ResNet-18 (3x3 stem, no max-pool), 32x32 inputs.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from advpure.core.errors import ConfigError

__all__ = [
    "make_classifier",
    "CLASSIFIER_ARCHS",
    "Normalize",
    "SmallCNN",
    "WideResNet",
    "ResNet18",
    "build_classifier",
]

# arch -> the one image size it takes
CLASSIFIER_ARCHS: dict[str, int] = {"small_cnn": 28, "wrn28_10": 32, "resnet18": 32}


class Normalize(nn.Module):
    """(x - mean) / std per channel; mean and std are buffers (saved with the weights)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean_l, std_l = [float(m) for m in mean], [float(s) for s in std]
        if len(mean_l) != len(std_l) or not mean_l:
            raise ConfigError(f"Normalize: mean and std must be equal-length lists, got {mean_l}, {std_l}")
        if any(s <= 0 for s in std_l):
            raise ConfigError(f"Normalize: std must be > 0, got {std_l}")
        mean_t = torch.tensor(mean_l, dtype=torch.float32)
        std_t = torch.tensor(std_l, dtype=torch.float32)
        self.register_buffer("mean", mean_t.reshape(-1, 1, 1))
        self.register_buffer("std", std_t.reshape(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


# --- SmallCNN -----------------------------------------------------------------------------------
class SmallCNN(nn.Module):
    """conv5x5(32)-ReLU-pool-conv5x5(64)-ReLU-pool-FC1024-ReLU-(dropout)-FC, for 28x28 inputs."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.fc1 = nn.Linear(7 * 7 * 64, 1024)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = self.dropout(F.relu(self.fc1(x)))
        return self.fc2(x)


# --- Wide ResNet (pre-activation) ----------------------------------------------------------------
class _WideBasic(nn.Module):
    """BN-ReLU-conv3x3-(dropout)-BN-ReLU-conv3x3, with a 1x1 conv shortcut when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.equal = in_planes == planes and stride == 1
        self.shortcut = (
            None if self.equal else nn.Conv2d(in_planes, planes, 1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        # when the shape changes, the shortcut sees the pre-activated input (as in the reference WRN)
        sc = x if self.shortcut is None else self.shortcut(o)
        o = self.conv1(o)
        o = self.conv2(self.dropout(F.relu(self.bn2(o))))
        return o + sc


class WideResNet(nn.Module):
    """Pre-activation Wide ResNet for 32x32 inputs. WRN-28-10: 36,479,194 parameters (10 classes)."""

    def __init__(
        self,
        depth: int = 28,
        widen: int = 10,
        dropout: float = 0.3,
        num_classes: int = 10,
        in_channels: int = 3,
    ):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ConfigError(f"WideResNet: depth must be 6n+4 (>= 10), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = self._group(widths[0], widths[1], n, 1, dropout)
        self.block2 = self._group(widths[1], widths[2], n, 2, dropout)
        self.block3 = self._group(widths[2], widths[3], n, 2, dropout)
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        _kaiming_init(self)

    @staticmethod
    def _group(in_planes: int, planes: int, n: int, stride: int, dropout: float) -> nn.Sequential:
        layers = [
            _WideBasic(in_planes if i == 0 else planes, planes, stride if i == 0 else 1, dropout)
            for i in range(n)
        ]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.block3(self.block2(self.block1(x)))
        x = F.relu(self.bn(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


# --- ResNet-18 (CIFAR variant) -------------------------------------------------------------------
class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(self.conv1(x)))
        o = self.bn2(self.conv2(o))
        return F.relu(o + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18: 3x3 stem (64), no max-pool, stages 64/128/256/512 x 2 blocks. 11,173,962 params.

    `dropout` (default 0, an addition) is applied before the final FC layer.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages, in_planes = [], 64
        for planes, stride in zip((64, 128, 256, 512), (1, 2, 2, 2)):
            stages.append(
                nn.Sequential(_BasicBlock(in_planes, planes, stride), _BasicBlock(planes, planes, 1))
            )
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(512, num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(self.dropout(x))


def _kaiming_init(model: nn.Module) -> None:
    """He-normal (fan_out, ReLU) convs, unit/zero BatchNorm, zero linear bias."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


# --- factory ------------------------------------------------------------------------------------
def build_classifier(
    arch: str,
    *,
    in_channels: int,
    image_size: int,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    dropout: float = 0.0,
) -> nn.Module:
    """``nn.Sequential(normalize=Normalize(mean, std), net=<arch>)`` taking images in [0, 1]."""
    if arch not in CLASSIFIER_ARCHS:
        raise ConfigError(f"classifier.arch={arch!r} is unknown; allowed: {', '.join(CLASSIFIER_ARCHS)}")
    size = CLASSIFIER_ARCHS[arch]
    if image_size != size:
        raise ConfigError(
            f"classifier.arch={arch} takes {size}x{size} images only, got image_size={image_size}"
        )
    if in_channels < 1 or num_classes < 2:
        raise ConfigError(
            f"classifier: need in_channels >= 1 and num_classes >= 2, got {in_channels}, {num_classes}"
        )
    if len(mean) != in_channels or len(std) != in_channels:
        raise ConfigError(
            f"classifier: mean/std must have in_channels={in_channels} entries, got {list(mean)}, {list(std)}"
        )
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"classifier.dropout must be in [0, 1), got {dropout}")
    if arch == "small_cnn":
        net: nn.Module = SmallCNN(in_channels=in_channels, num_classes=num_classes, dropout=dropout)
    elif arch == "wrn28_10":
        net = WideResNet(28, 10, dropout=dropout, num_classes=num_classes, in_channels=in_channels)
    else:
        net = ResNet18(num_classes=num_classes, in_channels=in_channels, dropout=dropout)
    return nn.Sequential(OrderedDict(normalize=Normalize(mean, std), net=net))


def make_classifier(arch: dict, spec=None, dropout: float = 0.0) -> nn.Module:
    """A classifier (images in [0, 1] -> logits) of architecture `arch`. `spec` (a DatasetSpec)
    gives the input normalization; without it a placeholder is used that loading weights replaces
    (the normalization's mean/std are buffers saved with the weights)."""
    c = arch["in_channels"]
    return build_classifier(
        arch["arch"],
        in_channels=c,
        image_size=arch["image_size"],
        num_classes=arch["num_classes"],
        mean=spec.mean if spec is not None else (0.0,) * c,
        std=spec.std if spec is not None else (1.0,) * c,
        dropout=dropout,
    )
