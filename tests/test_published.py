"""The Croce et al. 2022 setting from published weights, in miniature: synthetic CIFAR-10 pickles, an
official-format NCSNv2 checkpoint imported by `advpure import-weights`, a RobustBench `Standard`
file in the model directory, and `conf/experiment/cifar10_croce2022.yaml` run end to end offline; and,
without the files, one error that lists them and how to get them."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from advpure import cli
from advpure.config import compose as C
from advpure.core.errors import CheckpointError
from advpure.results import load_records, read_csv
from advpure.training.losses import geometric_sigmas
from conftest import tiny_overrides
from helpers.reference_nets import ncsnv2_shapes, random_state, random_wrn_state, wrn_shapes

NGF = 8  # a small NCSNv2 of the official layout (the public one has ngf 128)


def write_cifar10(root: Path, n_train: int = 20, n_test: int = 6) -> Path:
    """The six python pickles of CIFAR-10 with random images, in `root/cifar-10-batches-py`."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [*((f"data_batch_{i}", n_train) for i in range(1, 6)), ("test_batch", n_test)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(d / name, "wb") as f:
            pickle.dump({b"batch_label": b"x", b"labels": rng.integers(0, 10, n).tolist(), b"data": data}, f)
    return root


def write_official_ncsnv2(path: Path) -> Path:
    """A checkpoint as ermongroup/ncsnv2 saves it (DataParallel keys, sigmas, EMA shadow last)."""
    sd = random_state(ncsnv2_shapes(NGF, 3), seed=1)
    state = {"module.sigmas": geometric_sigmas(50.0, 0.01, 232), **{f"module.{k}": v for k, v in sd.items()}}
    torch.save(
        [state, {"state": {}, "param_groups": []}, 10, 1000, random_state(ncsnv2_shapes(NGF, 3), 2)], path
    )
    return path


def croce_overrides(tmp: Path, **extra) -> list[str]:
    return tiny_overrides(
        tmp,
        **{
            "data.root": tmp / "cifar",
            "data.val_size": 10,
            "paths.models": tmp / "models",
            "score.ngf": NGF,
            "benchmark.n_images": 2,
            "benchmark.batch_size": 2,
            "benchmark.worst_of_n": 1,
            "benchmark.protocols": "[single,dwbox]",
            "benchmark.image_grid": 0,
            "defense.replicas": 2,
            "defense.steps": 2,
            "attacks.apgd10_eot200_cw.iters": 2,
            "attacks.apgd10_eot200_cw.eot": 2,
            "attacks.bpda40_eot15.iters": 1,
            "attacks.bpda40_eot15.eot": 1,
            "trainer.num_threads": 1,
            **extra,
        },
    )


def test_missing_published_files_are_listed_with_how_to_get_them(tmp_path):
    from advpure.jobs.benchmark import benchmark

    with pytest.raises(CheckpointError) as e:
        benchmark(C.load("cifar10_croce2022", croce_overrides(tmp_path)))
    msg = str(e.value)
    assert "\n" not in msg and "missing weights (2)" in msg
    assert "models/cifar10/Linf/Standard.pt" in msg and "drive.google.com" in msg  # RobustBench's file
    assert "advpure import-weights ncsnv2" in msg and "score.pt" in msg  # the NCSNv2 import
    assert not (tmp_path / "runs").exists()  # failed before any work


def test_croce_setting_runs_from_imported_weights(tmp_path, capsys):
    from advpure.jobs.benchmark import benchmark

    write_cifar10(tmp_path / "cifar")
    ckpt = write_official_ncsnv2(tmp_path / "checkpoint.pth")
    score = tmp_path / "artifacts" / "cifar10" / "score.pt"
    assert cli.main(["import-weights", "ncsnv2", str(ckpt), str(score)]) == 0
    standard = tmp_path / "models" / "cifar10" / "Linf" / "Standard.pt"
    standard.parent.mkdir(parents=True)
    sd = random_wrn_state(wrn_shapes(28, 10), seed=3)
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, standard)

    cfg = C.load("cifar10_croce2022", croce_overrides(tmp_path))
    assert cfg.classifier.source == "robustbench" and cfg.attacks.apgd10_eot200_cw.loss == "cw"
    benchmark(cfg)
    run = Path(cfg.benchmark.run_dir)
    rows = read_csv(run / "results.csv")
    labels = {(r["defense_label"], r["attack_label"]) for r in rows}
    assert ("ADP σ=0.25", "APGD-CW2-EOT2") in labels and ("ADP σ=0.25", "BPDA1+EOT1") in labels
    md = (run / "results.md").read_text()
    assert "cifar10: first 2 test images" in md and "Croce et al. 2022" in md  # the cited anchor
    recs = load_records(run)
    assert {r.defense for r in recs} == {"none", "adp_s0.25"} and len({r.idx for r in recs}) == 2
