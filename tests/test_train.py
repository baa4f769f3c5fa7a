"""Classifier training, exported weights, W&B offline logging, devices check, fresh clone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from advpure.config import compose as C
from advpure.core.errors import CheckpointError, ConfigError, StorageError
from advpure.data import get_spec
from advpure.kinds.classifier import Classifier
from advpure.nets import make_classifier
from advpure.nets.weights import load_weights, read_weights, save_weights
from advpure.training.classifier import ClassifierModule, build_optimizer
from conftest import REAL_HOME, ROOT, needs_fmnist, tiny_overrides
from helpers.wandb_offline import find_run_files, read_run


def test_classifier_overfits_a_tiny_batch():
    torch.manual_seed(0)
    spec = get_spec("fmnist")
    cfg = C.load("fmnist")
    module = ClassifierModule(Classifier.arch(cfg.classifier, spec), spec, C.to_dict(cfg.classifier.optim))
    x = torch.rand(32, 1, 28, 28)
    y = torch.randint(0, 10, (32,))
    opt = build_optimizer(module.parameters(), cfg.classifier.optim)
    for _ in range(60):
        opt.zero_grad()
        loss = module.loss_fn(module(x), y)
        loss.backward()
        opt.step()
    assert (module(x).argmax(1) == y).float().mean() == 1.0  # random labels memorised
    assert loss.item() < 0.05


def test_weights_round_trip_with_weights_only(tmp_path):
    spec = get_spec("fmnist")
    arch = {"arch": "small_cnn", "in_channels": 1, "image_size": 28, "num_classes": 10}
    net = make_classifier(arch, spec)
    path = save_weights(tmp_path / "w" / "classifier.pt", "classifier", arch, net, {"test_acc": 0.9})
    raw = torch.load(path, weights_only=True)  # plain tensors and dicts only: no code is unpickled
    assert raw["kind"] == "classifier" and raw["meta"]["test_acc"] == 0.9
    other = make_classifier(arch, spec)
    assert load_weights(path, "classifier", arch, other) == {"test_acc": 0.9}
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(net(x), other(x))


def test_weights_errors_name_the_problem(tmp_path):
    spec = get_spec("fmnist")
    arch = {"arch": "small_cnn", "in_channels": 1, "image_size": 28, "num_classes": 10}
    path = save_weights(tmp_path / "c.pt", "classifier", arch, make_classifier(arch, spec))
    wrn = {**arch, "arch": "wrn28_10", "image_size": 32}
    with pytest.raises(CheckpointError, match="another classifier architecture.*arch: file has 'small_cnn'"):
        load_weights(path, "classifier", wrn, torch.nn.Linear(1, 1))
    with pytest.raises(CheckpointError, match="holds a classifier network, expected a score"):
        load_weights(path, "score", arch, torch.nn.Linear(1, 1))
    with pytest.raises(CheckpointError, match="not found"):
        read_weights(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch file"):
        read_weights(bad)
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an advpure weights file"):
        read_weights(tmp_path / "foreign.pt")


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    spec = get_spec("fmnist")
    arch = {"arch": "small_cnn", "in_channels": 1, "image_size": 28, "num_classes": 10}
    path = save_weights(tmp_path / "c.pt", "classifier", arch, make_classifier(arch, spec), {"v": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(StorageError, match=f"cannot write weights file {path}: disk full"):
        save_weights(path, "classifier", arch, make_classifier(arch, spec), {"v": 2}, force=True)
    assert read_weights(path)["meta"] == {"v": 1}  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left


@needs_fmnist
def test_train_classifier_logs_to_offline_wandb_and_exports(tmp_path):
    from advpure.jobs.train import train

    def home_files():
        return {
            (str(p), p.stat().st_mtime)
            for sub in (".cache", ".config", ".local", "wandb", ".netrc")
            for p in ([REAL_HOME / sub] if (REAL_HOME / sub).is_file() else (REAL_HOME / sub).rglob("*"))
        }

    before = home_files()
    wandb_dir = tmp_path / "runs" / "train" / "fmnist" / "classifier"
    cfg = C.load(
        "fmnist",
        tiny_overrides(
            tmp_path,
            **{
                "logger.kind": "wandb",
                "data.train_subset": 2000,
                "data.val_size": 500,
                "trainer.max_epochs": 1,
                "train.stages": "[classifier]",
                "trainer.log_every_n_steps": 5,
            },
        ),
    )
    out = train(cfg)
    meta = out["classifier"]
    assert 0.5 < meta["test_acc"] <= 1.0  # 1 epoch on 2000 images: well above chance (0.1)
    files = find_run_files(wandb_dir)
    assert len(files) == 1
    run = read_run(files[0])
    logged = {k for row in run["history"] for k in row}
    assert {"train/loss", "val/acc", "test/acc", "train/images_per_s"} <= logged
    test_acc = [row["test/acc"] for row in run["history"] if "test/acc" in row][-1]
    assert test_acc == pytest.approx(meta["test_acc"], abs=1e-6)
    assert run["config"]["data"]["train_subset"] == 2000  # the resolved config is logged
    assert not any("api_key" in k.lower() for k in run["config"])
    # exported weights load with weights_only=True and classify like the trained module
    w = read_weights(cfg.classifier.weights)
    assert w["kind"] == "classifier" and w["meta"]["test_acc"] == pytest.approx(meta["test_acc"])
    # a second `train` skips the stage because the weights exist
    assert train(cfg) == {}
    assert home_files() == before  # W&B, Lightning and matplotlib wrote nothing under the real $HOME


def test_devices_beyond_the_machine_is_a_clear_error(tmp_path):
    from advpure.jobs.trainer import check_devices

    cfg = C.load("fmnist", tiny_overrides(tmp_path, **{"trainer.devices": 512}))
    with pytest.raises(ConfigError, match="trainer.devices=512 but this machine has"):
        check_devices(cfg.trainer)
    out = subprocess.run(
        [sys.executable, "-m", "advpure", "train", *tiny_overrides(tmp_path), "trainer.devices=512"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "trainer.devices=512" in out.stderr and "Traceback" not in out.stderr


def test_a_non_editable_install_of_a_fresh_clone_finds_its_configs(tmp_path):
    """The configs ship as package data: a plain (non-editable) install of a clone composes every
    experiment from any working directory, with nothing else from the source tree."""
    if not (ROOT / ".git").exists():
        pytest.fail("not a git checkout")
    clone, target, elsewhere = tmp_path / "clone", tmp_path / "site", tmp_path / "elsewhere"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=60)
    elsewhere.mkdir()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(clone),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert (
        not (target / "advpure" / "conf").is_symlink()
        and (target / "advpure" / "conf" / "experiment").is_dir()
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = "import advpure.config.compose as C, sys; print(C.PACKAGE_CONF); print(C.load('cifar10_paper').classifier.arch)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    conf, arch = out.stdout.split()
    assert conf.startswith(str(target)) and arch == "wrn28_10"
