"""The performance suite: its loop-structured reference computes what the batched code computes
(same noise), and a tiny run writes every figure. Correctness only: no timing assertions."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from advpure.attacks import attack_params, eot_gradient, run_attack
from advpure.config import compose as C
from advpure.config.compose import load as load_config
from advpure.core.rng import GeneratorRNG
from advpure.nets import build_classifier, build_score_net
from advpure.perf.reference import (
    reference_adp_purify,
    reference_bpda_eot_attack,
)
from helpers.defenses import adp_defense

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_nets(dtype=torch.float64):
    torch.manual_seed(0)
    score = build_score_net("ncsnv2", in_channels=1, image_size=28, ngf=4)
    clf = build_classifier("small_cnn", in_channels=1, image_size=28, num_classes=10, mean=[0.3], std=[0.35])
    return score.to(dtype).eval().requires_grad_(False), clf.to(dtype).eval().requires_grad_(False)


def batch(n=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 28, 28, generator=g, dtype=torch.float32).to(dtype), torch.randint(
        0, 10, (n,), generator=g
    )


class StopsBrightRows(nn.Module):
    """f(x) = -c (x - 1/2) with c = 100 on rows brighter than 1/2 on average, else 1: ADP's step is
    lambda / c, so bright rows stop at the first step when tau = 1e-3 and the others never do."""

    def forward(self, x):
        c = torch.where(x.flatten(1).mean(1) > 0.5, 100.0, 1.0).to(x.dtype).view(-1, 1, 1, 1)
        return -c * (x - 0.5)


@pytest.mark.parametrize("tau", [0.0, 1e-3])
def test_reference_purification_equals_ours_with_the_same_noise(tau):
    score, clf = tiny_nets()
    x, _ = batch(3)
    s = 4
    defense = adp_defense(clf, score, sigma=0.25, tau=tau, steps=3, replicas=s)
    ours = defense.purify(x, GeneratorRNG(seed=5), s)
    noise = GeneratorRNG(seed=5).normal(s, x)  # the same (S, B, ...) block ours draws
    ref = reference_adp_purify(x, score, noise, sigma=0.25, tau=tau, steps=3)
    assert ref.shape == ours.x.shape == (s * 3, 1, 28, 28)
    torch.testing.assert_close(ref, ours.x, atol=1e-10, rtol=0)


def test_reference_purification_equals_ours_when_some_rows_stop():
    x = torch.cat([torch.full((2, 1, 28, 28), 0.8), torch.full((2, 1, 28, 28), 0.2)]).double()
    defense = adp_defense(nn.Flatten(), StopsBrightRows(), sigma=0.05, tau=1e-3, steps=4, replicas=3)
    ours = defense.purify(x, GeneratorRNG(seed=2), 3)
    assert (ours.steps == 0).any() and (ours.steps == 4).any()  # the compaction path is exercised
    ref = reference_adp_purify(
        x, StopsBrightRows(), GeneratorRNG(seed=2).normal(3, x), sigma=0.05, tau=1e-3, steps=4
    )
    torch.testing.assert_close(ref, ours.x, atol=1e-12, rtol=0)


@pytest.mark.parametrize("tau", [0.0, 1e-3])
def test_reference_bpda_eot_attack_equals_run_attack_with_the_same_noise(tau):
    score, clf = tiny_nets()
    x, y = batch(3)
    s, k, t, iters = 2, 3, 2, 3
    defense = adp_defense(clf, score, sigma=0.25, tau=tau, steps=t, replicas=s)
    spec = attack_params("pgd", gradient="bpda", iters=iters, eot=k, eot_aggregate="mean")
    rng = GeneratorRNG(seed=9)
    res = run_attack(spec, defense, x, y, rng, eps=0.1, step=0.01)
    with torch.no_grad():
        probs = defense(res.x_adv, rng)
    log: list[float] = []
    x_ref, probs_ref = reference_bpda_eot_attack(
        x,
        y,
        score,
        clf,
        GeneratorRNG(seed=9),
        eps=0.1,
        step=0.01,
        iters=iters,
        eot=k,
        replicas=s,
        sigma=0.25,
        tau=tau,
        steps=t,
        log=log,
    )
    assert not torch.equal(res.x_adv, x)  # the attack moved
    torch.testing.assert_close(x_ref, res.x_adv, atol=1e-10, rtol=0)
    torch.testing.assert_close(probs_ref, probs, atol=1e-6, rtol=0)
    # the reference classified every purification iterate: (iters + 1) * K + S chains of T + 1 iterates
    assert len(log) == ((iters + 1) * k + s) * (t + 1)


def test_no_checkpoint_variant_computes_the_same_gradient():
    score, clf = tiny_nets()
    x, y = batch(2)
    grads = []
    for checkpointing in (True, False):
        d = adp_defense(clf, score, sigma=0.25, tau=0.0, steps=3, checkpointing=checkpointing, replicas=2)
        grads.append(eot_gradient(d, x, y, GeneratorRNG(seed=3), gradient="full", eot=2).grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-10, rtol=0)


@pytest.mark.slow  # runs every perf figure (~30 s); `make test-slow`
def test_tiny_suite_writes_every_figure(tmp_path):
    out = tmp_path / "perf.json"
    proc = subprocess.run(
        [sys.executable, "-m", "advpure.perf", "--tiny", "--quick", "--repeats", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    figs = data["figures"]
    attacks = list(load_config("fmnist").attacks)
    required = [
        "P1.overhead",
        "P1.speedup_vs_loop",
        "P1.forward_ms",
        "P1.score_evals_per_chain",
        "P2.speedup_vs_reference",
        "P2.ours_images_per_s",
        "P2.reference_images_per_s",
        "P2.speedup_vs_reference_large_batch",
        "P2.sample_rng_overhead",
        "P2.ours_score_evals_per_image",
        "P3.mem_growth_ckpt",
        "P3.mem_growth_nockpt",
        "P3.time_ratio_ckpt_vs_nockpt_max",
        "P3.mem_per_step_kib_ckpt",
        "P3.mem_per_step_kib_nockpt",
        "P4.overhead",
        "P4.dsm_images_per_s",
        "throughput.classifier_train_images_per_s",
        "throughput.dsm_train_images_per_s",
        "throughput.defended_inference_images_per_s",
        "formats.channels_last_vs_nchw",
        "formats.shipped_vs_nchw",
        "formats.bf16_autocast_vs_fp32",
        "diffusion.mem_ratio_replay",
        "diffusion.time_replay_vs_limit",
        "diffusion.time_checkpoint_vs_replay",
        "diffusion.purify_overhead",
        *[f"throughput.attack.{a}.images_per_s" for a in attacks],
        *[f"P2.score_evals_per_image.{a}" for a in attacks],
        *[f"P2.benchmark_score_evals_per_image.{a}" for a in attacks],
        *[f"peak.{k}_gflops.{dt}" for k in ("matmul", "conv") for dt in ("fp32", "bf16")],
        *[
            f"flops.{k}.{dt}_gflops"
            for k in ("forward", "purify", "bpda_step", "full_step")
            for dt in ("fp32", "bf16")
        ],
        *[
            f"probe.alpha.{f}.{v}.median_rel_diff"
            for f in ("net", "gaussian")
            for v in ("jvp_fp32", "jvp_bf16")
        ],
        "probe.steps_equal.jvp_fp32",
        "probe.speedup_bf16_jvp_vs_fp32_secant.28x28_ngf16",
        "probe.speedup_bf16_jvp_vs_fp32_secant.32x32_ngf4",
    ]
    t_keys = [k for k in figs if k.startswith("P3.peak_mib_ckpt_T")]
    assert len(t_keys) >= 2 and all(k.replace("_ckpt_", "_nockpt_") in figs for k in t_keys)
    missing = [k for k in required if k not in figs]
    assert not missing, missing
    for key, fig in figs.items():
        v = fig["value"]
        assert math.isfinite(v), key
        # counts can be zero (the blind PGD makes no score evaluation), so can the probe's differences and
        # agreement fractions (tiny random nets: alphas at the same clamp); everything else is > 0
        assert v >= 0 if ("score_evals" in key or key.startswith("probe.")) else v > 0, (key, v)
        assert fig["met"] in (None, True, False)
    bpda = C.load("fmnist").attacks.bpda40_eot15  # the suite reads the experiment's budget
    evals = (bpda.iters + 1) * bpda.eot * 2 * C.load("fmnist").defense.steps
    assert data["figures"]["P2.score_evals_per_image.bpda40_eot15"]["value"] == evals
    assert all(c["ok"] for c in data["checks"].values()), data["checks"]
    # every timed figure carries its rate; the run's peaks are in the JSON
    for key in ("P1.overhead", "flops.purify.bf16_gflops", "formats.bf16_autocast_vs_fp32"):
        r = figs[key]["rate"]
        assert r["gflops"] > 0 and r["pct_matmul_peak"] > 0 and r["pct_conv_peak"] > 0, (key, r)
    assert set(data["peaks"]["matmul_gflops"]) == {"fp32", "bf16"} and data["peaks"]["convs"]
    m = data["machine"]
    assert m["cpu_model"] and m["torch"] == torch.__version__ and m["threads"] == 1 and m["device_name"]


def test_a_registered_section_runs_alone_and_writes_its_figure(tmp_path, capsys):
    """A figure is one function registered with `@section`: `--only` runs it (and nothing else)
    and its figure lands in the JSON; an unknown section is a one-line error (exit 2)."""
    from advpure.perf import harness, run
    from advpure.perf.timing import interleaved, paired_ratio

    sections, _ = harness.load_sections()
    assert [s.name for s in sections] == [
        "peak", "P1", "flops", "probe", "P2", "evals", "P3", "diffusion", "P4", "train", "inference", "attacks",
        "formats",
        "compile", "threads",
    ]  # fmt: skip

    @harness.section("toy", order=95)
    def toy(ctx):
        score, _ = harness.make_nets(ctx.sz, ctx.device)
        x = harness.images(4, ctx.sz, ctx.device)[0]
        times, _ = interleaved({"a": lambda: score(x), "b": lambda: score(x[:2])}, ctx.device, ctx.repeats)
        ctx.report.add("toy.four_vs_two_rows", paired_ratio(times["a"], times["b"]), "time ratio")

    try:
        with pytest.raises(ValueError, match="registered twice"):
            harness.section("toy", order=1)(lambda ctx: None)
        out = tmp_path / "perf.json"
        assert run.main(["--tiny", "--only", "toy", "--repeats", "2", "--out", str(out)]) == 0
        data = json.loads(out.read_text())
        assert list(data["figures"]) == ["toy.four_vs_two_rows"]
        assert data["figures"]["toy.four_vs_two_rows"]["value"] > 0 and data["repeats"] == 2
        assert "== toy" in capsys.readouterr().out
        assert run.main(["--tiny", "--only", "toy,nope", "--out", str(out)]) == 2
        assert "unknown section(s) ['nope']" in capsys.readouterr().err
    finally:
        del harness.SECTIONS["toy"]


def test_perf_finds_the_trained_score_net_where_make_train_writes_it(tmp_path, monkeypatch):
    from advpure.perf.run import default_score_weights

    monkeypatch.chdir(tmp_path)
    assert default_score_weights() is None
    (tmp_path / "artifacts" / "fmnist").mkdir(parents=True)
    (tmp_path / "artifacts" / "fmnist" / "score.pt").write_bytes(b"x")
    assert default_score_weights() == "artifacts/fmnist/score.pt"


def test_probe_figures_take_the_trained_score_net_when_given(tiny_artifacts):
    from types import SimpleNamespace

    from advpure.perf.harness import Sizes
    from advpure.perf.probe_bench import _default_net
    from advpure.perf.report import Report

    path = str(tiny_artifacts / "fmnist" / "score.pt")
    ctx = SimpleNamespace(sz=Sizes(), score_weights=path, device=torch.device("cpu"), report=Report())
    net, what = _default_net(ctx)
    assert what == f"trained ({path})" and net.image_size == 28
