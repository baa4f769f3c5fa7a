"""Importers of the published diffusion checkpoints (score_sde DDPM++, pytorch_diffusion DDPM, guided-diffusion
ADM): files in the official formats with random weights are written here, imported, and checked against the
independent references; every malformed variant fails with one line."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from advpure.core.errors import CheckpointError
from advpure.importers.adm import read_adm_checkpoint
from advpure.importers.ddpm import read_ddpm_checkpoint
from advpure.importers.score_sde import read_score_sde_checkpoint
from advpure.nets.adm import build_adm
from advpure.nets.ddpm import build_ddpm
from advpure.nets.ncsnpp import build_ncsnpp
from advpure.nets.weights import file_sha256
from helpers import reference_adm as RA
from helpers import reference_diffusion as R
from helpers.diffusion_files import write_score_sde


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    yield


class NotWeights:  # pickled as code: a weights-only load must refuse it
    pass


_write_score_sde = write_score_sde


def _small_forward_check(net, sd_float32: dict, fwd, ref_cfg, labels, t):
    """advpure net with `sd` (upcast to float64) equals the reference forward with the same weights."""
    sd = {k: v.double() for k, v in sd_float32.items()}
    net = net.double().eval()
    net.load_state_dict(sd)  # strict: every key present, none extra
    u = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        out = net.output(u, t)
        ref = fwd(sd, u, labels, ref_cfg)
    assert (out - ref).abs().max().item() < 1e-10
    return out


def test_score_sde_import_ema_and_raw(tmp_path):
    """The whole official file (optimizer state included) reads with weights_only=True; EMA weights by
    default, the raw ones with ema=False; the imported net's forward equals the reference's on those weights."""
    cfg = R.SMALL_28["ncsnpp"]
    path = tmp_path / "checkpoint_8.pth"
    obj = _write_score_sde(path, cfg)
    sd, meta = read_score_sde_checkpoint(path, config="ddpmpp_28")
    names = list(R.ddpmpp_shapes(cfg))
    assert list(sd) == names
    assert all(torch.equal(sd[n], obj["ema"]["shadow_params"][i]) for i, n in enumerate(names))
    assert meta["ema"] is True and meta["step"] == 1234 and meta["ema_num_updates"] == 1234
    assert meta["ema_decay"] == 0.9999 and meta["sigmas_default"] is True and meta["time_label"] == "999 t"
    assert meta["source_sha256"] == file_sha256(path) and meta["parameters"] == sum(
        v.numel() for v in sd.values()
    )
    assert meta["arch"]["family"] == "ncsnpp" and meta["arch"]["nf"] == 16
    t = torch.tensor([0.05, 0.7], dtype=torch.float64)
    out_ema = _small_forward_check(build_ncsnpp("ddpmpp_28"), sd, R.ddpmpp_forward, cfg, 999 * t, t)
    raw, meta_raw = read_score_sde_checkpoint(path, ema=False, config="ddpmpp_28")
    assert meta_raw["ema"] is False
    assert all(torch.equal(raw[n], obj["model"][f"module.{n}"]) for n in names)
    out_raw = _small_forward_check(build_ncsnpp("ddpmpp_28"), raw, R.ddpmpp_forward, cfg, 999 * t, t)
    assert (out_raw - out_ema).abs().max() > 1e-3  # the two copies really differ


def _drop_last(o):
    o["ema"]["shadow_params"].pop()


def _swap_first(o):  # all_modules.0.weight (64, 16) <-> all_modules.0.bias (64,)
    sp = o["ema"]["shadow_params"]
    sp[0], sp[1] = sp[1], sp[0]


def _nan_ema(o):
    o["ema"]["shadow_params"][7][0] = float("nan")


def _nan_model(o):
    o["model"]["module.all_modules.3.Conv_0.weight"][0, 0, 0, 0] = float("inf")


def _del_key(o):
    del o["model"]["module.all_modules.2.bias"]


def _extra_key(o):
    o["model"]["module.extra.weight"] = torch.zeros(1)


def _bad_shape(o):
    o["model"]["module.all_modules.2.weight"] = torch.zeros(16, 3, 3, 3)


def _mixed_prefix(o):
    o["model"]["all_modules.2.bias"] = o["model"].pop("module.all_modules.2.bias")


def _no_sigmas(o):
    del o["model"]["module.sigmas"]


def _not_a_checkpoint(o):
    o.pop("ema")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_drop_last, r"holds 211 tensors, expected 212"),
        (_swap_first, r"shadow_params'\[0\] has shape \(64,\).*not in the net's parameter order"),
        (_nan_ema, r"ema' shadow_params\).*non-finite"),
        (_nan_model, r"'model'\).*all_modules.3.Conv_0.weight.*non-finite"),
        (_del_key, r"missing key 'all_modules.2.bias'"),
        (_extra_key, r"unexpected key 'extra.weight'"),
        (_bad_shape, r"'all_modules.2.weight' has shape \(16, 3, 3, 3\), expected \(16, 1, 3, 3\)"),
        (_mixed_prefix, r"mixes 'module.'-prefixed keys"),
        (_no_sigmas, r"no 'module.sigmas' buffer"),
        (_not_a_checkpoint, r"not a score_sde checkpoint"),
    ],
)
def test_score_sde_rejects(tmp_path, mutate, message):
    path = tmp_path / "ckpt.pth"
    _write_score_sde(path, R.SMALL_28["ncsnpp"], mutate=mutate)
    with pytest.raises(CheckpointError, match=message) as e:
        read_score_sde_checkpoint(path, config="ddpmpp_28")
    assert "\n" not in str(e.value)


READERS = {
    "score_sde": lambda p: read_score_sde_checkpoint(p, config="ddpmpp_28"),
    "ddpm": lambda p: read_ddpm_checkpoint(p, config="ddpm_28"),
    "adm": lambda p: read_adm_checkpoint(p, config="adm_28"),
}


@pytest.mark.parametrize("reader", READERS)
def test_file_level_errors_are_one_line(tmp_path, reader):
    """Missing file, an HTML page (a failed download), a truncated file, pickled code, a wrong file."""
    read = READERS[reader]
    html = tmp_path / "page.pt"
    html.write_text("<!DOCTYPE html><html><head><title>Google Drive</title></head></html>")
    good = tmp_path / "good.pt"
    torch.save({"a.weight": torch.zeros(3)}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    code = tmp_path / "code.pt"
    torch.save({"step": NotWeights()}, code)
    wrong = tmp_path / "wrong.pt"
    torch.save([torch.zeros(2)], wrong)
    cases = [
        (tmp_path / "absent.pt", "not found"),
        (html, "HTML page"),
        (cut, "truncated or not a PyTorch file|corrupt"),
        (code, "pickled code"),
        (wrong, "not a score_sde checkpoint|not a state dict"),
    ]
    for path, message in cases:
        with pytest.raises(CheckpointError, match=message) as e:
            read(path)
        assert "\n" not in str(e.value)


def test_ddpm_import(tmp_path):
    cfg = R.SMALL_28["ddpm"]
    sd0 = R.random_diffusion_state(R.ddpm_shapes(cfg), 3, torch.float32)
    path = tmp_path / "model-790000.ckpt"
    torch.save(OrderedDict(sd0), path)
    sd, meta = read_ddpm_checkpoint(path, config="ddpm_28")
    assert list(sd) == list(sd0) and all(torch.equal(sd[k], sd0[k]) for k in sd0)
    assert meta["step"] == 790000 and meta["ema"] is None and meta["published_file"] is None
    assert meta["source_sha256"] == file_sha256(path) and meta["arch"]["family"] == "ddpm"
    t = torch.tensor([0.1, 1.0], dtype=torch.float64)
    _small_forward_check(
        build_ddpm("ddpm_28"), sd, R.ddpm_forward, cfg, torch.tensor([99.0, 999.0]).double(), t
    )
    # a score_sde checkpoint is not a plain state dict
    _write_score_sde(tmp_path / "sde.pth", R.SMALL_28["ncsnpp"])
    with pytest.raises(CheckpointError, match="not a plain state dict"):
        read_ddpm_checkpoint(tmp_path / "sde.pth", config="ddpm_28")
    # the ADM small state dict is the wrong net
    torch.save(
        R.random_diffusion_state(RA.adm_shapes(R.SMALL_28["adm"]), 0, torch.float32), tmp_path / "adm.pt"
    )
    with pytest.raises(CheckpointError, match="missing key 'temb.dense.0.weight'"):
        read_ddpm_checkpoint(tmp_path / "adm.pt", config="ddpm_28")


def test_adm_import_float16_file(tmp_path):
    """A float16 file (the original's torso dtype) imports as float32 with the same values."""
    cfg = R.SMALL_28["adm"]
    sd0 = R.random_diffusion_state(RA.adm_shapes(cfg), 4, torch.float16)
    path = tmp_path / "256x256_diffusion_uncond.pt"
    torch.save(sd0, path)
    sd, meta = read_adm_checkpoint(path, config="adm_28")
    assert all(sd[k].dtype == torch.float32 and torch.equal(sd[k], sd0[k].float()) for k in sd0)
    assert meta["file_dtypes"] == "float16" and meta["arch"]["family"] == "adm"
    assert meta["output"].startswith("channels [0, 1) eps, [1, 2)")
    t = torch.tensor([0.001, 0.5], dtype=torch.float64)
    _small_forward_check(build_adm("adm_28"), sd, RA.adm_forward, cfg, torch.tensor([0.0, 499.0]).double(), t)


@pytest.mark.slow
def test_official_size_files_import(tmp_path):
    """Full-size official-format files (DDPM++ deep: 106.6 M parameters twice; DDPM CIFAR-10: 35.7 M) with
    random weights import, with the official parameter counts."""
    cfg = R.DDPMPP_DEEP_CIFAR10
    path = tmp_path / "checkpoint_8.pth"
    obj = _write_score_sde(path, cfg)
    del obj
    sd, meta = read_score_sde_checkpoint(path)
    assert meta["parameters"] == 106_632_579 == sum(v.numel() for v in sd.values()) and len(sd) == 956
    del sd
    ddpm = R.random_diffusion_state(R.ddpm_shapes(R.DDPM_CIFAR10), 0, torch.float32)
    torch.save(ddpm, tmp_path / "model-790000.ckpt")
    sd, meta = read_ddpm_checkpoint(tmp_path / "model-790000.ckpt")
    assert meta["parameters"] == 35_746_307 and len(sd) == 328
