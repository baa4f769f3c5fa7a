"""Network kinds: one module per kind of network (its config block, architecture, weights, training
stage and importers), registered in `advpure.nets.registry.NET_KINDS`. Importing this package
registers the built-in kinds; a user's own kind is registered by importing its module (`plugins:`).

    classifier   the protected classifier (or a RobustBench zoo model)
    score        NCSNv2 score net f ~ sigma grad log p_sigma, trained by DSM
    ebm          maximum-likelihood EBM; its rescaled field c * (-grad E)
    ddpmpp       score_sde NCSN++ / DDPM++ continuous VP, eps(u, t) (DiffPure's CIFAR-10 net), trained by
                 continuous-time DSM; importer `score_sde`
    ddpm         Ho et al.'s DDPM U-Net, eps(u, t) on the 1000-step chain (GDMP's); importer `ddpm`
    adm          guided-diffusion ADM U-Net, eps(u, t) (DiffPure's ImageNet net); importer `adm`
"""

# registration order is the order of the config blocks and the training stages
# isort: off
from advpure.kinds import classifier  # noqa: F401
from advpure.kinds import score  # noqa: F401
from advpure.kinds import ebm  # noqa: F401
from advpure.kinds import ddpmpp  # noqa: F401
from advpure.kinds import ddpm  # noqa: F401
from advpure.kinds import adm  # noqa: F401

# isort: on
from advpure.nets.registry import NET_KINDS, NetKind, net_kind, register_net_kind

__all__ = ["NET_KINDS", "NetKind", "net_kind", "register_net_kind"]
