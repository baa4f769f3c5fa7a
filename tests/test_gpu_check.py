"""`python -m advpure.perf.gpu_check`: its tiny size runs on CPU and writes every figure; it runs where
omegaconf and wandb are not installed; its projection settings are the experiments' own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from advpure.perf import gpu_check, projection

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("fp32", "bf16")
# every figure key of a run, whatever the device (CUDA-only parts: value null on CPU)
KEYS = [
    "nets.score_params",
    "nets.classifier_params",
    *[f"peak.{k}_gflops.{dt}" for k in ("matmul", "conv") for dt in DTYPES],
    *[f"unit.{u}.{dt}" for u in ("t_s", "t_dual", "t_sfb", "t_c", "t_cfb") for dt in DTYPES],
    *[
        f"train.{n}.{dt}.{f}"
        for n in ("dsm", "ce")
        for dt in DTYPES
        for f in ("images_per_s", "peak_mem_bytes")
    ],
    *[
        f"purify.{v}.{f}"
        for v in ("secant_fp32", "jvp_fp32", "jvp_bf16")
        for f in ("images_per_s", "peak_mem_bytes")
    ],
    "purify.speedup_bf16_jvp_vs_fp32_secant",
    "purify.secant_bf16_refused",
    *[f"purify.curvature_err.{v}.median" for v in ("secant_fp32", "jvp_bf16", "secant_bf16")],
    *[
        f"attack.{a}.{dt}.{f}"
        for a in ("bpda_eot", "apgd_full")
        for dt in DTYPES
        for f in ("seconds_per_image", "peak_mem_bytes", "measured_over_formula")
    ],
    "ddp.process_group_initialized",
    "compile.first_call_seconds",
    "compile.speedup_vs_eager",
    *[f"certify.{b}.rows_per_s" for b in ("noisy", "denoised", "adp")],
    "certify.counts_ok",
    *[
        f"project.{e}.{dt}.gpu_hours"
        for e in ("cifar10_croce2022", "cifar10_paper", "cifar10_certify")
        for dt in DTYPES
    ],
]
BLOCKED = "import sys; sys.modules['omegaconf'] = None; sys.modules['wandb'] = None; "


def test_tiny_size_on_cpu_writes_every_figure():
    """One in-process tiny run (~4 s on 2 shared cores, more under load): every part passes or is skipped with its
    reason, every figure key is there, the checks hold."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        doc = gpu_check.run("tiny", torch.device("cpu"))
    finally:
        torch.set_num_threads(n)
    figs, parts = doc["figures"], doc["parts"]
    assert not [k for k in KEYS if k not in figs], [k for k in KEYS if k not in figs]
    assert {k: v["ok"] for k, v in parts.items() if v["ok"] is False} == {}, parts
    for name in ("ddp", "compile"):  # CUDA-only: skipped with a stated reason
        assert parts[name]["ok"] is None and "CUDA-only" in parts[name]["skipped"]
        assert all(figs[k]["value"] is None for k in gpu_check.SKIPPED_KEYS[name])
    assert figs["certify.counts_ok"]["value"] == 1.0 and figs["purify.secant_bf16_refused"]["value"] == 1.0
    assert figs["peak.matmul_gflops.bf16"]["value"] > 0 and figs["unit.t_s.fp32"]["value"] > 0
    assert (
        figs["purify.curvature_err.jvp_bf16.median"]["value"]
        < figs["purify.curvature_err.secant_bf16.median"]["value"]
    )
    for e in projection.SETTINGS:
        assert doc["projections"][e]["gpu_hours"]["fp32"] > 0
    assert json.dumps(doc, default=str)  # serialisable


def test_imports_without_omegaconf_and_wandb():
    """gpu_check and everything its parts import load where omegaconf and wandb are not installed
    (stubbed as missing: importing them raises, find_spec says absent)."""
    code = BLOCKED + (
        "import advpure.perf.gpu_check, advpure.attacks, advpure.certify, advpure.training.losses, "
        "advpure.nets.compiled; "
        "assert sys.modules['omegaconf'] is None and sys.modules['wandb'] is None; print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.slow  # the command itself in a subprocess, omegaconf/wandb blocked, lightning imported (~20 s)
def test_command_runs_with_omegaconf_and_wandb_blocked(tmp_path):
    out = tmp_path / "gpu_check.json"
    code = BLOCKED + (
        "import lightning, runpy; sys.argv = ['gpu_check', '--size', 'tiny', '--device', 'cpu', '--out', sys.argv[1]]; "
        "runpy.run_module('advpure.perf.gpu_check', run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert not [k for k in KEYS if k not in doc["figures"]]
    assert doc["size"] == "tiny" and doc["device"] == "cpu" and doc["seconds"] > 0


@pytest.mark.parametrize(
    "name, attacks",
    [("cifar10_croce2022", None), ("cifar10_paper", ["bpda40_eot15"]), ("cifar10_certify", [])],
)
def test_projection_settings_are_the_experiments(name, attacks):
    assert projection.settings_from_config(name, attacks) == projection.SETTINGS[name]


def test_projection_formulas():
    """The module docstring's formulas, by hand, on round per-row times."""
    t = {"t_s": 1.0, "t_dual": 1.5, "t_sfb": 3.0, "t_c": 0.5, "t_cfb": 1.0}
    assert projection.step_times(t, "fp32") == (2.0, 5.0) and projection.step_times(t, "bf16") == (2.5, 5.5)
    s = projection.SETTINGS["cifar10_paper"]
    a = s.attacks[0]  # BPDA40+EOT15, T = 10, S = 10, N = 10
    assert projection.attack_seconds_per_image(a, s, t, "fp32") == 41 * 15 * (10 * 2 + 1) + 10 * 10 * (
        10 * 2 + 0.5
    )
    c = projection.SETTINGS["cifar10_certify"]
    assert projection.certify_seconds_per_image(c, t, "fp32") == 3 * 100100 * (0.5 + 1.5 + 20.5)
    hours = projection.project({"fp32": t})["cifar10_paper"]["gpu_hours"]["fp32"]
    assert hours == pytest.approx(10000 * projection.attack_seconds_per_image(a, s, t, "fp32") / 3600)
