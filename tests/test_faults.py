"""Faults a new user meets: more DDP ranks than evaluation batches, a run that writes outside its
directories (read-only empty HOME), and `--help` after a command (issue 11)."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from advpure.config import compose as C
from advpure.results import RecordStore, load_records, read_json
from conftest import ROOT, needs_fmnist, tiny_bench


# --- more DDP ranks than evaluation batches ------------------------------------------------------
def _ranks(**extra) -> dict:
    return {"trainer.devices": 2, "trainer.strategy": "ddp_fork", **extra}


@needs_fmnist
@pytest.mark.ddp
def test_benchmark_with_more_ranks_than_batches_equals_one_rank(tmp_path, tiny_artifacts):
    """3 images in one batch on 2 ranks: rank 1 idles (no records) and the table is the 1-rank one."""
    from advpure.jobs.benchmark import benchmark

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
    from advpure.training.classifier import ClassifierModule
    from advpure.training.score import ScoreModule

    cfg = C.load("fmnist", [f"paths.data={tmp_path}/data", "data.val_size=40", "data.eval_batch_size=64"])
    spec = get_spec("fmnist")
    torch.manual_seed(0)
    arch = {"arch": "small_cnn", "in_channels": 1, "image_size": 28, "num_classes": 10}
    classifier = ClassifierModule(arch, spec, C.to_dict(cfg.classifier.optim))
    score = ScoreModule(
        {"arch": "ncsnv2", "ngf": 4, "in_channels": 1, "image_size": 28},
        dsm_sigma_max=1.0, dsm_sigma_min=0.01, dsm_levels=10, val_batches=1, log_images=False,
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


# --- nothing written outside the run's directories -------------------------------------------------
_TINY_RUN = [
    "experiment=fmnist", "paths.artifacts=artifacts", "paths.runs=runs", "paths.data=data",
    "logger.kind=wandb", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.num_threads=1",
    "data.train_subset=256", "data.val_size=100", "trainer.max_epochs=1", "score.ngf=4", "score.max_steps=4",
    "score.batch_size=16", "score.val_every_n_steps=4", "score.ckpt_every_n_steps=4", "score.val_batches=1",
]  # fmt: skip
_TINY_BENCH = [
    "benchmark.n_images=2", "benchmark.batch_size=2", "benchmark.worst_of_n=1", "benchmark.image_grid=1",
    "benchmark.train_missing=false", "defense.replicas=1", "defense.steps=1", "attack=[pgd40_blind]",
    "attacks.pgd40_blind.iters=1",
]  # fmt: skip


def _bare_env(home: Path) -> dict[str, str]:
    """What a new user's shell has: a HOME, no XDG_* / WANDB_*_DIR / MPLCONFIGDIR / TMPDIR / caches."""
    pythonpath = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "PYTHONPATH": pythonpath,
        "WANDB_MODE": "offline",  # no network; the run files are still written
        "WANDB_SILENT": "true",
        "OMP_NUM_THREADS": "1",
        "LANG": "C.UTF-8",
    }


@needs_fmnist
def test_train_and_benchmark_leave_a_read_only_empty_home_empty(tmp_path):
    """`advpure train` then `advpure benchmark` (W&B offline, plots) with HOME an empty read-only
    folder and no XDG variables: both succeed, HOME stays empty and the working directory holds
    only the configured paths; W&B's service logs land in paths.cache."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    home.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    env = _bare_env(home)
    try:
        for args in (["train", *_TINY_RUN], ["benchmark", *_TINY_RUN, *_TINY_BENCH]):
            out = subprocess.run(
                [sys.executable, "-m", "advpure", *args], cwd=work, env=env, capture_output=True,
                text=True, timeout=300,
            )  # fmt: skip
            assert out.returncode == 0, out.stderr[-3000:]
        assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == []
    finally:
        home.chmod(0o755)
    assert {p.name for p in work.iterdir()} <= {"artifacts", "runs", "data"}
    assert (work / "runs/benchmark/fmnist/results.json").is_file()
    assert list((work / "runs/benchmark/fmnist/wandb").glob("offline-run-*/run-*.wandb"))
    assert list((work / "runs/cache").rglob("core-debug-*.log"))  # W&B's service log, redirected


def test_redirect_writes_never_overrides_a_users_setting(tmp_path, monkeypatch):
    from advpure.core.runtime import CACHE_VARS, CONFIG_VARS, redirect_writes

    for var in [*CACHE_VARS, *CONFIG_VARS, "XDG_CONFIG_HOME"]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home/.config/matplotlib").mkdir(parents=True)  # the user's matplotlibrc lives here
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setattr("tempfile.tempdir", None)
    set_ = redirect_writes(tmp_path / "cache")
    assert (
        os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
        and "TORCHINDUCTOR_CACHE_DIR" not in set_
    )
    assert "MPLCONFIGDIR" not in os.environ  # existing settings dir: still read, nothing redirected
    assert os.environ["WANDB_CONFIG_DIR"] == str(tmp_path / "cache/wandb-config")  # none there yet
    for var in (
        "XDG_CACHE_HOME",
        "WANDB_CACHE_DIR",
        "WANDB_DATA_DIR",
        "TMPDIR",
        "TRITON_HOME",
        "CUDA_CACHE_PATH",
    ):
        assert Path(os.environ[var]).is_relative_to(tmp_path / "cache") and var in set_
    import tempfile

    assert Path(tempfile.gettempdir()) == tmp_path / "cache/tmp"
    assert redirect_writes(tmp_path / "other") == {}  # idempotent: what it set now counts as set


# --- --help after a command ---------------------------------------------------------------------
def test_help_after_every_command_prints_its_help_and_exits_0(capsys):
    from advpure.cli import COMMANDS, main

    for name in COMMANDS:
        for argv in (
            [name, "--help"],
            [name, "-h"],
            [name, "experiment=fmnist", "defense.sigma=0.1", "--help"],
        ):
            assert main(argv) == 0, argv
            out = capsys.readouterr().out
            assert out.startswith(f"usage: advpure {name}") and "examples:" in out, argv
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    assert all(f"  {name} " in top for name in COMMANDS) and "advpure <command> --help" in top
    assert main(["help", "train"]) == 0 and capsys.readouterr().out.startswith("usage: advpure train")


def test_benchmark_help_lists_groups_options_and_schema_defaults():
    import dataclasses

    out = subprocess.run(
        [sys.executable, "-m", "advpure", "benchmark", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stderr == "", out.stderr
    text = out.stdout
    lines = text.splitlines()
    for group in ("data", "classifier", "score", "defense", "attack", "trainer", "logger"):
        line = next(ln for ln in lines if ln.lstrip().startswith(f"{group}="))
        assert all(p.stem in line for p in (ROOT / "conf" / group).glob("*.yaml")), group
    from advpure.purify import DefenseParams

    for section, cls in (("benchmark", C.BenchmarkConfig), ("defense", DefenseParams)):
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if isinstance(default, bool) or default is None:
                shown = {True: "true", False: "false", None: "null"}[default]
            else:
                shown = "[" + ",".join(map(str, default)) + "]" if isinstance(default, list) else str(default)
            row = next(ln for ln in lines if ln.split()[:1] == [f"{section}.{f.name}"])
            assert row.split()[1] == shown, row
    assert "attacks.<name>[kind=pgd].eot" in text and "one of softmax|logits|vote" in text
    assert "defense[kind=adp].lam" in text and "defense[kind=langevin].eta" in text  # from the registries
    assert "screening noise std" in text  # the schema's own comment
    assert "advpure benchmark experiment=fmnist" in text


def test_help_keys_are_generated_from_the_dataclasses():
    import dataclasses

    from advpure.config.help import schema_rows
    from advpure.core.params import at_least, choice

    @dataclasses.dataclass
    class Probe:
        steps: int = at_least(7, 1)  # a comment the help shows
        mode: str = choice("a", "a", "b")
        tags: list[str] = dataclasses.field(default_factory=lambda: ["x"])

    assert schema_rows("probe", Probe) == [
        ("probe.steps", "7", "int, >= 1", "a comment the help shows"),
        ("probe.mode", "a", "str, one of a|b", ""),
        ("probe.tags", "[x]", "list[str]", ""),
    ]


def test_option_like_token_is_a_one_line_error():
    out = subprocess.run(
        [sys.executable, "-m", "advpure", "benchmark", "--n-images=3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "advpure: error: unknown option '--n-images=3'; settings are key=value (see `advpure benchmark --help`)"
    ]


# --- non-finite net outputs -------------------------------------------------------------------------
def _poisoned_artifacts(tmp: Path, artifacts: Path, net: str) -> Path:
    """A copy of the tiny artifacts whose `net` weights are all NaN (a diverged run, a bad conversion)."""
    import shutil

    out = tmp / "poisoned"
    shutil.copytree(artifacts, out)
    path = out / "fmnist" / f"{net}.pt"
    w = torch.load(path, weights_only=True)
    w["state_dict"] = {
        k: v * float("nan") if v.is_floating_point() else v for k, v in w["state_dict"].items()
    }
    torch.save(w, path)
    return out


@needs_fmnist
@pytest.mark.parametrize("net, names", [("score", "the score network"), ("classifier", "the classifier")])
def test_nan_weights_stop_the_benchmark_naming_the_net_the_stage_and_the_images(
    tmp_path, tiny_artifacts, net, names
):
    from advpure.core.errors import NonFiniteError
    from advpure.jobs.benchmark import benchmark

    art = _poisoned_artifacts(tmp_path, tiny_artifacts, net)
    cfg = C.load("fmnist", tiny_bench(tmp_path, art))
    with pytest.raises(NonFiniteError) as err:
        benchmark(cfg)
    msg = str(err.value)
    assert "\n" not in msg and names in msg and "natural accuracy of" in msg and "batch 0" in msg
    assert "(3 images)" in msg and re.search(
        r"NaN or infinite values for \d+ of \d+ rows", msg
    )  # batch_size 3
    assert "nothing was recorded for this batch" in msg
    run = Path(cfg.benchmark.run_dir)
    assert not (run / "results.json").exists()  # no table of zeros
    stored = {r.defense for r in load_records(run)}
    assert "adp_s0.25" not in stored and (net == "score") == ("none" in stored)  # the bare classifier ran


@needs_fmnist
def test_nan_score_weights_are_one_line_and_exit_1_on_the_command_line(tmp_path, tiny_artifacts):
    art = _poisoned_artifacts(tmp_path, tiny_artifacts, "score")
    proc = subprocess.run(
        [sys.executable, "-m", "advpure", "benchmark", *tiny_bench(tmp_path, art)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("advpure: error:")]
    assert len(errors) == 1 and "the score network" in errors[0] and "Traceback" not in proc.stderr


def test_a_nan_attack_gradient_is_an_error_not_a_silent_robust_image():
    """Finite logits whose gradient is NaN (sqrt at 0): the attack stops instead of stepping by NaN
    (a sign step of NaN would leave the image unchanged and count it as robust)."""
    from advpure.attacks import attack_params, run_attack
    from advpure.core.errors import NonFiniteError
    from advpure.core.rng import SampleRNG
    from advpure.purify import Defense, IdentityPurifier

    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 3)

        def forward(self, x):
            x = x.flatten(1)
            return self.lin(x) + 0.0 * torch.sqrt(0.0 * x[:, :1])  # value 0, gradient 0 / 0 = NaN

    torch.manual_seed(0)
    d = Defense(Masked(), IdentityPurifier(), replicas=1, channels=1, image_size=4)
    x, y = torch.rand(2, 1, 4, 4), torch.tensor([0, 1])
    p = attack_params("pgd", gradient="classifier", iters=2)
    with pytest.raises(NonFiniteError, match="the attack gradient"):
        run_attack(p, d, x, y, SampleRNG(0, [0, 1]), eps=0.1, step=0.05)
