"""RobustBench classifiers (Croce et al., NeurIPS 2021 Datasets and Benchmarks) from their published
checkpoints, without the ``robustbench`` package.

The package cannot be used here: ``import robustbench`` imports torchvision and timm at package import
(``robustbench/data.py``), and torchvision has no working CPU wheel for this torch. What it does is
simple and is reproduced here from its source (robustbench 1.1.1, ``robustbench/utils.py`` ``load_model``,
``robustbench/model_zoo/cifar10.py``, ``robustbench/model_zoo/architectures/wide_resnet.py``):

  * the file of model `name` lives at ``<model_dir>/<dataset>/<threat_model>/<name>.pt``;
  * it holds a dict with ``state_dict`` or the state dict itself; keys may carry a ``module.``
    (DataParallel, e.g. Carmon2019Unlabeled) or ``model.`` prefix, which are removed;
  * ``Standard`` and ``Carmon2019Unlabeled`` are WRN-28-10s (the TRADES code's WideResNet) without input
    normalization: inputs are images in [0, 1]. Carmon2019Unlabeled's has an extra, unused
    ``sub_block1`` (its weights are in the file, so the net must have it to load strictly).
  * ImageNet ``Standard_R50`` (``robustbench/model_zoo/imagenet.py``) is
    ``normalize_model(torchvision.models.resnet50(pretrained=True), mu, sigma)`` with ImageNet's
    mu = (0.485, 0.456, 0.406), sigma = (0.229, 0.224, 0.225): torchvision's ResNet-50
    IMAGENET1K_V1 weights behind per-channel normalization, inputs in [0, 1] at 224 x 224 after
    ``Res256Crop224``. ``load_model`` returns it without any file of its own (torchvision downloads
    the weights); here its file is torchvision's weights file put at
    ``<model_dir>/imagenet/Linf/Standard_R50.pt``, or the state dict of RobustBench's wrapped model
    (``model.`` prefix, ``normalize.mean`` / ``normalize.std``, which must then be ImageNet's).
    Architecture: `advpure.importers.resnet.NormalizedResNet`, torchvision's key names.

`load_robustbench_classifier` loads such a file with ``torch.load(weights_only=True)`` and checks every
key and shape. It never downloads: a missing file is a one-line CheckpointError that names the path
and the Google Drive file id / URL to fetch it from.

To add a model: read its entry in ``robustbench/model_zoo/<dataset>.py`` (architecture constructor and
``gdrive_id``); if the architecture is a `RobustBenchWideResNet` (depth, widen, sub_block1, classes),
add a `RobustBenchModel` to `MODELS` under (dataset, threat_model, name); a torchvision ResNet-50 is a
`TorchvisionResNet50`; other architectures need their own module with RobustBench's key layout and an
entry with `build`, `url`, `fetch` and `complete`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from advpure.core.errors import CheckpointError, ConfigError
from advpure.core.safe_load import load_torch_file
from advpure.importers.common import check_state_dict, strip_prefixes
from advpure.importers.resnet import IMAGENET_MEAN, IMAGENET_STD, RESNET50_BLOCKS, NormalizedResNet

__all__ = [
    "RobustBenchWideResNet",
    "RobustBenchModel",
    "TorchvisionResNet50",
    "MODELS",
    "robustbench_path",
    "load_robustbench_classifier",
]


class _Block(nn.Module):
    """Pre-activation wide basic block, RobustBench's ``BasicBlock``: keys bn1, conv1, bn2, conv2 and, when
    the width changes, convShortcut (1x1, stride s). When the width changes the shortcut and conv1 both
    see relu(bn1(x)); otherwise the shortcut is x itself."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.equal = cin == cout
        self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        sc = x if self.convShortcut is None else self.convShortcut(o)
        o = self.conv2(F.relu(self.bn2(self.conv1(o))))
        return o + sc


class _Group(nn.Module):
    """n blocks as ``layer.<i>`` (RobustBench's ``NetworkBlock``)."""

    def __init__(self, n: int, cin: int, cout: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(
            *[_Block(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class RobustBenchWideResNet(nn.Module):
    """Wide ResNet (Zagoruyko & Komodakis 2016) in RobustBench's layout (from the TRADES code).

    Input: images in [0, 1] of shape (N, 3, 32, 32), no normalization. Output: (N, num_classes) logits.
    Keys: conv1, block1-3 (``blockK.layer.<i>.{bn1,conv1,bn2,conv2,convShortcut}``), the optional, unused
    sub_block1, bn1, fc. Widths 16, 16w, 32w, 64w; (depth - 4) / 6 blocks per group; strides 1, 2, 2; then
    ReLU(BN), 8x8 average pool, linear. WRN-28-10 with 10 classes: 36,479,194 parameters (sub_block1 adds
    1,640,672 for Carmon2019Unlabeled: 38,119,866). No dropout (the published models use none at test time).
    Raises ConfigError for a depth that is not 6n + 4.
    """

    def __init__(self, depth: int = 28, widen: int = 10, num_classes: int = 10, sub_block1: bool = False):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ConfigError(f"RobustBenchWideResNet: depth must be 6n+4 (>= 10), got {depth}")
        n = (depth - 4) // 6
        w = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, w[0], 3, stride=1, padding=1, bias=False)
        self.block1 = _Group(n, w[0], w[1], 1)
        self.sub_block1 = _Group(n, w[0], w[1], 1) if sub_block1 else None
        self.block2 = _Group(n, w[1], w[2], 2)
        self.block3 = _Group(n, w[2], w[3], 2)
        self.bn1 = nn.BatchNorm2d(w[3])
        self.fc = nn.Linear(w[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        out = F.avg_pool2d(out, 8)
        return self.fc(torch.flatten(out, 1))


@dataclass(frozen=True)
class RobustBenchModel:
    """A RobustBench model-zoo entry: a WRN's shape and where its file is published."""

    depth: int
    widen: int
    gdrive_id: str
    num_classes: int = 10
    sub_block1: bool = False

    def build(self) -> RobustBenchWideResNet:
        return RobustBenchWideResNet(self.depth, self.widen, self.num_classes, self.sub_block1)

    @property
    def url(self) -> str:
        return f"https://drive.google.com/uc?id={self.gdrive_id}"

    def fetch(self, path: Path) -> str:
        """How to get the file to `path` (one clause of a one-line error)."""
        return f"download {self.url} (Google Drive id {self.gdrive_id}, e.g. `gdown --id {self.gdrive_id} -O {path}`)"

    def complete(self, state: dict, source: str) -> dict:
        """The file's state dict (prefixes removed) as the net's `load_state_dict` takes it: as is."""
        return state


TORCHVISION_RESNET50_V1 = "https://download.pytorch.org/models/resnet50-0676ba61.pth"


@dataclass(frozen=True)
class TorchvisionResNet50:
    """A zoo entry that is torchvision's ResNet-50 behind ImageNet normalization (``Standard_R50``).

    The file: torchvision's weights (keys ``conv1.weight`` ...; the 2017 file has no
    ``num_batches_tracked``, filled with 0: unused in eval mode) or RobustBench's wrapped model's
    state dict (``normalize.mean`` / ``normalize.std`` too, checked against `mean` / `std`)."""

    url: str = TORCHVISION_RESNET50_V1
    num_classes: int = 1000
    blocks: tuple[int, ...] = RESNET50_BLOCKS
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def build(self) -> NormalizedResNet:
        return NormalizedResNet(self.blocks, self.num_classes, self.mean, self.std)

    def fetch(self, path: Path) -> str:
        return (
            f"download torchvision's ResNet-50 IMAGENET1K_V1 weights {self.url} (what RobustBench's "
            f"Standard_R50 loads through torchvision.models.resnet50(pretrained=True)) and save them as {path}"
        )

    def complete(self, state: dict, source: str) -> dict:
        """Fill what torchvision's file lacks: the normalization (this entry's mean / std; a file that
        has them must agree) and BatchNorm's `num_batches_tracked` counters (0)."""
        out = dict(state)
        for key, want in (("normalize.mean", self.mean), ("normalize.std", self.std)):
            ref = torch.tensor(want, dtype=torch.float32).view(1, -1, 1, 1)
            got = out.setdefault(key, ref)
            if not isinstance(got, torch.Tensor) or got.numel() != ref.numel():
                continue  # the key-by-key check names the wrong type or shape
            if not torch.allclose(got.detach().float().reshape(ref.shape), ref, rtol=0, atol=1e-6):
                raise CheckpointError(
                    f"{source}: {key} is {got.flatten().tolist()}, not ImageNet's {list(want)}: another model"
                )
        for key in [k for k in out if k.endswith(".running_var")]:
            out.setdefault(key.removesuffix("running_var") + "num_batches_tracked", torch.tensor(0))
        return out


_STANDARD = RobustBenchModel(depth=28, widen=10, gdrive_id="1t98aEuzeTL8P7Kpd5DIrCoCL21BNZUhC")
# (dataset, threat_model, name) -> entry; facts from robustbench 1.1.1 robustbench/model_zoo/cifar10.py
# and robustbench/model_zoo/imagenet.py
MODELS: dict[tuple[str, str, str], RobustBenchModel | TorchvisionResNet50] = {
    ("cifar10", "Linf", "Standard"): _STANDARD,
    ("cifar10", "L2", "Standard"): _STANDARD,
    ("cifar10", "corruptions", "Standard"): _STANDARD,
    ("cifar10", "Linf", "Carmon2019Unlabeled"): RobustBenchModel(
        depth=28, widen=10, gdrive_id="15tUx-gkZMYx7BfEOw1GY5OKC-jECIsPQ", sub_block1=True
    ),
    ("imagenet", "Linf", "Standard_R50"): TorchvisionResNet50(),
}


def robustbench_path(
    name: str, dataset: str = "cifar10", threat_model: str = "Linf", model_dir="models"
) -> Path:
    """``<model_dir>/<dataset>/<threat_model>/<name>.pt``, RobustBench's layout."""
    return Path(model_dir) / dataset / threat_model / f"{name}.pt"


def load_robustbench_classifier(
    name: str,
    dataset: str = "cifar10",
    threat_model: str = "Linf",
    model_dir: str | Path = "models",
) -> nn.Module:
    """The RobustBench classifier `name` from its file under `model_dir`, in eval mode (no network access).

    Returns a module mapping images in [0, 1] to logits: (N, 3, 32, 32) -> (N, 10) for CIFAR-10's WRNs,
    (N, 3, 224, 224) -> (N, 1000) for ImageNet's ResNet-50 (normalization inside).
    Raises ConfigError for a model not in `MODELS`; CheckpointError (one line) for a missing file (naming
    the path and the URL to fetch it from), an HTML page, a truncated or code-carrying file, or a state
    dict with a missing / unexpected key or a wrong shape.
    """
    key = (dataset, threat_model, name)
    if key not in MODELS:
        known = ", ".join(f"{n} ({d}, {t})" for d, t, n in MODELS)
        raise ConfigError(
            f"RobustBench model {name} ({dataset}, {threat_model}) is not supported; known: {known}"
        )
    entry = MODELS[key]
    path = robustbench_path(name, dataset, threat_model, model_dir)
    fetch = entry.fetch(path)
    obj = load_torch_file(
        path,
        what=f"RobustBench checkpoint {name}",
        hint=fetch,
        missing_message=(
            f"RobustBench model {name} ({dataset}, {threat_model}) not found at {path}: {fetch}; "
            f"nothing is downloaded automatically"
        ),
    )
    state = obj["state_dict"] if isinstance(obj, dict) and "state_dict" in obj else obj
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(
            f"RobustBench checkpoint {path} holds a {type(state).__name__}, not a state dict of named tensors"
        )
    source = f"RobustBench checkpoint {path}"
    state = entry.complete(strip_prefixes(state, ("module.", "model.")), source)
    with torch.device("meta"):  # no random init of 36M parameters that are overwritten next
        model = entry.build()
    expected = model.state_dict()
    check_state_dict(state, expected, source)
    model.load_state_dict({k: v.to(expected[k].dtype).contiguous() for k, v in state.items()}, assign=True)
    return model.eval()
