"""Published weights in: the NCSNv2 checkpoint importer, RobustBench classifiers, and one-line errors for
weights files that are not what they claim (missing, truncated, HTML, code in the pickle)."""

from __future__ import annotations

import builtins
import hashlib
import io
import re
import socket
from pathlib import Path

import pytest
import torch

from advpure import cli
from advpure.certify import score_sigma_range
from advpure.config import compose as C
from advpure.core.errors import CheckpointError, ConfigError
from advpure.core.safe_load import check_torch_file
from advpure.data import get_spec
from advpure.importers import robustbench as rb
from advpure.importers.ncsnv2 import import_ncsnv2
from advpure.importers.robustbench import RobustBenchModel, RobustBenchWideResNet, load_robustbench_classifier
from advpure.kinds.score import NCSNv2Score
from advpure.nets import count_parameters, make_score_net
from advpure.nets.weights import load_weights, read_weights, save_weights
from advpure.training.losses import geometric_sigmas
from conftest import needs_fmnist, tiny_overrides
from helpers.reference_nets import (
    ncsnv2_forward,
    ncsnv2_shapes,
    random_state,
    random_wrn_state,
    wrn_forward,
    wrn_shapes,
)

NGF = 8  # small nets keep every test here at a fraction of a second
HTML = (
    b"<!DOCTYPE html><html><head><meta http-equiv='content-type' content='text/html; charset=utf-8'/>"
    b"<title>Google Drive - Virus scan warning</title></head><body>Google Drive can't scan this file"
    b" for viruses.</body></html>"
)


class _Payload:
    """Unpickling this runs code: it opens (creates) a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


def _one_line_error(capsys, argv) -> str:
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc != 0
    assert err.startswith("advpure: error: ") and err.count("\n") == 1, err
    return err


# --- the NCSNv2 checkpoint --------------------------------------------------------------------------
def _official(seed: int) -> dict[str, torch.Tensor]:
    return random_state(ncsnv2_shapes(NGF, 3), seed)


def _write_official(path: Path, *, sd=None, shadow=None, sigmas=None, n_elements=5) -> Path:
    """A checkpoint as ermongroup/ncsnv2 saves it: [DataParallel state dict with sigmas, optimizer,
    epoch, step, EMA shadow (unprefixed)]."""
    sd = _official(1) if sd is None else sd
    sigmas = geometric_sigmas(50.0, 0.01, 232) if sigmas is None else sigmas
    state = {"module.sigmas": sigmas, **{f"module.{k}": v for k, v in sd.items()}}
    optimizer = {
        "state": {0: {"step": torch.tensor(300000.0), "exp_avg": torch.zeros(3)}},
        "param_groups": [
            {"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "params": [0]}
        ],
    }
    shadow = _official(2) if shadow is None else shadow
    obj = [state, optimizer, 117, 300000, shadow][:n_elements]
    torch.save(obj, path)
    return path


def _cifar_net(weights: Path) -> torch.nn.Module:
    """The normal loading path: the score=ncsnv2_cifar10 config's arch, load_weights, make_score_net."""
    cfg = C.load("cifar10_paper", ["score=ncsnv2_cifar10", f"score.ngf={NGF}", f"score.weights={weights}"])
    arch = NCSNv2Score.arch(cfg.score, get_spec(cfg.data.name))
    net = make_score_net(arch)
    load_weights(cfg.score.weights, "score", arch, net)
    return net.eval()


def test_imported_checkpoint_gives_the_reference_forward(tmp_path, capsys):
    src = _write_official(tmp_path / "checkpoint_300000.pth")
    out = tmp_path / "out" / "score.pt"
    assert cli.main(["import-weights", "ncsnv2", str(src), str(out)]) == 0
    assert "300000" in capsys.readouterr().out
    net = _cifar_net(out)
    x = torch.rand(3, 3, 32, 32)
    ref = ncsnv2_forward(_official(1), x)  # the raw output, before the reference's division by sigma
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5)
        # in float64 the two computations agree to rounding: the same equations, tensor for tensor
        x64 = x.double()
        ref64 = ncsnv2_forward({k: v.double() for k, v in _official(1).items()}, x64)
        torch.testing.assert_close(net.double()(x64), ref64, rtol=1e-10, atol=1e-10)
    meta = read_weights(out)["meta"]
    assert meta["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert meta["element"].startswith("state_dict") and meta["step"] == 300000 and meta["epoch"] == 117
    assert (meta["dsm_levels"], meta["dsm_sigma_max"], round(meta["dsm_sigma_min"], 6)) == (232, 50.0, 0.01)
    # certification reads the net's own DSM range from these keys (not the config's)
    lo, hi = score_sigma_range(meta, score_block=None)
    assert (round(lo, 6), hi) == (0.01, 50.0)
    assert meta["parameters"] == count_parameters(net)


def test_ema_flag_takes_the_shadow(tmp_path):
    src = _write_official(tmp_path / "ckpt.pth")
    assert cli.main(["import-weights", "ncsnv2", str(src), str(tmp_path / "ema.pt"), "--ema"]) == 0
    net = _cifar_net(tmp_path / "ema.pt").double()  # float64: the comparison is about the weights
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        y = net(x)
    shadow = {k: v.double() for k, v in _official(2).items()}
    torch.testing.assert_close(y, ncsnv2_forward(shadow, x), rtol=1e-9, atol=1e-9)
    assert not torch.allclose(
        y, ncsnv2_forward({k: v.double() for k, v in _official(1).items()}, x), atol=1e-2
    )
    assert read_weights(tmp_path / "ema.pt")["meta"]["element"].startswith("ema_shadow")


def _drop(key):
    sd = _official(1)
    del sd[key]
    return {"sd": sd}


def _replace(key, shape):
    sd = _official(1)
    sd[key] = torch.zeros(shape)
    return {"sd": sd}


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            _drop("res4.0.shortcut.weight"),
            r"missing key 'res4\.0\.shortcut\.weight' \(expected shape \(16, 16, 3, 3\)\)",
        ),
        # advpure's earlier layout (1x1 shortcut in stage 3) is refused by name and shape
        (
            _replace("res3.0.shortcut.weight", (16, 16, 1, 1)),
            r"'res3\.0\.shortcut\.weight' has shape \(16, 16, 1, 1\), expected \(16, 16, 3, 3\)",
        ),
        (
            {"sd": {**_official(1), "res5.0.conv1.weight": torch.zeros(1)}},
            r"unexpected key 'res5\.0\.conv1\.weight'",
        ),
        (
            {"sd": {**_official(1), "end_conv.bias": torch.tensor([0.0, float("nan"), 0.0])}},
            r"'end_conv\.bias' holds 1 non-finite",
        ),
        (
            {"sigmas": geometric_sigmas(90.0, 0.01, 500)},
            r"500 levels 90 -> 0\.01, not the NCSNv2 CIFAR-10 schedule.*--any-sigmas",
        ),
    ],
)
def test_bad_state_dicts_are_one_line_errors(tmp_path, capsys, kwargs, message):
    src = _write_official(tmp_path / "ckpt.pth", **kwargs)
    out = tmp_path / "score.pt"
    err = _one_line_error(capsys, ["import-weights", "ncsnv2", str(src), str(out)])
    assert re.search(message, err), err
    assert not out.exists()  # nothing written from a bad checkpoint


def test_other_sigmas_import_when_asked(tmp_path):
    src = _write_official(tmp_path / "ckpt.pth", sigmas=geometric_sigmas(90.0, 0.01, 500))
    _, meta = import_ncsnv2(src, tmp_path / "score.pt", any_sigmas=True)
    assert meta["dsm_levels"] == 500 and meta["sigmas_cifar10"] is False


def test_missing_ema_and_wrong_objects(tmp_path, capsys):
    four = _write_official(tmp_path / "four.pth", n_elements=4)
    err = _one_line_error(capsys, ["import-weights", "ncsnv2", str(four), str(tmp_path / "o.pt"), "--ema"])
    assert "holds no EMA shadow (a list of 4 elements" in err
    # without --ema, element 0 is all it needs
    assert cli.main(["import-weights", "ncsnv2", str(four), str(tmp_path / "o.pt")]) == 0
    advpure_file = tmp_path / "o.pt"  # an advpure weights file is not the reference's list
    err = _one_line_error(capsys, ["import-weights", "ncsnv2", str(advpure_file), str(tmp_path / "p.pt")])
    assert "is not an NCSNv2 training checkpoint" in err and "got a dict" in err
    nosig = tmp_path / "nosig.pth"
    torch.save([{f"module.{k}": v for k, v in _official(1).items()}, {}, 0, 0], nosig)
    assert "no 'module.sigmas' buffer" in _one_line_error(
        capsys, ["import-weights", "ncsnv2", str(nosig), "x.pt"]
    )


def _truncated(tmp_path: Path) -> Path:
    good = _write_official(tmp_path / "good.pth")
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return bad


def _html(tmp_path: Path) -> Path:
    p = tmp_path / "download.pth"
    p.write_bytes(HTML)
    return p


def _code(tmp_path: Path) -> Path:
    p = tmp_path / "code.pth"
    obj = [{"module.sigmas": torch.ones(3)}, _Payload(tmp_path / "MARKER"), 0, 0]
    torch.save(obj, p)
    return p


BAD_FILES = [
    (_truncated, "truncated or not a PyTorch file"),
    (_html, "is an HTML page, not weights: the download failed"),
    (_code, r"contains pickled code; refusing to load it \(it needs (builtins|io)\.open"),
    (lambda t: t / "nope.pth", "not found: .*nope.pth.*drive.google.com"),
]


@pytest.mark.parametrize("make,message", BAD_FILES)
def test_bad_files_are_one_line_errors_and_never_unpickled(tmp_path, capsys, make, message):
    src = make(tmp_path)
    err = _one_line_error(capsys, ["import-weights", "ncsnv2", str(src), str(tmp_path / "score.pt")])
    assert re.search(message, err), err
    assert not (tmp_path / "MARKER").exists()  # the payload's code never ran


@pytest.mark.parametrize("make,message", BAD_FILES[:3])
def test_read_weights_gives_the_same_one_line_errors(tmp_path, make, message):
    with pytest.raises(CheckpointError, match=message) as e:
        read_weights(make(tmp_path))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "MARKER").exists()


def test_corrupt_zip_member_is_caught(tmp_path):
    path = save_weights(tmp_path / "w.pt", "score", {"a": 1}, torch.nn.Linear(64, 64))
    data = bytearray(path.read_bytes())
    i = data.index(b"data/0") + 200  # inside the first tensor's bytes
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="is corrupt: .* fails its CRC check"):
        read_weights(path)
    with pytest.raises(CheckpointError, match="is corrupt"):
        check_torch_file(path)


def test_import_weights_usage(capsys):
    assert cli.main(["import-weights", "--help"]) == 0
    assert "ncsnv2" in capsys.readouterr().out
    assert cli.main(["import-weights", "ncsnv2", "--help"]) == 0
    assert "--ema" in capsys.readouterr().out
    err = _one_line_error(capsys, ["import-weights", "ncsnv2", "only-one-arg"])
    assert "the following arguments are required: out" in err
    with pytest.raises(ConfigError):
        from advpure.importers import main

        main(["caffe", "a", "b"])


# --- RobustBench ------------------------------------------------------------------------------------
def test_robustbench_wrn_layout_and_parameter_counts():
    with torch.device("meta"):
        standard = RobustBenchWideResNet(28, 10)
        carmon = RobustBenchWideResNet(28, 10, sub_block1=True)
    # robustbench 1.1.1's WideResNet(depth=28, widen_factor=10): 36,479,194 parameters; sub_block1 adds a
    # copy of block1 (16 -> 160 channels, 4 blocks): 1,640,672 more
    assert count_parameters(standard) == 36_479_194
    assert count_parameters(carmon) == 36_479_194 + 1_640_672
    got = {k: tuple(v.shape) for k, v in standard.state_dict().items()}
    assert got == wrn_shapes(28, 10)
    for key, shape in {
        "conv1.weight": (16, 3, 3, 3),
        "block1.layer.0.convShortcut.weight": (160, 16, 1, 1),
        "block2.layer.0.conv1.weight": (320, 160, 3, 3),
        "block3.layer.3.bn2.running_var": (640,),
        "bn1.weight": (640,),
        "fc.weight": (10, 640),
        "fc.bias": (10,),
    }.items():
        assert got[key] == shape, key
    assert "block1.layer.1.convShortcut.weight" not in got


@pytest.fixture()
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_robustbench_standard_loads_offline_and_matches_the_reference(tmp_path, no_network):
    torch.manual_seed(0)
    sd = random_wrn_state(wrn_shapes(28, 10), seed=3)
    path = tmp_path / "models" / "cifar10" / "Linf" / "Standard.pt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 200}, path)
    model = load_robustbench_classifier("Standard", "cifar10", "Linf", tmp_path / "models")
    assert not model.training
    assert all(p.device.type == "cpu" for p in model.state_dict().values())
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), wrn_forward(sd, x, 28), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("wrap", ["bare", "state_dict"])
@pytest.mark.parametrize("prefix", ["", "module.", "model."])
def test_robustbench_checkpoint_variants(tmp_path, monkeypatch, wrap, prefix):
    tiny = RobustBenchModel(depth=10, widen=2, gdrive_id="TESTID")
    monkeypatch.setitem(rb.MODELS, ("cifar10", "Linf", "Tiny"), tiny)
    sd = random_wrn_state(wrn_shapes(10, 2), seed=4)
    keyed = {prefix + k: v for k, v in sd.items()}
    path = rb.robustbench_path("Tiny", "cifar10", "Linf", tmp_path)
    path.parent.mkdir(parents=True)
    torch.save(keyed if wrap == "bare" else {"state_dict": keyed}, path)
    model = load_robustbench_classifier("Tiny", model_dir=tmp_path)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), wrn_forward(sd, x, 10), rtol=1e-5, atol=1e-5)


def test_robustbench_errors(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError) as e:
        load_robustbench_classifier("Standard", model_dir=tmp_path / "models")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "models/cifar10/Linf/Standard.pt") in msg
    assert "https://drive.google.com/uc?id=1t98aEuzeTL8P7Kpd5DIrCoCL21BNZUhC" in msg
    with pytest.raises(CheckpointError, match="15tUx-gkZMYx7BfEOw1GY5OKC-jECIsPQ"):
        load_robustbench_classifier("Carmon2019Unlabeled", model_dir=tmp_path)
    with pytest.raises(ConfigError, match="not supported; known: Standard"):
        load_robustbench_classifier("Gowal2020Uncovering", model_dir=tmp_path)

    monkeypatch.setitem(
        rb.MODELS, ("cifar10", "Linf", "Tiny"), RobustBenchModel(10, 2, "TESTID", sub_block1=True)
    )
    path = rb.robustbench_path("Tiny", model_dir=tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(HTML)
    with pytest.raises(
        CheckpointError,
        match="HTML page, not weights: the download failed; get it again: download https://drive.google.com/uc\\?id=TESTID",
    ):
        load_robustbench_classifier("Tiny", model_dir=tmp_path)
    torch.save({"state_dict": {}, "args": _Payload(tmp_path / "MARKER")}, path)
    with pytest.raises(CheckpointError, match="contains pickled code; refusing to load it"):
        load_robustbench_classifier("Tiny", model_dir=tmp_path)
    assert not (tmp_path / "MARKER").exists()
    torch.save(random_wrn_state(wrn_shapes(10, 2), seed=5), path)  # Standard layout, no sub_block1
    with pytest.raises(CheckpointError, match=r"missing key 'sub_block1\.layer\.0\.bn1\.weight'"):
        load_robustbench_classifier("Tiny", model_dir=tmp_path)


# --- Lightning resume ---------------------------------------------------------------------------------
@needs_fmnist
def test_corrupt_resume_checkpoint_is_a_one_line_error(tmp_path):
    from advpure.jobs.train import train

    over = tiny_overrides(
        tmp_path,
        **{
            "train.stages": "[score]",
            "score.ngf": 4,
            "score.batch_size": 16,
            "score.max_steps": 4,
            "score.ckpt_every_n_steps": 2,
            "score.val_every_n_steps": 4,
            "score.val_batches": 1,
            "data.train_subset": 200,
            "data.val_size": 100,
            "data.eval_batch_size": 100,
            "trainer.num_threads": 1,
        },
    )
    cfg = C.load("fmnist", over)
    train(cfg)
    last = Path(cfg.paths.runs) / "train" / "fmnist" / "score" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    good = last.read_bytes()
    Path(cfg.score.weights).unlink()  # the stage runs again and resumes from last.ckpt
    for content, message in (
        (good[: len(good) // 2], "resume checkpoint .*last.ckpt is truncated or not a PyTorch file"),
        (HTML, "resume checkpoint .*last.ckpt is an HTML page"),
    ):
        last.write_bytes(content)
        with pytest.raises(CheckpointError, match=message) as e:
            train(cfg)
        assert "\n" not in str(e.value)
    payload = torch.load(io.BytesIO(good), weights_only=True)
    payload["hyper_parameters"]["arch"]["extra"] = _Payload(tmp_path / "MARKER")
    torch.save(payload, last)
    with pytest.raises(CheckpointError, match="resume checkpoint .*contains pickled code; refusing") as e:
        train(cfg)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "MARKER").exists()
