"""Import the published NCSNv2 checkpoint (Song & Ermon 2020, ermongroup/ncsnv2) as an advpure score net.

The reference training code saves, with ``torch.save``, the Python list

    [state_dict, optimizer_state, epoch, step, ema_shadow]

where ``state_dict`` comes from an ``nn.DataParallel`` wrapper (every key prefixed ``module.``) and
includes the buffer ``sigmas`` (the noise levels: 232 geometric levels 50 -> 0.01 for CIFAR-10), and
``ema_shadow`` maps the unprefixed parameter names to their exponential moving averages (decay 0.999;
parameters only). ADP's code (Yoon, Hwang & Lee 2021) and Croce et al. (2022) load element 0; ``ema=True``
takes the shadow instead.

`import_ncsnv2` reads the file with ``torch.load(weights_only=True)`` (never unpickling code), checks
every key, shape and value against `advpure.nets.NCSNv2` (32x32, the reference architecture), and
writes an advpure weights file (kind "score", the arch dict ``advpure.nets.score_arch`` makes for
``score=ncsnv2_cifar10``) that the normal path (`advpure.nets.weights.load_weights` into
``make_score_net(arch)``) loads. The ``sigmas`` buffer is not a part of the advpure net (its output is
the raw f_theta, which ADP uses, not f_theta / sigma_label): it is checked against the CIFAR-10
schedule and recorded in the file's ``meta``.

Download (by hand; nothing here downloads): the CIFAR-10 checkpoint in the "Pretrained Checkpoints"
Google Drive folder linked from the ermongroup/ncsnv2 README (see `SOURCE`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from advpure.core.errors import CheckpointError
from advpure.core.safe_load import load_torch_file
from advpure.importers.common import check_state_dict, file_sha256, strip_prefixes
from advpure.nets.ncsnv2 import NCSNv2
from advpure.nets.weights import check_weights_output, save_weights
from advpure.training.losses import geometric_sigmas

__all__ = ["SOURCE", "CIFAR10_SIGMAS", "read_ncsnv2_checkpoint", "import_ncsnv2"]

SOURCE = (
    "the CIFAR-10 checkpoint of the ermongroup/ncsnv2 README's 'Pretrained Checkpoints' Google Drive folder, "
    "https://drive.google.com/drive/folders/1217uhIvLg9ZrYNKOR3XTRFSurt4miQrd"
)
# configs/cifar10.yml of the reference: sigma_begin 50, sigma_end 0.01, num_classes 232, geometric
CIFAR10_SIGMAS = {"sigma_max": 50.0, "sigma_min": 0.01, "num": 232}
IMAGE_SIZE = 32  # the reference net is size-agnostic; advpure's reference layout is its 32x32 net


def _state_dict(obj: Any, index: int, source: str) -> dict[str, Any]:
    sd = obj[index]
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) for k in sd):
        raise CheckpointError(
            f"{source}: list element {index} is a {type(sd).__name__}, not a state dict of named tensors"
        )
    return sd


def read_ncsnv2_checkpoint(
    path: str | Path, *, ema: bool = False
) -> tuple[dict[str, Any], torch.Tensor, dict]:
    """Read a reference NCSNv2 checkpoint without building a net.

    Returns (parameters with unprefixed names: element 0 without ``sigmas``, or the EMA shadow if `ema`,
    the ``sigmas`` buffer (1-D float tensor), info {"element", "epoch", "step"}).
    Raises CheckpointError (one line) for a missing / HTML / truncated / code-carrying file, a file that
    is not such a list, no ``sigmas`` buffer, or no EMA shadow when `ema` is asked for.
    """
    path = Path(path)
    src = f"NCSNv2 checkpoint {path}"
    obj = load_torch_file(path, what="NCSNv2 checkpoint", hint=f"download {SOURCE}")
    if not isinstance(obj, (list, tuple)) or len(obj) < 4:
        got = f"a {type(obj).__name__}" + (f" of length {len(obj)}" if isinstance(obj, (list, tuple)) else "")
        raise CheckpointError(
            f"{src} is not an NCSNv2 training checkpoint: expected the list "
            f"[state_dict, optimizer, epoch, step, ema_shadow] that ermongroup/ncsnv2 saves, got {got}"
        )
    raw = _state_dict(obj, 0, src)
    prefixed = [k.startswith("module.") for k in raw]
    if any(prefixed) and not all(prefixed):
        first = next(k for k in raw if not k.startswith("module."))
        raise CheckpointError(f"{src}: element 0 mixes 'module.'-prefixed keys with {first!r}")
    sd0 = strip_prefixes(raw, ("module.",))
    if "sigmas" not in sd0:
        raise CheckpointError(f"{src}: element 0 has no 'module.sigmas' buffer (not an NCSNv2 state dict?)")
    sigmas = sd0.pop("sigmas")
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or not sigmas.is_floating_point():
        raise CheckpointError(f"{src}: 'sigmas' is not a 1-D float tensor")
    epoch, step = obj[2], obj[3]
    info = {
        "epoch": int(epoch) if isinstance(epoch, int) else -1,
        "step": int(step) if isinstance(step, int) else -1,
    }
    if ema:
        if len(obj) < 5:
            raise CheckpointError(f"{src} holds no EMA shadow (a list of {len(obj)} elements, not 5)")
        params = strip_prefixes(_state_dict(obj, 4, src), ("module.",))
        info["element"] = "ema_shadow (list element 4)"
    else:
        params = sd0
        info["element"] = "state_dict (list element 0)"
    return params, sigmas, info


def _check_sigmas(sigmas: torch.Tensor, src: str) -> bool:
    """True if `sigmas` is the CIFAR-10 schedule; CheckpointError if they are not positive and decreasing."""
    s = sigmas.double()
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()) or bool((s[1:] >= s[:-1]).any()):
        raise CheckpointError(f"{src}: 'sigmas' are not positive and strictly decreasing")
    ref = geometric_sigmas(CIFAR10_SIGMAS["sigma_max"], CIFAR10_SIGMAS["sigma_min"], CIFAR10_SIGMAS["num"])
    return s.numel() == ref.numel() and bool(torch.allclose(s, ref.double(), rtol=1e-5, atol=0))


def import_ncsnv2(
    src: str | Path,
    dst: str | Path,
    *,
    ema: bool = False,
    any_sigmas: bool = False,
    force: bool = False,
) -> tuple[Path, dict]:
    """Convert the reference NCSNv2 checkpoint `src` into the advpure score weights file `dst`.

    The net is `NCSNv2(in_channels, ngf, 32)` with ngf and in_channels read off ``begin_conv.weight``
    (ngf 128 and 3 channels for the CIFAR-10 checkpoint: 29,694,083 parameters). Element 0 of the list
    by default (what ADP's code and Croce et al. 2022 use); `ema` takes the EMA shadow. The checkpoint's
    ``sigmas`` must be the CIFAR-10 schedule (232 geometric levels 50 -> 0.01) unless `any_sigmas`.
    Returns (dst, meta); meta (also in the file) records the source file's name and SHA-256, the list
    element, epoch, step and the sigma schedule.
    `dst` must not exist unless `force` (`--force` on the command line), and may not be `src` itself,
    a folder or a non-regular file: checked before the checkpoint is read (`check_weights_output`).
    Raises CheckpointError naming the first missing / unexpected key, wrong shape or non-finite tensor,
    or the refused output; StorageError (one line) when `dst` cannot be written.
    """
    check_weights_output(dst, force=force, force_hint="--force", inputs=[src])
    src, dst = Path(src), Path(dst)
    where = f"NCSNv2 checkpoint {src}"
    params, sigmas, info = read_ncsnv2_checkpoint(src, ema=ema)
    is_cifar10 = _check_sigmas(sigmas, where)
    if not is_cifar10 and not any_sigmas:
        raise CheckpointError(
            f"{where}: its sigmas are {sigmas.numel()} levels {float(sigmas[0]):g} -> {float(sigmas[-1]):g}, "
            f"not the NCSNv2 CIFAR-10 schedule (232 levels 50 -> 0.01); pass --any-sigmas to import it anyway"
        )
    w = params.get("begin_conv.weight")
    if not isinstance(w, torch.Tensor) or w.ndim != 4 or tuple(w.shape[2:]) != (3, 3):
        raise CheckpointError(f"{where}: missing key 'begin_conv.weight' (a (ngf, channels, 3, 3) tensor)")
    ngf, in_channels = int(w.shape[0]), int(w.shape[1])
    with torch.device("meta"):
        expected = NCSNv2(in_channels, ngf, IMAGE_SIZE).state_dict()
    check_state_dict(params, expected, f"{where} ({info['element']})")
    net = NCSNv2(in_channels, ngf, IMAGE_SIZE)
    net.load_state_dict({k: v.float() for k, v in params.items()})
    arch = {"arch": "ncsnv2", "ngf": ngf, "in_channels": in_channels, "image_size": IMAGE_SIZE}
    meta = {
        "source": "ermongroup/ncsnv2 (Song & Ermon 2020)",
        "source_file": src.name,
        "source_sha256": file_sha256(src),
        "element": info["element"],
        "epoch": info["epoch"],
        "step": info["step"],
        "dsm_levels": int(sigmas.numel()),  # the net's DSM noise levels (certification reads them)
        "dsm_sigma_max": float(sigmas[0]),
        "dsm_sigma_min": float(sigmas[-1]),
        "sigmas_cifar10": bool(is_cifar10),
        "output": "raw f_theta (not divided by sigma), as ADP uses it",
        "parameters": int(sum(p.numel() for p in net.parameters())),
    }
    save_weights(dst, "score", arch, net, meta, force=force, force_hint="--force", inputs=[src])
    return dst, meta
