"""The Python API's entry points: a configured defense or any exported net in one call.

>>> from advpure.core import runtime; runtime.configure()      # process settings, before torch
>>> from advpure.api import load_defense, load_net
>>> defense = load_defense("fmnist", ["defense.sigma=0.1"])   # from the experiment's weights
>>> probs = defense(x, SampleRNG(seed=0, index=range(len(x))))
>>> net = load_net("artifacts/fmnist/classifier.pt")           # any weights file, arch from the file
"""

from __future__ import annotations

from torch import nn

import advpure.kinds  # noqa: F401 (registers the built-in network kinds)
from advpure.jobs.artifacts import Artifacts, load_file
from advpure.purify.base import purifier_class
from advpure.purify.defense import Defense, build_defense


def load_net_with_meta(path, kind: str | None = None) -> tuple[nn.Module, dict, dict]:
    """(net, arch, meta) of an advpure weights file (`advpure.jobs.artifacts.load_file`)."""
    return load_file(path, kind)


def load_net(path, kind: str | None = None) -> nn.Module:
    """The net stored in an advpure weights file, eval mode, frozen. Raises CheckpointError."""
    return load_file(path, kind)[0]


def load_defense(experiment: str = "fmnist", overrides=(), *, amp_dtype=None) -> Defense:
    """The configured `Defense` of an experiment (name or .yaml path), from its exported weights:

        >>> defense = load_defense("fmnist", ["defense.sigma=0.1"])

    Raises ConfigError / CheckpointError like the CLI does (missing weights are not trained here)."""
    from advpure.config import compose

    cfg = compose.load(experiment, list(overrides))
    artifacts = Artifacts.from_config(cfg)
    kinds = ["classifier", *purifier_class(cfg.defense.kind).nets(cfg.defense).values()]
    nets = artifacts.nets(kinds)
    spec = artifacts.spec
    return build_defense(
        cfg.defense,
        nets["classifier"],
        nets,
        channels=spec.channels,
        image_size=spec.image_size,
        amp_dtype=amp_dtype,
    )


__all__ = ["load_defense", "load_net", "load_net_with_meta"]
