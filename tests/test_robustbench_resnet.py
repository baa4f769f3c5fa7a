"""RobustBench's ImageNet `Standard_R50` read offline: advpure's ResNet-50 (torchvision's key names,
ImageNet normalization inside) checked key by key against files written here with random weights,
and its forward against an independent functional reference (tests/helpers/reference_resnet.py)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from advpure.core.errors import CheckpointError
from advpure.importers import robustbench as rb
from advpure.importers.resnet import NormalizedResNet
from advpure.importers.robustbench import TorchvisionResNet50, load_robustbench_classifier
from advpure.kinds.classifier import Classifier
from advpure.nets import count_parameters
from helpers.reference_resnet import random_resnet_state, resnet_forward, resnet_shapes

TINY = (1, 1, 1, 1)


@pytest.fixture()
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture()
def tiny(monkeypatch):
    """A 4-block ResNet with 7 classes registered as ('imagenet', 'Linf', 'Tiny50')."""
    monkeypatch.setitem(
        rb.MODELS, ("imagenet", "Linf", "Tiny50"), TorchvisionResNet50(blocks=TINY, num_classes=7)
    )
    return "Tiny50"


def _save(tmp_path: Path, name: str, obj) -> Path:
    path = rb.robustbench_path(name, "imagenet", "Linf", tmp_path / "models")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def test_resnet50_layout_and_parameter_count():
    with torch.device("meta"):
        net = NormalizedResNet()
    assert count_parameters(net) == 25_557_032  # torchvision's ResNet50_Weights.IMAGENET1K_V1 num_params
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert got.pop("normalize.mean") == (1, 3, 1, 1) and got.pop("normalize.std") == (1, 3, 1, 1)
    assert list(got) == list(resnet_shapes())  # torchvision's keys, in its order
    assert got == resnet_shapes()
    for key, shape in {
        "conv1.weight": (64, 3, 7, 7),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer3.5.bn3.running_var": (1024,),
        "layer4.2.conv3.weight": (2048, 512, 1, 1),
        "fc.weight": (1000, 2048),
    }.items():
        assert got[key] == shape, key
    assert "layer1.1.downsample.0.weight" not in got


def test_standard_r50_from_torchvision_file_matches_the_reference(tmp_path, no_network):
    sd = random_resnet_state(resnet_shapes(), seed=3)
    plain = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}  # the 2017 file has none
    _save(tmp_path, "Standard_R50", plain)
    model = load_robustbench_classifier("Standard_R50", "imagenet", "Linf", tmp_path / "models")
    assert not model.training and all(t.device.type == "cpu" for t in model.state_dict().values())
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(x), resnet_forward(sd, x)
    assert got.shape == (2, 1000) and want.abs().max() > 0.1  # the net does not collapse to 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["robustbench", "module", "state_dict"])
def test_checkpoint_layouts_float64_to_1e10(tmp_path, tiny, layout):
    sd = random_resnet_state(resnet_shapes(TINY, 7), seed=4, dtype=torch.float64)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    if layout == "robustbench":  # RobustBench's normalize_model(net): normalize.* + model.*
        obj = {"normalize.mean": mean.view(1, 3, 1, 1), "normalize.std": std.view(1, 3, 1, 1)}
        obj.update({f"model.{k}": v for k, v in sd.items()})
    elif layout == "module":
        obj = {f"module.{k}": v for k, v in sd.items()}
    else:
        obj = {"state_dict": sd, "epoch": 90}
    _save(tmp_path, tiny, obj)
    model = load_robustbench_classifier(tiny, "imagenet", "Linf", tmp_path / "models")
    loaded = model.state_dict()
    for k, v in sd.items():  # every tensor of the file, stored as the net's float32
        assert torch.equal(loaded[k], v.to(loaded[k].dtype)), k
    model = model.double()
    ref = {k: v.double() if v.is_floating_point() else v for k, v in loaded.items()}
    norm = {"mean": ref["normalize.mean"].flatten().tolist(), "std": ref["normalize.std"].flatten().tolist()}
    x = torch.rand(3, 3, 40, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), resnet_forward(ref, x, TINY, **norm), rtol=0, atol=1e-10)


def test_bad_files_are_one_line_errors(tmp_path, tiny):
    models = tmp_path / "models"
    with pytest.raises(CheckpointError) as e:
        load_robustbench_classifier("Standard_R50", "imagenet", "Linf", models)
    msg = str(e.value)
    assert "\n" not in msg and str(models / "imagenet/Linf/Standard_R50.pt") in msg
    assert rb.TORCHVISION_RESNET50_V1 in msg and "IMAGENET1K_V1" in msg

    sd = random_resnet_state(resnet_shapes(TINY, 7), seed=5)
    cases = [
        (
            {**sd, "normalize.mean": torch.zeros(1, 3, 1, 1)},
            r"normalize\.mean is \[0\.0, 0\.0, 0\.0\], not ImageNet's",
        ),
        (
            {k: v for k, v in sd.items() if k != "layer3.0.conv2.weight"},
            r"missing key 'layer3\.0\.conv2\.weight'",
        ),
        (
            {**sd, "fc.weight": torch.zeros(1000, 2048)},
            r"'fc\.weight' has shape \(1000, 2048\), expected \(7, 2048\)",
        ),
        ({**sd, "layer5.0.conv1.weight": torch.zeros(1)}, r"unexpected key 'layer5\.0\.conv1\.weight'"),
        ({**sd, "bn1.weight": torch.full((64,), float("nan"))}, r"'bn1\.weight' holds 64 non-finite values"),
    ]
    for obj, message in cases:
        _save(tmp_path, tiny, obj)
        with pytest.raises(CheckpointError, match=message):
            load_robustbench_classifier(tiny, "imagenet", "Linf", models)


def test_classifier_kind_says_how_to_get_standard_r50(tmp_path):
    from omegaconf import OmegaConf

    from advpure.kinds.classifier import ClassifierConfig

    block = OmegaConf.structured(ClassifierConfig(source="robustbench", robustbench_name="Standard_R50"))
    paths = OmegaConf.create({"models": str(tmp_path / "models")})
    path = Classifier.weights_path(block, paths, "imagenet")
    assert path == tmp_path / "models" / "imagenet" / "Linf" / "Standard_R50.pt"
    line = Classifier.how_to_get(block, path, "imagenet", "imagenet_diffpure")
    assert (
        line.startswith(f"{path}: the RobustBench 'Standard_R50' model")
        and rb.TORCHVISION_RESNET50_V1 in line
    )
