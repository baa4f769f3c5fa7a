"""Files in the published diffusion checkpoint formats, with random weights, written by the tests
(tests/test_diffusion_import.py, tests/test_diffusion_kinds.py): the real files are not reachable here.

* `write_score_sde`: score_sde_pytorch's ``checkpoint_8.pth`` layout, the dict {optimizer, model, ema, step}
  (DataParallel keys with the float64 ``sigmas`` buffer first; the EMA a positional list over parameters()
  with weights different from the model's; a real Adam state dict).
* `write_ddpm`: pytorch_diffusion's ``model-790000.ckpt``, a plain state dict.
* `write_adm`: guided-diffusion's ``256x256_diffusion_uncond.pt``, a plain state dict (float16 allowed).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

from helpers import reference_adm as RA
from helpers import reference_diffusion as R


def score_sde_parts(cfg: dict, seed: int = 0):
    """(model, ema, optimizer) as score_sde_pytorch saves them for the NCSN++ config `cfg` (reference names)."""
    shapes = R.ddpmpp_shapes(cfg)
    model = OrderedDict(sigmas=R.vp_sigmas(cfg))
    model.update(R.random_diffusion_state(shapes, seed, torch.float32))
    model = OrderedDict((f"module.{k}", v) for k, v in model.items())
    shadow = list(R.random_diffusion_state(shapes, seed + 1, torch.float32).values())
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))]
    opt = torch.optim.Adam(params, lr=2e-4, eps=1e-8)
    sum(p.sum() for p in params).backward()
    opt.step()
    ema = {"decay": 0.9999, "num_updates": 1234, "shadow_params": shadow}
    return model, ema, opt.state_dict()


def write_score_sde(path: Path, cfg: dict, *, mutate=None, seed: int = 0) -> dict:
    """Write a score_sde checkpoint of config `cfg` (step 1234); `mutate(obj)` edits it first. Returns it."""
    model, ema, opt = score_sde_parts(cfg, seed)
    obj = {"optimizer": opt, "model": model, "ema": ema, "step": 1234}
    if mutate:
        mutate(obj)
    torch.save(obj, path)
    return obj


def write_ddpm(path: Path, cfg: dict, seed: int = 3) -> dict[str, torch.Tensor]:
    """Write a pytorch_diffusion state dict of config `cfg` (float32); returns it."""
    sd = OrderedDict(R.random_diffusion_state(R.ddpm_shapes(cfg), seed, torch.float32))
    torch.save(sd, path)
    return sd


def write_adm(path: Path, cfg: dict, seed: int = 4, dtype=torch.float16) -> dict[str, torch.Tensor]:
    """Write a guided-diffusion state dict of config `cfg` (in `dtype`); returns it."""
    sd = R.random_diffusion_state(RA.adm_shapes(cfg), seed, dtype)
    torch.save(sd, path)
    return sd
