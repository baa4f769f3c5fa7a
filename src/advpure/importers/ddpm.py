"""Import Ho et al.'s DDPM CIFAR-10 weights (GDMP's model) as the state dict of `advpure.nets.ddpm.DDPMUNet`.

File format: the PyTorch conversion of the official TensorFlow checkpoints by pesser/pytorch_diffusion
(``pytorch_diffusion/ckpt_util.py``): ``diffusion_cifar10_model/model-790000.ckpt`` (raw weights) and
``ema_diffusion_cifar10_model/model-790000.ckpt`` (EMA weights), each a plain ``torch.save`` of
``Model.state_dict()`` -- 328 tensors, ``temb.dense.0.weight`` ... ``conv_out.bias``, 35,746,307 parameters.
The EMA and raw weights are separate files, so the file itself cannot say which it holds: the importer
compares its MD5 with the two that ``ckpt_util.py`` publishes (``MD5_MAP``) and records the answer.

`read_ddpm_checkpoint` reads the file with ``torch.load(weights_only=True)``, checks every key, shape and
value against the net and the parameter count, and returns the float32 state dict and provenance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from advpure.core.errors import CheckpointError
from advpure.importers.diffusion_common import (
    checked_float32,
    file_digests,
    meta_net,
    read_plain_state_dict,
)
from advpure.nets.ddpm import DDPM_CONFIGS, DDPMUNet

__all__ = ["SOURCE", "OFFICIAL_PARAMETERS", "PUBLISHED_MD5", "read_ddpm_checkpoint"]

SOURCE = (
    "ema_diffusion_cifar10_model/model-790000.ckpt (or diffusion_cifar10_model/... for the raw weights) from "
    "the URLs in pesser/pytorch_diffusion pytorch_diffusion/ckpt_util.py (URL_MAP 'ema_cifar10' / 'cifar10')"
)
OFFICIAL_PARAMETERS = 35_746_307  # pytorch_diffusion Model(**cifar10_cfg)
PUBLISHED_MD5 = {  # pytorch_diffusion/ckpt_util.py MD5_MAP
    "82ed3067fd1002f5cf4c339fb80c4669": ("cifar10", False),
    "1fa350b952534ae442b1d5235cce5cd3": ("ema_cifar10", True),
}


def read_ddpm_checkpoint(
    path: str | Path, *, config: str | dict = "ddpm_cifar10"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a pytorch_diffusion DDPM state dict for the net of `config` (a name in
    `advpure.nets.ddpm.DDPM_CONFIGS` or constructor arguments; default the CIFAR-10 model).

    Returns (state dict (float32, the official keys), meta): source file name, size, SHA-256 and MD5, the
    published file it matches ("ema_cifar10" / "cifar10" / None), ``ema`` (True / False from the MD5, else
    None: unknown), the step (from a "model-<step>.ckpt" name, else -1), schedule, time label, parameter count,
    ``arch``. Raises CheckpointError (one line): missing / HTML / truncated / code-carrying file, not a plain
    state dict, a missing / unexpected key, a wrong shape, a non-finite value, the wrong parameter count.
    """
    path = Path(path)
    if isinstance(config, str):
        if config not in DDPM_CONFIGS:
            raise CheckpointError(f"unknown DDPM configuration {config!r} (known: {', '.join(DDPM_CONFIGS)})")
        name, cfg = config, dict(DDPM_CONFIGS[config])
    else:
        name, cfg = "custom", dict(config)
    what = "DDPM checkpoint"
    found = read_plain_state_dict(path, what, f"download {SOURCE}")
    net = meta_net(lambda: DDPMUNet(**cfg))
    expected = dict(net.state_dict())
    count = OFFICIAL_PARAMETERS if name == "ddpm_cifar10" else sum(int(v.numel()) for v in expected.values())
    sd = checked_float32(found, expected, f"{what} {path}", count)
    digests = file_digests(path)
    published, ema = PUBLISHED_MD5.get(digests["source_md5"], (None, None))
    stem = path.stem
    step = int(stem.split("-")[-1]) if stem.startswith("model-") and stem.split("-")[-1].isdigit() else -1
    meta = {
        "source": "Ho et al. 2020 DDPM, converted by pesser/pytorch_diffusion",
        **digests,
        "config": name,
        "published_file": published,
        "ema": ema,
        "weights": {True: "ema", False: "raw", None: "unknown (not a published file)"}[ema],
        "step": step,
        "schedule": net.schedule.describe(),
        "time_label": "step index i, t = (i + 1) / T",
        "output": "eps (score = -eps / sqrt(1 - abar(t)))",
        "parameters": count,
        "arch": {"family": "ddpm", **net.config},
    }
    return sd, meta
