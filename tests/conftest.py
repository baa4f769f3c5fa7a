"""Shared fixtures: an isolated environment (nothing written to $HOME, W&B offline) and tiny configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True, scope="session")
def _isolated_env(tmp_path_factory):
    """W&B offline, its folders in a temp dir; no SLURM variables leaking into non-SLURM tests."""
    base = tmp_path_factory.mktemp("env")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        os.environ[var] = str(base / var.lower())
        os.makedirs(os.environ[var], exist_ok=True)
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    os.environ.pop("WANDB_API_KEY", None)
    os.environ["ADVPURE_ROOT"] = str(ROOT)
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
