"""The diffusion network kinds (ddpmpp, ddpm, adm): registered blocks / stages / importers, `advpure
import-weights` on official-format files written here (random weights, a different EMA copy) loaded back
through the kind and the config equal to the independent reference forward, --force and --no-ema; the
`ddpmpp` training stage: exported EMA weights, loss per t-bucket, a NaN step naming the last good
checkpoint, and a resumed run reaching the weights of an uninterrupted one (kill -9 in the slow suite)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from advpure import cli
from advpure.api import load_net, load_net_with_meta
from advpure.config import compose as C
from advpure.core.errors import ConfigError, TrainingError
from advpure.jobs.artifacts import Artifacts
from advpure.nets.weights import file_sha256, read_weights
from conftest import needs_fmnist, tiny_overrides
from helpers import reference_adm as RA
from helpers import reference_diffusion as R
from helpers.diffusion_files import write_adm, write_ddpm, write_score_sde


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    yield


U = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2 - 1


def _equal_to_reference(net, ref_sd: dict, forward, cfg: dict, labels, t) -> None:
    """The loaded net (run in float64) equals the reference forward on `ref_sd` to 1e-10."""
    net = net.double()
    with torch.no_grad():
        out = net.output(U, t)
        ref = forward({k: v.double() for k, v in ref_sd.items()}, U, labels, cfg)
    assert (out - ref).abs().max().item() < 1e-10


def _artifacts(tmp_path: Path, kind: str, weights: Path) -> Artifacts:
    """The embedded default's config (28x28 options) with the kind's weights at `weights`."""
    cfg = C.load("fmnist", tiny_overrides(tmp_path, **{f"{kind}.weights": weights}))
    return Artifacts.from_config(cfg)


def test_kinds_blocks_stages_groups_and_importers():
    from advpure.importers import importers
    from advpure.nets.registry import NET_KINDS

    names = list(NET_KINDS)
    assert names[names.index("ebm") + 1 :][:3] == ["ddpmpp", "ddpm", "adm"]
    assert all(NET_KINDS.get(k).signature == "eps" for k in ("ddpmpp", "ddpm", "adm"))
    stages = C.train_stages()
    assert "ddpmpp" in stages and "ddpm" in stages and "adm" not in stages
    assert {k: importers()[k][0] for k in ("score_sde", "ddpm", "adm")} == {
        "score_sde": "ddpmpp",
        "ddpm": "ddpm",
        "adm": "adm",
    }
    fm, cf = C.load("fmnist"), C.load("cifar10_paper")
    assert (fm.ddpmpp.nf, cf.ddpmpp.nf, cf.ddpmpp.num_res_blocks, cf.ddpmpp.ema_decay) == (16, 128, 8, 0.9999)
    assert (cf.ddpmpp.lr, cf.ddpmpp.warmup, cf.ddpmpp.grad_clip, cf.ddpmpp.t_eps) == (2e-4, 5000, 1.0, 1e-5)
    # the CIFAR-10 options are the published nets (counted on the meta device)
    art = Artifacts.from_config(cf)
    for kind, count in (("ddpmpp", 106_632_579), ("ddpm", 35_746_307)):
        with torch.device("meta"):
            net = NET_KINDS.get(kind).build(art.arch(kind))
        assert sum(p.numel() for p in net.parameters()) == count
        assert "import-weights" in art.how_to_get(kind)
    # ADM's ImageNet option on grey 28x28 data is refused with a one-line pointer (a 256 net on 224 RGB
    # images is allowed: DiffPure resizes around its chain)
    with pytest.raises(
        ConfigError, match="adm: the block's nets take 3-channel images, the dataset's have 1"
    ):
        Artifacts.from_config(C.load("fmnist", ["adm=adm_imagenet256"])).arch("adm")
    with pytest.raises(ConfigError, match="ddpmpp.ch_mult: must be a list of positive integers"):
        C.load("fmnist", ["ddpmpp.ch_mult=[1,0]"])


def test_score_sde_import_cli_loads_through_the_kind_and_the_config(tmp_path, capsys):
    cfg = R.SMALL_28["ncsnpp"]
    src, out = tmp_path / "checkpoint_8.pth", tmp_path / "w" / "ddpmpp.pt"
    obj = write_score_sde(src, cfg)
    names = list(R.ddpmpp_shapes(cfg))
    ema = dict(zip(names, obj["ema"]["shadow_params"]))
    raw = {n: obj["model"][f"module.{n}"] for n in names}
    assert cli.main(["import-weights", "score_sde", str(src), str(out), "--config", "ddpmpp_28"]) == 0
    line = capsys.readouterr().out
    assert "weights: ema" in line and "step 1234" in line and file_sha256(src)[:12] in line
    net, arch, meta = load_net_with_meta(out)
    assert arch["family"] == "ncsnpp" and meta["ema"] is True and meta["source_sha256"] == file_sha256(src)
    assert meta["schedule"].startswith("continuous VP") and meta["parameters"] == 317_121
    t = torch.tensor([0.05, 0.7], dtype=torch.float64)
    _equal_to_reference(net, ema, R.ddpmpp_forward, cfg, 999 * t, t)
    # the config's 28x28 option loads the imported file (same arch dict) with its schedule
    loaded, _ = _artifacts(tmp_path, "ddpmpp", out).load("ddpmpp")
    assert loaded.schedule.describe() == meta["schedule"] and not loaded.training
    # an existing output is refused before the input is read, replaced with --force
    assert (
        cli.main(["import-weights", "score_sde", str(src), str(out), "--config", "ddpmpp_28", "--no-ema"])
        == 1
    )
    assert "exists; pass --force to replace it" in capsys.readouterr().err
    assert read_weights(out)["meta"]["ema"] is True
    argv = ["import-weights", "score_sde", str(src), str(out), "--config", "ddpmpp_28", "--no-ema", "--force"]
    assert cli.main(argv) == 0
    net_raw, _, meta_raw = load_net_with_meta(out)
    assert meta_raw["ema"] is False and meta_raw["weights"] == "raw (model)"
    _equal_to_reference(net_raw, raw, R.ddpmpp_forward, cfg, 999 * t, t)
    # the input itself is never an output
    assert cli.main(["import-weights", "score_sde", str(src), str(src), "--force"]) == 1
    assert "is the input file" in capsys.readouterr().err


def test_score_sde_import_cli_bad_file_is_one_line(tmp_path, capsys):
    """A list of the wrong order and an HTML page (a failed Drive download): one line, nothing written."""
    src, out = tmp_path / "ckpt.pth", tmp_path / "ddpmpp.pt"

    def swap(o):
        sp = o["ema"]["shadow_params"]
        sp[0], sp[1] = sp[1], sp[0]

    write_score_sde(src, R.SMALL_28["ncsnpp"], mutate=swap)
    assert cli.main(["import-weights", "score_sde", str(src), str(out), "--config", "ddpmpp_28"]) == 1
    err = capsys.readouterr().err
    assert "not in the net's parameter order" in err and err.count("\n") == 1 and not out.exists()
    src.write_text("<!DOCTYPE html><html><title>Google Drive - Virus scan warning</title></html>")
    assert cli.main(["import-weights", "score_sde", str(src), str(out)]) == 1
    assert "HTML page" in capsys.readouterr().err and not out.exists()


def test_ddpm_import_cli_loads_through_the_kind(tmp_path, capsys):
    cfg = R.SMALL_28["ddpm"]
    src, out = tmp_path / "model-790000.ckpt", tmp_path / "ddpm.pt"
    sd = write_ddpm(src, cfg)
    assert cli.main(["import-weights", "ddpm", str(src), str(out), "--config", "ddpm_28"]) == 0
    assert "step 790000" in capsys.readouterr().out
    net, arch, meta = load_net_with_meta(out)
    assert arch["family"] == "ddpm" and meta["published_file"] is None and meta["ema"] is None
    assert meta["weights"].startswith("unknown") and meta["step"] == 790000
    t = torch.tensor([0.1, 1.0], dtype=torch.float64)
    _equal_to_reference(net, sd, R.ddpm_forward, cfg, torch.tensor([99.0, 999.0], dtype=torch.float64), t)
    assert _artifacts(tmp_path, "ddpm", out).load("ddpm")[0].schedule.steps == 1000
    # the DDPM file holds one set of weights: no --no-ema
    assert cli.main(["import-weights", "ddpm", str(src), str(out), "--no-ema", "--force"]) == 2
    assert "unrecognized arguments: --no-ema" in capsys.readouterr().err


def test_adm_import_cli_loads_through_the_kind(tmp_path, capsys):
    cfg = R.SMALL_28["adm"]
    src, out = tmp_path / "256x256_diffusion_uncond.pt", tmp_path / "adm.pt"
    sd = write_adm(src, cfg)  # float16, as the original runs its torso
    assert cli.main(["import-weights", "adm", str(src), str(out), "--config", "adm_28"]) == 0
    capsys.readouterr()
    net = load_net(out, "adm")
    assert next(net.parameters()).dtype == torch.float32 and net.learn_sigma
    assert read_weights(out)["meta"]["file_dtypes"] == "float16"
    t = torch.tensor([0.001, 0.5], dtype=torch.float64)
    _equal_to_reference(net, sd, RA.adm_forward, cfg, torch.tensor([0.0, 499.0], dtype=torch.float64), t)
    assert _artifacts(tmp_path, "adm", out).load("adm")[0].image_size == 28
    # a DDPM file is not an ADM one
    write_ddpm(tmp_path / "ddpm.ckpt", R.SMALL_28["ddpm"])
    assert (
        cli.main(
            [
                "import-weights",
                "adm",
                str(tmp_path / "ddpm.ckpt"),
                str(tmp_path / "x.pt"),
                "--config",
                "adm_28",
            ]
        )
        == 1
    )
    assert "missing key 'time_embed.0.weight'" in capsys.readouterr().err


# ---------------------------------------------------------------- training stage


TINY_DIFFUSION = {
    "train.stages": "[ddpmpp]",
    "ddpmpp.nf": 8,
    "ddpmpp.ch_mult": "[1,2]",
    "ddpmpp.batch_size": 16,
    "ddpmpp.max_steps": 8,
    "ddpmpp.warmup": 2,
    "ddpmpp.ckpt_every_n_steps": 4,
    "ddpmpp.val_every_n_steps": 8,
    "ddpmpp.val_batches": 1,
    "ddpmpp.ema_decay": 0.9,
    "data.train_subset": 400,
    "data.val_size": 100,
    "data.eval_batch_size": 50,
    "trainer.num_threads": 1,
}


def _diffusion_overrides(tmp: Path, **extra) -> list[str]:
    return tiny_overrides(tmp, **{**TINY_DIFFUSION, **extra})


@needs_fmnist
def test_tiny_training_exports_the_ema_and_logs_the_t_buckets(tmp_path):
    from advpure.jobs.train import train

    cfg = C.load(
        "fmnist", _diffusion_overrides(tmp_path, **{"logger.kind": "csv", "trainer.log_every_n_steps": 1})
    )
    meta = train(cfg)["ddpmpp"]
    assert meta["steps"] == 8 and meta["ema_updates"] == 8 and meta["weights"] == "ema"
    assert meta["schedule"].startswith("continuous VP") and "val/psnr_gain_t0.1" in meta
    assert meta["val/psnr_noisy_t0.1"] > 10  # x + 0.17 z, clamped to [0, 1]
    net = load_net(cfg.ddpmpp.weights, "ddpmpp")
    assert net(torch.zeros(2, 1, 28, 28), torch.tensor([0.1, 0.9])).shape == (2, 1, 28, 28)
    ckpt = torch.load(tmp_path / "runs/train/fmnist/ddpmpp/checkpoints/last.ckpt", weights_only=True)
    w = read_weights(cfg.ddpmpp.weights)["state_dict"]
    assert all(torch.equal(v, ckpt["state_dict"][f"ema.shadow.{k}"]) for k, v in w.items())
    assert any(not torch.equal(v, ckpt["state_dict"][f"net.{k}"]) for k, v in w.items())
    header = next((tmp_path / "runs").rglob("metrics.csv")).read_text().splitlines()[0].split(",")
    buckets = ["t0.0-0.2", "t0.2-0.4", "t0.4-0.6", "t0.6-0.8", "t0.8-1.0"]
    assert all(f"val/loss_{b}" in header for b in buckets)
    assert sum(f"train/loss_{b}" in header for b in buckets) >= 4 and "train/lr" in header


@needs_fmnist
def test_ddpm_stage_trains_on_the_discrete_chain(tmp_path):
    from advpure.jobs.train import train

    ddpm = {"train.stages": "[ddpm]", "ddpm.ch_mult": "[1,2]", "ddpm.batch_size": 8, "ddpm.max_steps": 3,
            "ddpm.warmup": 1, "ddpm.ckpt_every_n_steps": 3, "ddpm.val_every_n_steps": 3, "ddpm.val_batches": 1}  # fmt: skip
    cfg = C.load("fmnist", _diffusion_overrides(tmp_path, **ddpm))
    meta = train(cfg)["ddpm"]
    assert (
        meta["steps"] == 3
        and meta["schedule"].startswith("discrete, T = 1000")
        and meta["ema_warmup"] is True
    )
    assert load_net(cfg.ddpm.weights, "ddpm").schedule.steps == 1000


@needs_fmnist
def test_nan_loss_names_the_step_and_the_last_good_checkpoint(tmp_path, monkeypatch):
    from advpure.jobs.train import train
    from advpure.training import diffusion as D

    original, calls = D.vp_dsm_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 6 else loss

    monkeypatch.setattr(D, "vp_dsm_loss", poisoned)
    cfg = C.load("fmnist", _diffusion_overrides(tmp_path, **{"ddpmpp.val_every_n_steps": 100}))
    with pytest.raises(
        TrainingError, match=r"diffusion DSM loss is nan at step 6; last good checkpoint: .*step0000004\.ckpt"
    ):
        train(cfg)
    assert not os.path.exists(cfg.ddpmpp.weights)  # nothing exported from a diverged run


@needs_fmnist
def test_resumed_run_reaches_the_uninterrupted_weights(tmp_path):
    """Stopped at step 4 (its step checkpoint) and resumed to 8: the weights, EMA included, equal a run
    straight to 8 (keyed t, noise and dropout; optimizer, warmup schedule and EMA count restored)."""
    from advpure.jobs.train import train

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(C.load("fmnist", _diffusion_overrides(straight)))
    train(C.load("fmnist", _diffusion_overrides(stopped, **{"ddpmpp.max_steps": 4})))
    weights = stopped / "artifacts/fmnist/ddpmpp.pt"
    first = read_weights(weights)
    assert first["meta"]["steps"] == 4
    weights.unlink()  # the stage is skipped while its weights exist
    train(C.load("fmnist", _diffusion_overrides(stopped)))
    a, b = read_weights(straight / "artifacts/fmnist/ddpmpp.pt"), read_weights(weights)
    assert (
        a["meta"]["steps"] == b["meta"]["steps"] == 8 and a["meta"]["ema_updates"] == b["meta"]["ema_updates"]
    )
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert any(not torch.equal(first["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


@pytest.mark.slow
@needs_fmnist
def test_kill_9_and_resume_reaches_the_uninterrupted_weights(tmp_path):
    extra = {"ddpmpp.max_steps": 40, "ddpmpp.ckpt_every_n_steps": 5, "ddpmpp.val_every_n_steps": 40}

    def cmd(tmp):
        return [sys.executable, "-m", "advpure", "train", *_diffusion_overrides(tmp, **extra)]

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(cmd(straight), check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(cmd(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = killed / "runs/train/fmnist/ddpmpp/checkpoints"
    t0 = time.time()
    while not (ckpts / "step0000010.ckpt").exists() and proc.poll() is None and time.time() - t0 < 300:
        time.sleep(0.05)
    time.sleep(0.3)  # let the checkpoint files be complete
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    weights = killed / "artifacts/fmnist/ddpmpp.pt"
    assert not weights.exists(), "the run finished before it could be killed"
    assert 0 < torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] < 40
    out = subprocess.run(cmd(killed), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resuming from" in out.stdout
    a, b = read_weights(straight / "artifacts/fmnist/ddpmpp.pt"), read_weights(weights)
    assert a["meta"]["steps"] == b["meta"]["steps"] == 40
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


# ---------------------------------------------------------------- pieces of the recipe


def test_ema_warmup_ramp_and_lr_warmup():
    from torch import nn

    from advpure.training.diffusion import DiffusionModule
    from advpure.training.ema import EMA

    lin = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(0.0)
    ema = EMA(lin, 0.999, warmup=True)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema.update(lin)  # d = min(0.999, 2 / 11)
    assert ema.shadow.weight.item() == pytest.approx(9 / 11)
    assert ema.current_decay(441) == pytest.approx(442 / 451) and ema.current_decay(10**6) == 0.999
    assert EMA(lin, 0.999).current_decay(1) == 0.999
    arch = {"family": "ncsnpp", "in_channels": 1, "image_size": 8, "nf": 8, "ch_mult": [1], "num_res_blocks": 1,
            "attn_resolutions": [], "dropout": 0.0, "skip_rescale": True, "beta_min": 0.1, "beta_max": 20.0}  # fmt: skip
    opt = DiffusionModule(arch, lr=1e-3, warmup=4).configure_optimizers()
    lam = opt["lr_scheduler"]["scheduler"].lr_lambdas[0]
    assert [lam(s) for s in (0, 1, 4, 100)] == [0.0, 0.25, 1.0, 1.0]  # score_sde: the first update has lr 0


def test_times_discrete_for_ddpm_and_one_step_x0_with_the_true_noise():
    from advpure.nets.ddpm import build_ddpm
    from advpure.nets.schedules import VPSchedule
    from advpure.training.diffusion import draw_times, one_step_x0

    with torch.device("meta"):
        ddpm = build_ddpm("ddpm_28")
    t = draw_times(ddpm, 4000, torch.Generator().manual_seed(0), "cpu")
    i = t.double() * 1000 - 1
    assert torch.allclose(i, i.round(), atol=1e-3) and i.min() >= 0 and i.max() <= 999
    assert len(set(i.round().long().tolist())) > 900  # all of 0..999, uniformly
    sch = VPSchedule()
    u0, z = torch.rand(3, 1, 4, 4, dtype=torch.float64), torch.randn(3, 1, 4, 4, dtype=torch.float64)
    tt = torch.tensor([0.01, 0.1, 0.9], dtype=torch.float64)
    ab = sch.alpha_bar(tt).view(-1, 1, 1, 1)
    u_t = ab.sqrt() * u0 + (1 - ab).sqrt() * z
    assert torch.allclose(one_step_x0(lambda u, s: z, u_t, tt, sch), u0, atol=1e-12)
