"""The weights a run uses, built once at the top of a command: where each network kind's file is,
whether it exists, how to get it, and the loaded nets.

    artifacts = Artifacts.from_config(cfg)
    artifacts.path("score")                 # Path of the score net's weights
    artifacts.missing(["classifier", "score"])
    artifacts.load("score")                 # (net in eval mode, frozen; meta), checked against the config

Everything below the commands takes this object (or one kind's block), never the root config.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from advpure.data import get_spec
from advpure.nets.registry import net_kind
from advpure.nets.weights import file_sha256


@dataclass
class Artifacts:
    """The network kinds' blocks of a config and what they point at (see the module docstring)."""

    blocks: dict[str, Any]  # kind -> its typed config block
    data_name: str
    paths: Any  # the `paths` block
    experiment: str
    spec: Any = None  # the dataset spec (channels, image size, classes)
    _loaded: dict[str, tuple[nn.Module, dict]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_config(cls, cfg) -> Artifacts:
        from advpure.nets.registry import NET_KINDS

        blocks = {name: cfg[name] for name in NET_KINDS if name in cfg}
        return cls(blocks, cfg.data.name, cfg.paths, cfg.experiment, get_spec(cfg.data.name))

    def with_block(self, kind: str, block: Any) -> Artifacts:
        """A copy whose `kind` block is `block` (e.g. a noise-trained classifier's)."""
        return Artifacts({**self.blocks, kind: block}, self.data_name, self.paths, self.experiment, self.spec)

    def path(self, kind: str) -> Path:
        return net_kind(kind).weights_path(self.blocks[kind], self.paths, self.data_name)

    def missing(self, kinds: Iterable[str]) -> list[str]:
        return [k for k in kinds if not self.path(k).exists()]

    def how_to_get(self, kind: str) -> str:
        return net_kind(kind).how_to_get(self.blocks[kind], self.path(kind), self.data_name, self.experiment)

    def arch(self, kind: str) -> dict:
        return net_kind(kind).arch(self.blocks[kind], self.spec)

    def sha(self, kind: str) -> str:
        """The first 16 hex digits of the weights file's sha256 (what made a block of records)."""
        return file_sha256(self.path(kind))[:16]

    def load(self, kind: str) -> tuple[nn.Module, dict]:
        """(net, meta) of `kind`, loaded once (eval mode, frozen weights). Raises CheckpointError."""
        if kind not in self._loaded:
            self._loaded[kind] = net_kind(kind).load(self.blocks[kind], self.path(kind), self.spec)
        return self._loaded[kind]

    def nets(self, kinds: Iterable[str]) -> dict[str, nn.Module]:
        """{kind: loaded net} of `kinds`."""
        return {k: self.load(k)[0] for k in kinds}


def load_file(path, kind: str | None = None) -> tuple[nn.Module, dict, dict]:
    """(net, arch, meta) from any advpure weights file: the net rebuilt from the architecture the
    file stores by its network kind, weights loaded, eval mode, frozen. Raises CheckpointError for a
    bad file, or when `kind` is given and the file holds another kind."""
    from advpure.core.errors import CheckpointError
    from advpure.nets.registry import NET_KINDS
    from advpure.nets.weights import load_weights, read_weights

    payload = read_weights(path)
    stored = payload["kind"]
    if kind is not None and stored != kind:
        raise CheckpointError(f"{path} holds a {stored} network, expected a {kind} network")
    if stored not in NET_KINDS:
        raise CheckpointError(f"{path} holds a '{stored}' network; known: {', '.join(NET_KINDS)}")
    arch = dict(payload["arch"])
    net = net_kind(stored).build(arch)
    meta = load_weights(path, stored, arch, net)
    return net_kind(stored).prepare(net.eval().requires_grad_(False), meta), arch, meta


__all__ = ["Artifacts", "load_file"]
