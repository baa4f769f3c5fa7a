"""Import score_sde's DDPM++ deep continuous-VP checkpoint (Song et al. 2021; DiffPure's CIFAR-10 model,
``checkpoint_8.pth``) as the state dict of `advpure.nets.ncsnpp.NCSNpp`.

File format (yang-song/score_sde_pytorch ``utils.py`` ``save_checkpoint``, ``models/ema.py``): ``torch.save`` of

    {"optimizer": Adam.state_dict(), "model": NCSNpp state dict through nn.DataParallel (keys "module.<name>",
     including the buffer "module.sigmas"), "ema": {"decay": float, "num_updates": int,
     "shadow_params": [tensor, ...]}, "step": int}

``shadow_params`` is a positional list over the net's ``parameters()`` (those with requires_grad; for this
configuration all 956). Every part is a plain container of tensors and numbers (the optimizer state too), so
``torch.load(weights_only=True)`` reads the whole file without unpickling code.

DiffPure and DiffBreak load ``model`` with ``strict=False`` and then copy the EMA list over the parameters;
`read_score_sde_checkpoint` instead checks every key and shape of ``model`` against the net, the ``sigmas``
buffer, the list's length and, tensor by tensor, that its shapes follow the parameter order (a swap of two
tensors of the same shape cannot be seen; nothing in the file names the list's entries), finiteness and the
parameter count, and takes the EMA weights unless ``ema=False``.

Download (by hand; nothing here downloads): ``checkpoint_8.pth`` of the ``vp/cifar10_ddpmpp_deep_continuous``
folder in the score_sde_pytorch README's "Pretrained checkpoints" Google Drive (see `SOURCE`); no checksum is
published, the importer records the file's SHA-256.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from advpure.core.errors import CheckpointError
from advpure.core.safe_load import load_torch_file
from advpure.importers.diffusion_common import (
    checked_float32,
    file_digests,
    meta_net,
    unprefixed_state_dict,
)
from advpure.nets.ncsnpp import NCSNPP_CONFIGS, NCSNpp

__all__ = ["SOURCE", "OFFICIAL_PARAMETERS", "OFFICIAL_TENSORS", "VE_SIGMAS", "read_score_sde_checkpoint"]

SOURCE = (
    "checkpoint_8.pth in vp/cifar10_ddpmpp_deep_continuous of the 'Pretrained checkpoints' Google Drive linked "
    "from the yang-song/score_sde_pytorch README (https://drive.google.com/drive/folders/1tFmF_uh57O6lx9ggtZT_5LdonVK2cV-e)"
)
OFFICIAL_PARAMETERS = 106_632_579  # NCSNpp(config) of configs/vp/cifar10_ddpmpp_deep_continuous.py
OFFICIAL_TENSORS = 956
VE_SIGMAS = {"sigma_max": 50.0, "sigma_min": 0.01, "num_scales": 1000}  # default_cifar10_configs.py


def _config(config: str | dict) -> tuple[str, dict]:
    if isinstance(config, str):
        if config not in NCSNPP_CONFIGS:
            raise CheckpointError(
                f"unknown NCSN++ configuration {config!r} (known: {', '.join(NCSNPP_CONFIGS)})"
            )
        return config, dict(NCSNPP_CONFIGS[config])
    return "custom", dict(config)


def _check_sigmas(sigmas: Any, src: str) -> bool:
    """True if the buffer is get_sigmas(config) for the CIFAR-10 defaults; CheckpointError if not a finite,
    positive, decreasing 1-D float tensor."""
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or not sigmas.is_floating_point():
        raise CheckpointError(f"{src}: 'sigmas' is not a 1-D float tensor")
    s = sigmas.double()
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()) or bool((s[1:] >= s[:-1]).any()):
        raise CheckpointError(f"{src}: 'sigmas' are not finite, positive and decreasing")
    ref = torch.exp(
        torch.linspace(
            torch.tensor(VE_SIGMAS["sigma_max"]).log().item(),
            torch.tensor(VE_SIGMAS["sigma_min"]).log().item(),
            VE_SIGMAS["num_scales"],
            dtype=torch.float64,
        )
    )
    return s.numel() == ref.numel() and bool(torch.allclose(s, ref, rtol=1e-6, atol=0))


def _shadow(
    ema: Any, names: list[str], expected: Mapping[str, torch.Tensor], src: str
) -> dict[str, torch.Tensor]:
    """The EMA list as a {parameter name: tensor} dict after checking its length and order (shape by shape)."""
    if not isinstance(ema, Mapping) or "shadow_params" not in ema:
        got = sorted(map(str, ema)) if isinstance(ema, Mapping) else type(ema).__name__
        raise CheckpointError(f"{src}: 'ema' has no 'shadow_params' (found {got})")
    shadow = ema["shadow_params"]
    if not isinstance(shadow, (list, tuple)):
        raise CheckpointError(
            f"{src}: ema 'shadow_params' is a {type(shadow).__name__}, not a list of tensors"
        )
    if len(shadow) != len(names):
        raise CheckpointError(
            f"{src}: ema 'shadow_params' holds {len(shadow)} tensors, expected {len(names)} "
            f"(one per parameter of the net, in parameters() order)"
        )
    for i, (name, value) in enumerate(zip(names, shadow)):
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{src}: ema 'shadow_params'[{i}] is a {type(value).__name__}, not a tensor"
            )
        want = tuple(expected[name].shape)
        if tuple(value.shape) != want:
            raise CheckpointError(
                f"{src}: ema 'shadow_params'[{i}] has shape {tuple(value.shape)}, but parameter {i} ({name!r}) "
                f"has shape {want}: the list is not in the net's parameter order"
            )
    return dict(zip(names, shadow))


def read_score_sde_checkpoint(
    path: str | Path, *, ema: bool = True, config: str | dict = "ddpmpp_deep_cifar10"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a score_sde training checkpoint for the NCSN++ net of `config` (a name in
    `advpure.nets.ncsnpp.NCSNPP_CONFIGS` or constructor arguments; default DiffPure's CIFAR-10 net).

    Returns (state dict, meta): the state dict (float32, the advpure net's keys = the official keys without
    'module.' and without the ``sigmas`` buffer) holds the EMA weights (``ema.shadow_params``) unless
    ``ema=False`` (then ``model``'s raw weights); both copies are checked either way. meta: source file name,
    size, SHA-256 and MD5, step, which weights, the EMA's decay and num_updates, the schedule, the time label,
    the ``sigmas`` buffer's summary, the parameter count and ``arch`` (the net's constructor arguments).
    Raises CheckpointError (one line): missing / HTML / truncated / code-carrying file, not a score_sde
    checkpoint, a missing / unexpected key, a wrong shape, a non-finite value, the wrong parameter count, an
    EMA list of the wrong length or order.
    """
    path = Path(path)
    name, cfg = _config(config)
    src = f"score_sde checkpoint {path}"
    obj = load_torch_file(path, what="score_sde checkpoint", hint=f"download {SOURCE}")
    if not isinstance(obj, Mapping) or not {"model", "ema", "step"} <= set(obj):
        got = sorted(map(str, obj)) if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
        raise CheckpointError(
            f"{src} is not a score_sde checkpoint: expected the dict {{optimizer, model, ema, step}} that "
            f"score_sde_pytorch saves, got {got}"
        )
    model = unprefixed_state_dict(obj["model"], f"{src} ('model')")
    if "sigmas" not in model:
        raise CheckpointError(f"{src}: 'model' has no 'module.sigmas' buffer (not an NCSN++ state dict?)")
    sigmas = model.pop("sigmas")
    sigmas_default = _check_sigmas(sigmas, src)

    net = meta_net(lambda: NCSNpp(**cfg))
    expected = dict(net.state_dict())
    names = [n for n, _ in net.named_parameters()]
    official = name == "ddpmpp_deep_cifar10"
    count = OFFICIAL_PARAMETERS if official else sum(int(expected[n].numel()) for n in names)
    if official and len(names) != OFFICIAL_TENSORS:  # pragma: no cover - guards the net definition itself
        raise CheckpointError(f"internal: NCSNpp has {len(names)} parameter tensors, not {OFFICIAL_TENSORS}")
    raw = checked_float32(model, expected, f"{src} ('model')", count)
    shadow = _shadow(obj["ema"], names, expected, src)
    buffers = {k: v for k, v in model.items() if k not in set(names)}
    ema_sd = checked_float32({**shadow, **buffers}, expected, f"{src} ('ema' shadow_params)", count)
    step = obj["step"]
    step = int(step.item()) if isinstance(step, torch.Tensor) and step.numel() == 1 else step
    ema_info = obj["ema"]
    decay = ema_info.get("decay")
    meta = {
        "source": "yang-song/score_sde_pytorch (Song et al. 2021), NCSN++ / DDPM++ continuous VP",
        **file_digests(path),
        "config": name,
        "step": int(step) if isinstance(step, int) else -1,
        "weights": "ema (ema.shadow_params)" if ema else "raw (model)",
        "ema": bool(ema),
        "ema_decay": float(decay) if isinstance(decay, (int, float)) else float("nan"),
        "ema_num_updates": int(ema_info["num_updates"])
        if isinstance(ema_info.get("num_updates"), int)
        else -1,
        "schedule": net.schedule.describe(),
        "time_label": "999 t",
        "output": "eps (score = -eps / sqrt(1 - abar(t)))",
        "sigmas_buffer": f"{sigmas.numel()} levels {float(sigmas[0]):g} -> {float(sigmas[-1]):g} (unused by VP; dropped)",
        "sigmas_default": bool(sigmas_default),
        "parameters": count,
        "arch": {"family": "ncsnpp", **net.config},
    }
    return (ema_sd if ema else raw), meta
