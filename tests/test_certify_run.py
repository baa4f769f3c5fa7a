"""`advpure certify` end to end on the tiny trained nets: stored certificates, the table recomputed from
them, W&B, identical records for another batch size and 2 DDP ranks and after kill -9, a run dir made
by other settings refused, and sigma / weights mistakes refused before any work."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm
from statsmodels.stats.proportion import proportion_confint

from advpure.certify import ABSTAIN, certified_accuracy, lower_confidence_bound
from advpure.config import compose as C
from advpure.core.errors import CheckpointError, ConfigError, RunDirError
from advpure.results.rundir import load_certificates
from conftest import TINY_TRAIN, needs_fmnist, tiny_overrides
from helpers.kill import kill_9_after
from helpers.wandb_offline import find_run_files, read_run

pytestmark = needs_fmnist

UNITS = [(b, s) for b in ("noisy", "denoised", "adp") for s in (0.25, 0.5)]
INDICES = [0, 7, 14, 21, 28]


def tiny_certify(tmp: Path, artifacts: Path, **extra) -> list[str]:
    """5 test images (every 7th), 2 sigmas x 3 bases, n0 = 8, n = 40 on the tiny nets."""
    out = {
        **TINY_TRAIN,
        "paths.artifacts": artifacts,
        "certify.sigmas": "[0.25,0.5]",
        "certify.bases": "[noisy,denoised,adp]",
        "certify.n_images": 5,
        "certify.skip": 7,
        "certify.n0": 8,
        "certify.n": 40,
        "certify.alpha": 0.01,
        "certify.batch_size": 2,
        "certify.max_batch": 64,
        "certify.block": 16,
        "certify.train_missing": "false",
        "certify.noisy_classifier": "null",
        "defense.steps": 2,
        "trainer.num_threads": 1,
    }
    out.update(extra)
    out = {k: v for k, v in out.items() if v is not None}  # None: leave the key out
    return ["experiment=fmnist_certify", *tiny_overrides(tmp, **out)]


def run_certify(tmp, artifacts, **extra):
    from advpure.jobs.certify import certify

    cfg = C.load(None, tiny_certify(tmp, artifacts, **extra))
    certify(cfg)
    return cfg, Path(cfg.certify.run_dir)


def by_key(records, drop=("seconds",)):
    """{(base, sigma, idx): record without its timing}, counts as lists."""
    return {
        (r["base"], r["sigma"], r["idx"]): {
            k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items() if k not in drop
        }
        for r in records
    }


@pytest.fixture(scope="module")
def reference(tiny_artifacts, tmp_path_factory):
    """One run on 1 process, batch size 2, W&B offline. The noisy base reads
    `classifier_noise{sigma}.pt`: at 0.25 the tiny classifier re-saved with noise_sd = 0.25 in its meta
    (a stand-in for a noise-trained one), at 0.5 a plain copy; the header must say which is which."""
    from advpure.api import load_net_with_meta
    from advpure.nets.weights import save_weights

    tmp = tmp_path_factory.mktemp("certref")
    net, arch, meta = load_net_with_meta(tiny_artifacts / "fmnist" / "classifier.pt", "classifier")
    save_weights(tmp / "classifier_noise0.25.pt", "classifier", arch, net, {**meta, "noise_sd": 0.25})
    save_weights(tmp / "classifier_noise0.5.pt", "classifier", arch, net, meta)
    template = str(tmp / "classifier_noise{sigma}.pt")
    return run_certify(tmp, tiny_artifacts, **{"logger.kind": "wandb", "certify.noisy_classifier": template})


def test_records_table_plot_and_wandb_are_recomputed_from_the_stored_certificates(reference):
    cfg, run = reference
    for name in ("config.yaml", "manifest.json", "results.json", "results.csv", "results.md",
                 "records/rank0.sqlite", "plots/certified_accuracy.png"):  # fmt: skip
        assert (run / name).is_file(), name
    recs = load_certificates(run)
    assert sorted(by_key(recs)) == sorted((b, s, i) for b, s in UNITS for i in INDICES)
    for r in recs:  # every record is a CERTIFY outcome of its own counts
        assert r["counts0"].sum() == 8 and r["counts"].sum() == 40 and r["n0"] == 8 and r["n"] == 40
        guess = int(np.argmax(r["counts0"]))
        assert r["p_a"] == pytest.approx(lower_confidence_bound(int(r["counts"][guess]), 40, 0.01))
        if r["abstained"]:
            assert r["prediction"] == ABSTAIN and r["radius"] == 0.0 and r["p_a"] < 0.5
        else:
            assert r["prediction"] == guess and r["radius"] == pytest.approx(r["sigma"] * norm.ppf(r["p_a"]))
    results = json.loads((run / "results.json").read_text())
    rows = {(r["base"], r["sigma"]): r for r in results["rows"]}
    assert list(rows) == UNITS
    radii = [0.0, 0.25, 0.5, 0.75, 1.0]
    for (b, s), row in rows.items():
        mine = [r for r in recs if (r["base"], r["sigma"]) == (b, s)]
        acc = certified_accuracy(mine, radii)
        assert row["n"] == 5
        for rad in radii:
            key = f"r{rad:g}"
            k = sum(r["prediction"] == r["label"] and r["radius"] >= rad for r in mine)
            assert row[key] == pytest.approx(acc[rad]) == pytest.approx(k / 5)
            lo, hi = proportion_confint(k, 5, alpha=0.05, method="wilson")
            assert (row[key + "_lo"], row[key + "_hi"]) == pytest.approx((lo, hi))
        assert row["abstain"] == pytest.approx(np.mean([r["abstained"] for r in mine]))
        assert row["natural_predict"] == pytest.approx(np.mean([r["predict"] == r["label"] for r in mine]))
        assert row["images_per_s"] > 0 and row["overhead"] > 0
    # not a degenerate run: some images certified, some radii differ between sigmas
    assert any(row["r0"] > 0 for row in rows.values())
    assert rows[("denoised", 0.25)] != rows[("denoised", 0.5)]
    md = (run / "results.md").read_text()
    assert (
        "5 test images (one in every 7: indices 0, 7, …, 28)" in md
        and "n0 = 8" in md
        and "n = 40" in md
        and "α = 0.01" in md
    )
    assert "not measured here" in md and "| 60 | 43 | 32 | 23 |" in md and "| 56 | 41 | 28 | 19 |" in md
    template = str(cfg.certify.noisy_classifier)
    for sigma, what in (
        ("0.25", "trained with Gaussian noise sd 0.25"),
        ("0.5", "not noise-trained (noise_sd 0)"),
    ):
        assert f"σ={sigma}: {template.replace('{sigma}', sigma)}, {what}" in md
    line = next(x for x in md.splitlines() if x.startswith("| denoised | 0.25 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    row = rows[("denoised", 0.25)]
    assert cells[3] == f"{100 * row['r0.25']:.1f} [{100 * row['r0.25_lo']:.1f}, {100 * row['r0.25_hi']:.1f}]"
    files = find_run_files(run)
    assert len(files) == 1
    summary = read_run(files[0])["summary"]
    for (b, s), row in rows.items():
        for rad in radii:
            assert summary[f"certify/{b}/s{s:g}/r{rad:g}"] == pytest.approx(row[f"r{rad:g}"])


@pytest.mark.ddp
def test_another_batch_size_and_two_ddp_ranks_give_identical_records(reference, tiny_artifacts, tmp_path):
    cfg, run = reference
    ref = by_key(load_certificates(run))
    template = str(cfg.certify.noisy_classifier)
    _, two = run_certify(
        tmp_path,
        tiny_artifacts,
        **{"certify.batch_size": 3, "certify.max_batch": 37, "certify.noisy_classifier": template},
        **{"trainer.devices": 2, "trainer.strategy": "ddp_fork"},
    )
    files = sorted(p.name for p in (two / "records").glob("*.sqlite"))
    assert files == ["rank0.sqlite", "rank1.sqlite"]
    per_rank = [
        len(sqlite3.connect(two / "records" / f).execute("select * from certificates").fetchall())
        for f in files
    ]
    assert per_rank == [3 * 6, 2 * 6]  # batches {0,7,14} and {21,28}: no padding, nothing twice
    assert by_key(load_certificates(two)) == ref
    a = json.loads((run / "results.json").read_text())["rows"]
    b = json.loads((two / "results.json").read_text())["rows"]
    timing = ("images_per_s", "limit_images_per_s", "overhead", "forward_rows_per_s")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(a) == strip(b)


def test_kill_9_then_rerun_gives_identical_records_without_redoing_stored_images(
    reference, tiny_artifacts, tmp_path
):
    cfg, run = reference
    template = str(cfg.certify.noisy_classifier)
    # batch size 1 and 4 rows per forward: slow enough to be killed half way (neither changes a record)
    extra = {"certify.batch_size": 1, "certify.max_batch": 4, "certify.noisy_classifier": template}
    cmd = [sys.executable, "-m", "advpure", "certify", *tiny_certify(tmp_path, tiny_artifacts, **extra)]
    work = tmp_path / "runs/certify/fmnist_certify"
    store = work / "records/rank0.sqlite"
    kill_9_after(cmd, store, "certificates", 8)
    assert not (work / "results.json").exists(), "finished before the kill"
    before = {k: r["seconds"] for k, r in by_key(load_certificates(work), drop=()).items()}
    assert 8 <= len(before) < 30
    # the rerun (in this process, 64 rows per forward) stores only what is missing
    run_certify(tmp_path, tiny_artifacts, **{**extra, "certify.max_batch": 64})
    after = load_certificates(work)
    for r in after:
        key = (r["base"], r["sigma"], r["idx"])
        if key in before:
            assert r["seconds"] == before[key], key  # not recomputed: its stored timing is untouched
    assert by_key(after) == by_key(load_certificates(run))


def test_a_run_dir_made_by_other_settings_is_refused_and_overwrite_redoes_only_the_changed_units(
    tiny_artifacts, tmp_path
):
    extra = {"certify.bases": "[noisy,adp]", "certify.sigmas": "[0.25]", "certify.n_images": 2}
    _, run = run_certify(tmp_path, tiny_artifacts, **extra)
    store = run / "records" / "rank0.sqlite"
    snapshot = store.read_bytes()
    old = {k: r["seconds"] for k, r in by_key(load_certificates(run), drop=()).items()}
    for change, what in ((("certify.n", 50),), "base settings"), ((("defense.lam", 0.1),), "adp/s0.25"):
        with pytest.raises(RunDirError, match=f"other settings.*{what}") as e:
            run_certify(tmp_path, tiny_artifacts, **extra, **dict(change))
        assert "\n" not in str(e.value)
        assert store.read_bytes() == snapshot  # refused: nothing changed
    # more images and another sigma are new certificates, not other settings: the stored ones stay
    _, run = run_certify(tmp_path, tiny_artifacts, **{**extra, "certify.n_images": 3})
    now = {k: r["seconds"] for k, r in by_key(load_certificates(run), drop=()).items()}
    assert len(now) == 6 and all(now[k] == v for k, v in old.items())
    # overwrite: the changed unit (adp) is recomputed, the noisy base's certificates are kept
    run_certify(
        tmp_path,
        tiny_artifacts,
        **{**extra, "certify.n_images": 3, "defense.lam": 0.1, "certify.overwrite": "true"},
    )
    redone = by_key(load_certificates(run), drop=())
    assert all(redone[k]["seconds"] == v for k, v in now.items() if k[0] == "noisy")
    assert any(redone[k]["seconds"] != v for k, v in now.items() if k[0] == "adp")


def test_sigma_outside_the_dsm_range_and_missing_weights_are_one_line_errors_before_any_work(
    tiny_artifacts, tmp_path
):
    from advpure.jobs.certify import certify

    # 0.75 > the score net's largest DSM level (0.5): refused before training or touching a run dir
    for artifacts in (tiny_artifacts, tmp_path / "nothing"):  # from the weights' meta / from the config
        cfg = C.load(
            None,
            tiny_certify(
                tmp_path, artifacts, **{"certify.sigmas": "[0.25,0.75]", "certify.train_missing": "true"}
            ),
        )
        with pytest.raises(
            ConfigError, match=r"sigma=0.75 is outside the score net's DSM noise levels \[0.01, 0.5\]"
        ) as e:
            certify(cfg)
        assert "\n" not in str(e.value)
        assert not (tmp_path / "runs").exists() and not (tmp_path / "nothing").exists()
    # the bare classifier needs no score net: sigma 0.75 is fine for it alone
    from advpure.jobs.artifacts import Artifacts
    from advpure.jobs.certify import plan_units

    cfg = C.load(
        None,
        tiny_certify(tmp_path, tiny_artifacts, **{"certify.sigmas": "[0.75]", "certify.bases": "[noisy]"}),
    )
    assert plan_units(cfg, Artifacts.from_config(cfg)).units == [("noisy", 0.75)]
    # a missing noise-trained classifier with training disabled names the file and how to make it
    missing = tmp_path / "cls_noise{sigma}.pt"
    cfg = C.load(None, tiny_certify(tmp_path, tiny_artifacts, **{"certify.noisy_classifier": str(missing)}))
    with pytest.raises(
        CheckpointError, match=r"cls_noise0.25.pt: train it with classifier.noise_sd=0.25"
    ) as e:
        certify(cfg)
    assert "\n" not in str(e.value) and not (tmp_path / "runs").exists()
    # adp without an ADP defense block; more images than the strided test set has
    with pytest.raises(ConfigError, match="defense.kind is 'none'"):
        certify(
            C.load(
                None,
                tiny_certify(tmp_path, tiny_artifacts, **{"defense.kind": "none", "defense.steps": None}),
            )
        )
    with pytest.raises(ConfigError, match=r"certify.n_images=600.*only 500 images at certify.skip=20"):
        certify(
            C.load(
                None, tiny_certify(tmp_path, tiny_artifacts, **{"certify.n_images": 600, "certify.skip": 20})
            )
        )
    with pytest.raises(ConfigError, match="unknown base classifier 'tweedie'"):
        C.load(None, tiny_certify(tmp_path, tiny_artifacts, **{"certify.bases": "[noisy,tweedie]"}))
    assert not (tmp_path / "runs").exists()
