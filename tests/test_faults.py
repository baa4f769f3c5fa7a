"""Faults a new user meets: more DDP ranks than evaluation batches, a run that writes outside its
directories (read-only empty HOME), and `--help` after a command (issue 11)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from advpure import config as C
from advpure.results import RecordStore, load_records, read_json
from conftest import needs_fmnist, tiny_bench


# --- more DDP ranks than evaluation batches ------------------------------------------------------
def _ranks(**extra) -> dict:
    return {"trainer.devices": 2, "trainer.strategy": "ddp_fork", **extra}


@needs_fmnist
@pytest.mark.ddp
def test_benchmark_with_more_ranks_than_batches_equals_one_rank(tmp_path, tiny_artifacts):
    """3 images in one batch on 2 ranks: rank 1 idles (no records) and the table is the 1-rank one."""
    from advpure.benchmark import benchmark

    extra = {
        "benchmark.n_images": 3,
        "benchmark.batch_size": 4,
        "attack": "[pgd40_blind,bpda40_eot15]",
        "attacks.pgd40_blind.iters": 2,
        "attacks.bpda40_eot15.iters": 2,
    }
    runs = {}
    for name, more in (("one", {}), ("two", _ranks())):
        cfg = C.load("fmnist", tiny_bench(tmp_path / name, tiny_artifacts, **extra, **more))
        benchmark(cfg)
        runs[name] = Path(cfg.benchmark.run_dir)
    one, two = runs["one"], runs["two"]
    a = {r.key: r.value for r in load_records(one)}
    b = {r.key: r.value for r in load_records(two)}
    assert a == b and {k[4] for k in a} == {0, 1, 2}
    with RecordStore(two / "records" / "rank1.sqlite") as idle:  # rank 1 had no batch: no work
        assert idle.records() == []
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds_per_img"} for r in rs]  # noqa: E731
    assert strip(read_json(one / "results.json")[0]) == strip(read_json(two / "results.json")[0])


def _fit_free_trainer(devices: int) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_fork" if devices > 1 else "auto",
        use_distributed_sampler=False, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False,
    )  # fmt: skip


@needs_fmnist
@pytest.mark.ddp
def test_training_evaluation_with_more_ranks_than_batches_equals_one_rank(tmp_path):
    """Classifier validation / test and score-net validation with one batch on 2 ranks: no
    'zero length' error and no hang, and the synced metrics are the 1-rank ones."""
    from advpure.data import ImageDataModule, get_spec
    from advpure.lit.classifier import ClassifierModule
    from advpure.lit.score import ScoreModule

    cfg = C.load("fmnist", [f"paths.data={tmp_path}/data", "data.val_size=40", "data.eval_batch_size=64"])
    spec = get_spec("fmnist")
    torch.manual_seed(0)
    arch = {"arch": "small_cnn", "in_channels": 1, "image_size": 28, "num_classes": 10}
    classifier = ClassifierModule(arch, spec, C.to_dict(cfg.classifier.optim))
    score = ScoreModule(
        {"arch": "ncsnv2", "ngf": 4, "in_channels": 1, "image_size": 28},
        sigma_max=1.0, sigma_min=0.01, num_sigmas=10, val_batches=1, log_images=False,
    )  # fmt: skip
    dm = ImageDataModule(cfg.data, cfg.paths)
    dm.setup()
    dm.test_n, dm.val_n = 50, 64  # one test batch and one validation batch
    out = {}
    for devices in (1, 2):
        t = _fit_free_trainer(devices)
        out[devices] = (
            t.validate(classifier, datamodule=dm, verbose=False)[0],
            t.test(classifier, datamodule=dm, verbose=False)[0],
            t.validate(score, datamodule=dm, verbose=False)[0],
        )
    for one, two in zip(out[1], out[2]):
        assert one.keys() == two.keys() and one
        for k in one:
            assert two[k] == pytest.approx(one[k], rel=1e-5), k
    assert 0 <= out[2][1]["test/acc"] <= 1 and out[2][2]["val/dsm_loss"] > 0
