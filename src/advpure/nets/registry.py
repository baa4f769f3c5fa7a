"""Network kinds: one registered class per kind of network (like score_sde's `register_model`).

A network kind says everything the commands need to know about one family of nets:

    @register_net_kind("score")
    class NCSNv2Score(NetKind):
        '''NCSNv2 score net f ~ sigma grad log p_sigma (Song & Ermon 2020), trained by DSM.'''

        Config = ScoreConfig                  # the typed config block `score:` (has a `weights` path)
        signature = "field"                   # what a purifier is handed: f(x) on [0, 1] images
        field = "dsm"                         # the name `defense.field` gives this kind
        importers = {"ncsnv2": NCSNv2Import}  # `advpure import-weights ncsnv2 ...`

        @classmethod
        def arch(cls, block, spec) -> dict: ...          # the fields stored with the weights
        @classmethod
        def build(cls, arch) -> nn.Module: ...
        @classmethod
        def train(cls, block, ctx) -> dict: ...          # optional: the training stage

Config composition adds the kind's block (and its `conf/<name>/` group), `advpure train` its stage
(`train.stages=[score]`), `advpure import-weights` its importers' subcommands, and the benchmark
loads its weights when a purifier declares it (`Purifier.nets`). A kind from the user's own package
is registered by importing that module (`plugins: [mypkg.kinds]` in an experiment, or the
`ADVPURE_PLUGINS` environment variable).

Signatures (what `Defense` hands a purifier for a net of the kind; every call is counted, chunked
to the memory budget and run at the defense's purification precision):
  * "classifier": x (R, C, H, W) in [0, 1] -> logits (R, K)
  * "field":      x (R, C, H, W) in [0, 1] -> f(x) of x's shape (a time-free score field)
  * "eps":        u (R, C, H, W) in [-1, 1], t (R,) in [0, 1] -> eps_theta(u, t) (diffusion nets;
                  the module carries `.schedule`, `advpure.nets.schedules`)
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from advpure.core.registry import Registry

SIGNATURES = ("classifier", "field", "eps")


class StageContext(Protocol):
    """What a training stage gets from `advpure train` (implemented by `advpure.jobs.stages`).

    seed, experiment: the run's; data: the `data` block; weights: where the stage exports;
    run_dir: the stage's checkpoint folder; log_images: whether to send images to the logger."""

    seed: int
    experiment: str
    data: Any
    weights: Path
    run_dir: Path
    log_images: bool
    max_epochs: int

    def datamodule(self, **overrides: Any) -> Any:
        """The data module of the run's `data` block (`overrides`: batch_size, crop_padding, hflip)."""

    def fit(
        self, module: Any, dm: Any, *, steps: int | None = None, epochs: int | None = None, **options: Any
    ) -> Any:
        """Fit `module` (resuming from the stage's newest checkpoint), checkpointing every
        `options["ckpt_every_n_steps"]` steps or every epoch; returns the Lightning Trainer."""

    def export(self, arch: dict, net: nn.Module, meta: dict) -> Path:
        """Write the stage's weights file (rank 0) and wait for every rank."""

    def say(self, message: str) -> None:
        """One progress line on rank 0."""


class Importer:
    """One `advpure import-weights <source>` subcommand: reads a published checkpoint format and
    writes an advpure weights file of its network kind. Subclasses set `help`, `description` and
    implement `add_arguments` and `run`."""

    help: str = ""
    description: str = ""

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add the subcommand's positional arguments and options (`checkpoint`, `out`, ...)."""
        raise NotImplementedError

    @classmethod
    def run(cls, args: argparse.Namespace) -> str:
        """Convert; return the one line to print. Raises CheckpointError for a bad input file."""
        raise NotImplementedError


class NetKind:
    """Base class of registered network kinds (see the module docstring)."""

    name: str = ""  # set by the registry: the config block key, the conf/ group, the stage name
    Config: type | None = None  # the typed config block (a dataclass with a `weights` field)
    signature: str = "field"  # one of SIGNATURES
    field: str | None = None  # for signature "field": the name `defense.field` uses for this kind
    field_label: str = ""  # how tables and plots name that field ("DSM", "ML-EBM")
    label: str = ""  # a few words for --help and messages
    importers: Mapping[str, type[Importer]] = {}
    trainable: bool = False  # True when the kind defines `train`

    @classmethod
    def check(cls, block: Any) -> None:
        """Checks across the block's fields (config validation); raise a one-line ConfigError."""

    @classmethod
    def arch(cls, block: Any, spec: Any) -> dict:
        """The fields that define the net's weights (stored in its weights file), from the kind's
        config `block` and the dataset `spec` (channels, image size, classes)."""
        raise NotImplementedError

    @classmethod
    def build(cls, arch: Mapping[str, Any]) -> nn.Module:
        """An untrained net of architecture `arch`."""
        raise NotImplementedError

    @classmethod
    def weights_path(cls, block: Any, paths: Any, data_name: str) -> Path:
        """The weights file this kind's block points at (default: `block.weights`)."""
        return Path(block.weights)

    @classmethod
    def load(cls, block: Any, path: Path, spec: Any) -> tuple[nn.Module, dict]:
        """(net in eval mode with frozen weights, meta) from the weights file at `path`, checked
        against the architecture the config asks for (`arch(block, spec)`). Raises CheckpointError."""
        from advpure.nets.weights import load_weights

        arch = cls.arch(block, spec)
        net = cls.build(arch)
        meta = load_weights(path, cls.name, arch, net)
        return cls.prepare(net.eval().requires_grad_(False), meta), meta

    @classmethod
    def prepare(cls, net: nn.Module, meta: Mapping[str, Any]) -> nn.Module:
        """The loaded net as purifiers use it (e.g. with facts from its meta as attributes)."""
        return net

    @classmethod
    def how_to_get(cls, block: Any, path: Path, data_name: str, experiment: str) -> str:
        """Where a missing weights file comes from, in one clause."""
        if cls.trainable:
            return f"{path}: train it with `make train EXP={experiment}` (train.stages=[{cls.name}])"
        return f"{path}: not trainable here; import published weights with `advpure import-weights`"

    @classmethod
    def stage_inputs(cls, block: Any, ctx: StageContext) -> dict:
        """What this kind's training checkpoints depend on (a resumed stage must agree); default:
        the block without the keys in `resume_free`."""
        from omegaconf import OmegaConf

        data = OmegaConf.to_container(block, resolve=True) if not isinstance(block, dict) else dict(block)
        return {k: v for k, v in data.items() if k not in cls.resume_free}

    resume_free: tuple[str, ...] = ("weights",)  # block keys a resumed training run may change

    @classmethod
    def train(cls, block: Any, ctx: StageContext) -> dict:
        """Train a net from the block and export its weights through `ctx.export`; returns the meta."""
        raise NotImplementedError(f"network kind '{cls.name}' has no training stage")


def _check_kind(cls: type) -> None:
    if cls.signature not in SIGNATURES:
        raise ValueError(
            f"network kind {cls.__name__}: signature must be one of {SIGNATURES}, got {cls.signature!r}"
        )
    if cls.Config is None or "weights" not in getattr(cls.Config, "__dataclass_fields__", {}):
        raise ValueError(f"network kind {cls.__name__}: Config must be a dataclass with a `weights` field")


NET_KINDS = Registry("network kind", base=NetKind, check=_check_kind)


def register_net_kind(name: str):
    """Class decorator: register a `NetKind` under `name` (its config block and stage name)."""

    def deco(cls: type[NetKind]) -> type[NetKind]:
        cls.trainable = "train" in cls.__dict__ or any(
            "train" in b.__dict__ for b in cls.__mro__[1:-1] if b is not NetKind
        )
        NET_KINDS.add(name, cls)
        return cls

    return deco


def net_kind(name: str) -> type[NetKind]:
    """The network kind registered as `name`. Raises ConfigError listing the registered ones."""
    return NET_KINDS.get(name)


def field_kinds() -> dict[str, str]:
    """{field name: network kind} of the kinds that give a time-free field f(x) (`defense.field`)."""
    return {cls.field: name for name, cls in NET_KINDS.items() if cls.signature == "field" and cls.field}


def field_names() -> tuple[str, ...]:
    return tuple(field_kinds())


def field_labels() -> dict[str, str]:
    """{field name: its label in tables and plots} of the time-free field kinds."""
    return {
        cls.field: cls.field_label or cls.field.upper() for cls in NET_KINDS._entries.values() if cls.field
    }


__all__ = [
    "NET_KINDS",
    "SIGNATURES",
    "Importer",
    "NetKind",
    "StageContext",
    "field_kinds",
    "field_names",
    "net_kind",
    "register_net_kind",
]
