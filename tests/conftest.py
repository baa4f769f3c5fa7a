"""Shared fixtures: an isolated environment (nothing written to $HOME, W&B offline) and tiny configs."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see advpure/__init__.py)

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REAL_HOME = Path(os.path.expanduser("~"))
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True, scope="session")
def _isolated_env(tmp_path_factory):
    """W&B offline, its folders in a temp dir; no SLURM variables leaking into non-SLURM tests."""
    base = tmp_path_factory.mktemp("env")
    # nothing a test runs may write under the user's home: point every home-based cache at tmp
    home = base / "home"
    home.mkdir()
    for var, sub in (
        ("HOME", ""),
        ("XDG_CACHE_HOME", ".cache"),
        ("XDG_CONFIG_HOME", ".config"),
        ("XDG_DATA_HOME", ".local/share"),
        ("MPLCONFIGDIR", ".config/matplotlib"),
    ):
        os.environ[var] = str(home / sub)
        (home / sub).mkdir(parents=True, exist_ok=True)
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        os.environ[var] = str(base / var.lower())
        os.makedirs(os.environ[var], exist_ok=True)
    # the other caches a run redirects (advpure.core.runtime): in-process runs then change nothing
    from advpure.core.runtime import CACHE_VARS, CONFIG_VARS

    for var in [*CACHE_VARS, *CONFIG_VARS]:
        if var not in os.environ:
            os.environ[var] = str(base / "runenv" / var.lower())
            os.makedirs(os.environ[var], exist_ok=True)
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    os.environ.pop("WANDB_API_KEY", None)
    for k in [k for k in os.environ if k.startswith("SLURM_")]:
        os.environ.pop(k)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


def tiny_overrides(tmp: Path, **extra) -> list[str]:
    """Overrides that make any experiment tiny and write everything under `tmp`."""
    out = {
        "paths.artifacts": tmp / "artifacts",
        "paths.runs": tmp / "runs",
        "paths.data": tmp / "data",
        "logger.kind": "none",
        "trainer.enable_progress_bar": "false",
        "trainer.accelerator": "cpu",
    }
    out.update(extra)
    return [f"{k}={v}" for k, v in out.items()]


needs_fmnist = pytest.mark.skipif(
    not (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(),
    reason="dataset-fashion-mnist not installed (make setup installs it as root)",
)


TINY_TRAIN = {
    "data.train_subset": 2000,
    "data.val_size": 500,
    "data.eval_batch_size": 250,
    "trainer.max_epochs": 1,
    "score.ngf": 8,
    "score.max_steps": 60,
    "score.batch_size": 64,
    "score.val_every_n_steps": 60,
    "score.ckpt_every_n_steps": 60,
    "score.val_batches": 1,
    "score.ema_decay": 0.9,
}


def tiny_bench(tmp: Path, artifacts: Path, **extra) -> list[str]:
    """A benchmark of a few images and iterations on the tiny trained nets of `tiny_artifacts`."""
    out = {
        **TINY_TRAIN,
        "paths.artifacts": artifacts,
        "benchmark.n_images": 7,
        "benchmark.batch_size": 3,
        "benchmark.worst_of_n": 3,
        "benchmark.image_grid": 2,
        "benchmark.train_missing": "false",
        "defense.replicas": 2,
        "defense.steps": 3,
        "attack": "[pgd40_blind,bpda40_eot15,pgd200_eot20_full]",
        "attacks.pgd40_blind.iters": 3,
        "attacks.bpda40_eot15.iters": 2,
        "attacks.bpda40_eot15.eot": 2,
        "attacks.pgd200_eot20_full.iters": 2,
        "attacks.pgd200_eot20_full.eot": 2,
        "trainer.num_threads": 1,
        # the DW-box re-run and the gradient-masking check runs add attack runs; the tests that are
        # about them turn them on (test_end_to_end_files_numbers_and_wandb, tests/test_checks.py)
        "benchmark.protocols": "[single,worst_of_n,mean_of_n,ever_broken]",
        "benchmark.checks": "false",
    }
    out.update(extra)
    selected = out["attack"].strip("[]").split(",")
    out = {k: v for k, v in out.items() if not k.startswith("attacks.") or k.split(".")[1] in selected}
    return tiny_overrides(tmp, **out)


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory) -> Path:
    """Classifier and score net trained for seconds on 2000 Fashion-MNIST images (shared by tests)."""
    from advpure.config import compose as C
    from advpure.jobs.train import train

    tmp = tmp_path_factory.mktemp("tiny")
    cfg = C.load("fmnist", tiny_overrides(tmp, **TINY_TRAIN))
    train(cfg)
    return tmp / "artifacts"


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny nets: tiny convolutions are ~100x slower with 2 threads
    on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
