"""The published-weights diffusion experiments (cifar10_diffpure, cifar10_gdmp, imagenet_diffpure) and
the checks that make `advpure benchmark` stop at once, with one line naming every file it needs:
the weights (each network kind's `how_to_get`) and the ImageNet validation set, which cannot be
downloaded. The experiments compose only once the network kinds ddpmpp / ddpm / adm, the defense
kinds diffpure / gdmp and the majority_of_n protocol are registered (other branches); until then
those tests are skipped with that reason."""

from __future__ import annotations

import pytest

from advpure.config import compose as C
from advpure.core.errors import CheckpointError, DataError
from advpure.jobs.stages import Stages
from advpure.nets.registry import NET_KINDS
from advpure.purify.base import PURIFIERS
from advpure.results.protocols import PROTOCOLS
from conftest import tiny_overrides
from helpers.imagenet_fake import write_devkit, write_images

EXPERIMENTS = {  # experiment -> (diffusion net kind, defense kind, dataset, classifier file)
    "cifar10_diffpure": ("ddpmpp", "diffpure", "cifar10", "cifar10/Linf/Standard.pt"),
    "cifar10_gdmp": ("ddpm", "gdmp", "cifar10", "cifar10/Linf/Standard.pt"),
    "imagenet_diffpure": ("adm", "diffpure", "imagenet", "imagenet/Linf/Standard_R50.pt"),
}


def _imagenet_cfg(tmp_path):
    overrides = tiny_overrides(tmp_path, **{"paths.models": tmp_path / "models"})
    overrides += [
        "data=imagenet",
        "classifier.source=robustbench",
        "classifier.robustbench_name=Standard_R50",
    ]
    return C.load("fmnist", overrides)


def test_imagenet_data_is_listed_beside_the_weights_before_any_work(tmp_path):
    cfg = _imagenet_cfg(tmp_path)
    assert cfg.data.eps == pytest.approx(4 / 255) and cfg.data.download is False
    stages = Stages.from_config(cfg)
    with pytest.raises(CheckpointError) as e:
        stages.ensure(["classifier"], train_missing=True)  # ImageNet is never trained here
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("missing weights (1): ")
    assert str(tmp_path / "models/imagenet/Linf/Standard_R50.pt") in msg and "resnet50-0676ba61.pth" in msg
    assert "; and missing data: imagenet: " in msg and "image-net.org" in msg
    weights = tmp_path / "models/imagenet/Linf/Standard_R50.pt"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"present")  # ensure checks presence; loading checks content
    with pytest.raises(
        DataError, match=r"^imagenet: the ILSVRC2012 validation set is incomplete: the images"
    ):
        stages.ensure(["classifier"], train_missing=False)
    write_devkit(tmp_path / "data" / "imagenet", [1])
    write_images(tmp_path / "data" / "imagenet" / "val", [(260, 300)])
    stages.ensure(["classifier"], train_missing=False)  # everything there: no error


def _missing_kinds(experiment: str) -> list[str]:
    net, defense, _, _ = EXPERIMENTS[experiment]
    out = [f"network kind {net}"] if net not in NET_KINDS else []
    out += [f"defense kind {defense}"] if defense not in PURIFIERS else []
    return out + (["protocol majority_of_n"] if "majority_of_n" not in PROTOCOLS else [])


@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
def test_experiment_stops_at_once_naming_every_file(tmp_path, experiment):
    import advpure.kinds  # noqa: F401 (the built-in kinds)

    assert _missing_kinds(experiment) == []  # every kind, purifier and protocol it names is registered
    from advpure.jobs.benchmark import benchmark

    net, defense, dataset, classifier = EXPERIMENTS[experiment]
    cfg = C.load(experiment, tiny_overrides(tmp_path, **{"paths.models": tmp_path / "models"}))
    assert cfg.defense.kind == defense and cfg.defense.net == net and cfg.data.name == dataset
    assert cfg.classifier.source == "robustbench" and cfg.benchmark.n_images == 512
    assert list(cfg.benchmark.protocols) == ["single", "worst_of_n", "majority_of_n"]
    assert cfg.benchmark.worst_of_n == 10 and set(cfg.attacks) == {"apgd100_eot20_ce", "apgd100_eot20_dlr"}
    assert all(a.eot == 20 and a.gradient == "full" for a in cfg.attacks.values())
    if dataset == "imagenet":
        assert cfg.defense.t_star == 0.15 and cfg.defense.resize == 256
        assert cfg.data.eps == pytest.approx(4 / 255)
    with pytest.raises(CheckpointError) as e:
        benchmark(cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("missing weights (2): ")
    assert str(tmp_path / "models" / classifier) in msg
    assert str(Stages.from_config(cfg).artifacts.path(net)) in msg
    assert ("image-net.org" in msg) == (dataset == "imagenet")
    assert not (tmp_path / "runs" / "benchmark").exists()  # failed before any work
