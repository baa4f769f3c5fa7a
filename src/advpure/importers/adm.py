"""Import guided-diffusion's 256x256 unconditional ImageNet model (Dhariwal & Nichol 2021; DiffPure's ImageNet
model, ``256x256_diffusion_uncond.pt``) as the state dict of `advpure.nets.adm.ADMUNet`.

File format: a plain ``torch.save`` of ``UNetModel.state_dict()`` (DiffPure's ``runners/diffpure_guided.py``
loads it with ``model.load_state_dict(torch.load(...))`` into ``create_model_and_diffusion(**config)``);
552,814,086 parameters (about 2.2 GB in float32). The original converts the torso to float16 after loading;
the importer returns float32 whatever the file's float dtype.

`read_adm_checkpoint` reads it with ``torch.load(weights_only=True)``, checks every key, shape and value and
the parameter count against the advpure net (built on the meta device: nothing allocated), and returns the
float32 state dict and provenance. The file holds one set of weights (the README does not say whether they
are the EMA); no checksum is published, the importer records the file's SHA-256.
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
from advpure.nets.adm import ADM_CONFIGS, ADMUNet

__all__ = ["SOURCE", "OFFICIAL_PARAMETERS", "read_adm_checkpoint"]

SOURCE = (
    "256x256_diffusion_uncond.pt, linked from the openai/guided-diffusion README "
    "(https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt)"
)
OFFICIAL_PARAMETERS = 552_814_086  # UNetModel as create_model builds it for 256x256_diffusion_uncond.pt


def read_adm_checkpoint(
    path: str | Path, *, config: str | dict = "adm_imagenet256_uncond"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a guided-diffusion UNetModel state dict for the net of `config` (a name in
    `advpure.nets.adm.ADM_CONFIGS` or constructor arguments; default the 256x256 unconditional model).

    Returns (state dict (float32, the official keys), meta): source file name, size, SHA-256 and MD5, the
    file's float dtype, schedule, time label, output layout, parameter count, ``arch``. Raises
    CheckpointError (one line): missing / HTML / truncated / code-carrying file, not a plain state dict, a
    missing / unexpected key, a wrong shape, a non-finite value, the wrong parameter count.
    """
    path = Path(path)
    if isinstance(config, str):
        if config not in ADM_CONFIGS:
            raise CheckpointError(f"unknown ADM configuration {config!r} (known: {', '.join(ADM_CONFIGS)})")
        name, cfg = config, dict(ADM_CONFIGS[config])
    else:
        name, cfg = "custom", dict(config)
    what = "guided-diffusion checkpoint"
    found = read_plain_state_dict(path, what, f"download {SOURCE}")
    net = meta_net(lambda: ADMUNet(**cfg))
    expected = dict(net.state_dict())
    official = name == "adm_imagenet256_uncond"
    count = OFFICIAL_PARAMETERS if official else sum(int(v.numel()) for v in expected.values())
    dtypes = sorted(
        {str(v.dtype).replace("torch.", "") for v in found.values() if isinstance(v, torch.Tensor)}
    )
    sd = checked_float32(found, expected, f"{what} {path}", count)
    c = net.in_channels
    meta = {
        "source": "openai/guided-diffusion (Dhariwal & Nichol 2021), UNetModel",
        **file_digests(path),
        "config": name,
        "file_dtypes": ",".join(dtypes),
        "ema": None,
        "weights": "as published (one set of weights)",
        "step": -1,
        "schedule": net.schedule.describe(),
        "time_label": "step index i, t = (i + 1) / T",
        "output": f"channels [0, {c}) eps, [{c}, {2 * c}) learned-variance v (LEARNED_RANGE)"
        if net.learn_sigma
        else "eps",
        "parameters": count,
        "arch": {"family": "adm", **net.config},
    }
    return sd, meta
