"""The diffusion net families by name: an arch dict {"family": ..., **constructor arguments} (what the
importers record and the diffusion network kinds store with their weights) -> the untrained net."""

from __future__ import annotations

from advpure.nets.adm import ADMUNet
from advpure.nets.ddpm import DDPMUNet
from advpure.nets.diffusion import DiffusionNet
from advpure.nets.ncsnpp import NCSNpp

DIFFUSION_FAMILIES = ("ncsnpp", "ddpm", "adm")


def build_diffusion_net(arch) -> DiffusionNet:
    """The untrained net of an arch dict ``{"family": "ncsnpp" | "ddpm" | "adm", **constructor arguments}``
    (what the importers record and the diffusion network kinds store with their weights; lists stand for
    the constructors' tuples). Raises ValueError for an unknown family."""
    arch = dict(arch)
    family = arch.pop("family", None)
    cls = {"ncsnpp": NCSNpp, "ddpm": DDPMUNet, "adm": ADMUNet}.get(family)
    if cls is None:
        raise ValueError(f"unknown diffusion net family {family!r} (known: {', '.join(DIFFUSION_FAMILIES)})")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in arch.items()})


__all__ = ["DIFFUSION_FAMILIES", "build_diffusion_net"]
