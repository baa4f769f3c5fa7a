"""What every purifier shares: the registry, the common defense parameters, noise screening.

A purifier maps a batch of images to `draws` purified rows per image (draw-major: row d*B + i is
draw d of image i). It names the networks it needs (`nets`: slot -> registered network kind,
`advpure.nets.registry`) and gets them as callables in `forward`; to add one, write one module with
one registered class:

    @register_purifier("median")
    class MedianPurifier(Purifier):
        '''Median filter: a deterministic purifier.'''

        @dataclass
        class Params(DefenseParams):          # the common keys + this kind's own
            kind: str = "median"
            size: int = at_least(3, 1)

        label = "Median"                      # row label in tables (describe() adds parameters)
        stochastic = False

        @classmethod
        def nets(cls, p):                      # slot -> network kind ({}: none)
            return {}

        @classmethod
        def from_params(cls, p, nets):         # nets: slot -> the loaded nn.Module (its metadata)
            return cls(p.size)

        def forward(self, x, rng, draws, fns, differentiable=False) -> PurifyResult: ...

and a YAML file `conf/defense/median.yaml` with `kind: median` and its values. The config block
`defense: {kind: median, size: 3, replicas: 1}` is then validated by `MedianPurifier.Params`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from advpure.core.errors import ConfigError
from advpure.core.params import at_least, choice, schema
from advpure.core.registry import Registry
from advpure.core.rng import RNG
from advpure.nets.precision import PRECISIONS
from advpure.nets.registry import field_kinds, field_labels, field_names
from advpure.purify.merge import MERGE_RULES

NOISE_TYPES = ("gaussian", "rademacher")
ALPHA_MIN, ALPHA_MAX = 1e-5, 1e-1  # the clamp of ADP's step size (Yoon et al. 2021), both probes

NetFns = Mapping[str, Callable[..., torch.Tensor]]


@dataclass
class PurifyResult:
    """Output of a purifier on R rows (R = draws * B)."""

    x: torch.Tensor  # (R, C, H, W) purified images in [0, 1]
    steps: torch.Tensor  # (R,) int64: number of updates each row took
    score_evals: torch.Tensor  # (R,) int64: generative-net evaluations (NFE) spent on each row


@schema
@dataclass
class DefenseParams:
    """Keys every `defense` block has, whatever its kind."""

    kind: str = "adp"  # a registered purifier name, or module.path:Class
    replicas: int = at_least(10, 1)  # S: independent chains merged into one prediction
    merge: str = choice("softmax", *MERGE_RULES)  # default merge rule of the table (all are recorded)
    max_batch: int = at_least(4096, 1)  # memory budget: rows per net forward (chunking)
    # precision of the purifier's nets: auto = bf16 under trainer.precision=bf16-mixed when the
    # purifier allows it (`Purifier.low_precision`), else fp32; fp32 / bf16 force it
    precision: str = choice("auto", "auto", *PRECISIONS)


@dataclass
class FieldParams(DefenseParams):
    """The common keys plus the field a purifier follows: `dsm`, the DSM score net f
    (~ sigma grad log p_sigma), or `ebm`, the fixed rescaling c * (-grad E) of the maximum-likelihood
    EBM (Hill et al. 2021) — every network kind with a time-free field (`field_kinds`)."""

    field: str = choice("dsm", lambda: known_kinds(field_names))


def purify_precision(cls: type[Purifier], p: Any, amp_dtype: torch.dtype | None) -> str:
    """The precision of the purifier's nets: `p.precision` ("fp32" / "bf16"), or with "auto" bf16
    when the classifier runs under bf16 autocast (`amp_dtype`) and the purifier allows it. Raises
    ConfigError (one line, the reason) for bf16 asked of a purifier that must not run in it."""
    want = getattr(p, "precision", "auto")
    reason = cls.low_precision(p)
    if want == "bf16" and reason:
        raise ConfigError(f"defense.precision=bf16: {reason}")
    if want == "auto":
        return "bf16" if amp_dtype == torch.bfloat16 and reason is None else "fp32"
    return want


def known_kinds(fn: Callable[[], Any]) -> Any:
    """`fn()` of the network-kind registry once the built-in kinds are registered."""
    import advpure.kinds  # noqa: F401 (registers the built-in network kinds)

    return fn()


def field_slot(p: Any) -> dict[str, str]:
    """`nets` of a purifier that follows one time-free field: {"field": the kind of `p.field`}."""
    return {"field": known_kinds(field_kinds)[p.field]}


class Purifier(nn.Module):
    """Base class. Subclasses set `Params` (a dataclass extending DefenseParams), `label`,
    `stochastic`, implement `nets`, `from_params` and `forward`, and may override `describe` (row
    label) and `settings` (the header line of result tables)."""

    name: str = ""  # set by the registry
    Params: type = DefenseParams
    label: str = ""
    stochastic: bool = True  # False: every draw is the same (attacks then use one draw)

    @classmethod
    def is_stochastic(cls, p: Any) -> bool:
        """Whether the purifier built from `p` is stochastic (`stochastic` of its instance), known
        before any net is loaded: a diffusion purifier at t* = 0 is the identity, deterministic."""
        return cls.stochastic

    @classmethod
    def nets(cls, p: Any) -> dict[str, str]:
        """The networks the purifier needs: {slot: registered network kind}. `forward` gets one
        callable per slot (signature of the kind: f(x), eps(u, t), ...)."""
        return {}

    @classmethod
    def from_params(cls, p: Any, nets: Mapping[str, nn.Module]) -> Purifier:
        """Build the purifier from its validated `Params` `p` and the loaded nets of its slots (read
        for their metadata, e.g. a diffusion net's `.schedule`; the calls go through `forward`'s
        callables). Raises ConfigError for a combination the kind cannot run."""
        raise NotImplementedError

    @classmethod
    def low_precision(cls, p: Any) -> str | None:
        """Why this purifier must not run its nets in bf16 with parameters `p`, or None if it may."""
        return None

    @classmethod
    def describe(cls, p: Any) -> str:
        """Row label of a defense in tables, e.g. "ADP σ=0.25" ("..., ML-EBM field" for field=ebm)."""
        label = cls.label or cls.name
        label = f"{label} σ={p.sigma:g}" if hasattr(p, "sigma") else label
        field = getattr(p, "field", None)
        if field is None or field == FieldParams.field:  # the default field (the DSM score net) goes unsaid
            return label
        return f"{label}, {known_kinds(field_labels).get(field, field)} field"

    @classmethod
    def settings(cls, p: Any) -> str:
        """One header line stating the parameters that made the rows (this kind's own keys)."""
        common = {f.name for f in dataclasses.fields(DefenseParams)}
        own = [f.name for f in dataclasses.fields(cls.Params) if f.name not in common]
        body = ", ".join(f"{k}={getattr(p, k)}" for k in own)
        return f"{cls.describe(p)}: S={p.replicas} replicas merged by {p.merge}" + (
            f"; {body}" if body else ""
        )

    def forward(
        self, x: torch.Tensor, rng: RNG, draws: int, fns: NetFns, differentiable: bool = False
    ) -> PurifyResult:
        """Purify `draws` independent chains of each image.

        x: (B, C, H, W) images in [0, 1]; rng: the per-image keyed (`SampleRNG`) or batch
        (`GeneratorRNG`) random stream every noise draw comes from; fns: {slot: the net of that slot
        as a callable} (counted, chunked, at the purification precision); differentiable: keep the
        autograd graph (or an equivalent) through every step (full-gradient attacks).
        Returns a PurifyResult with x (draws * B, C, H, W) in [0, 1], draw-major (row d * B + i is
        draw d of image i), and steps / score_evals (draws * B,) int64 per row."""
        raise NotImplementedError


PURIFIERS = Registry("defense kind", base=Purifier)
register_purifier = PURIFIERS.register


def purifier_class(kind: str) -> type[Purifier]:
    """The purifier class registered as `kind` (or imported from `module.path:Class`)."""
    return PURIFIERS.get(kind)


# --- shared pieces ------------------------------------------------------------------------------
def rows(x: torch.Tensor, draws: int) -> torch.Tensor:
    """(B, ...) -> (draws * B, ...): `draws` copies of the batch, draw-major."""
    return x.unsqueeze(0).expand(draws, *x.shape).reshape(draws * x.shape[0], *x.shape[1:])


def screen(x: torch.Tensor, sigma: float, noise: torch.Tensor, kind: str = "gaussian") -> torch.Tensor:
    """Noise screening (Yoon et al. 2021, step 1): x_0 = clip(x + sigma * n, 0, 1).

    x: images in [0, 1]; sigma: noise std in the same units; `noise`: a standard-normal sample
    (gaussian) or a +-1 sample (rademacher, scaled by sqrt(2/pi) to match the Gaussian's mean |n|),
    of x's shape. Raises ValueError for an unknown kind.
    """
    if kind == "gaussian":
        n = noise
    elif kind == "rademacher":
        n = noise.sign() * math.sqrt(2.0 / math.pi)
    else:
        raise ValueError(f"unknown noise type '{kind}'; allowed: {', '.join(NOISE_TYPES)}")
    return (x + sigma * n).clamp(0.0, 1.0)


def screened_rows(
    x: torch.Tensor, rng: RNG, draws: int, sigma: float, kind: str = "gaussian"
) -> torch.Tensor:
    """`draws` screened copies of each image, (draws * B, C, H, W) draw-major: the one screening
    path of every purifier (noise from `rng`, so keyed per image with `SampleRNG`)."""
    n = rng.rademacher(draws, x) if kind == "rademacher" else rng.normal(draws, x)
    return screen(rows(x, draws), sigma, n.reshape(-1, *x.shape[1:]), kind)


def check_images(x: torch.Tensor, channels: int | None = None, size: int | None = None) -> None:
    """Inputs must be image batches (B, C, H, W) in [0, 1] of the nets' shape; ValueError otherwise."""
    if x.dim() != 4:
        raise ValueError(f"expected images of shape (batch, channels, height, width), got {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"expected {channels} channel(s), got images of shape {tuple(x.shape)}")
    if size is not None and (x.shape[2] != size or x.shape[3] != size):
        raise ValueError(f"expected {size}x{size} images, got {tuple(x.shape)}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"images contain NaN or infinite values ({int((~torch.isfinite(x)).sum())} entries)")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(
            f"images must lie in [0, 1], got values in [{x.min().item():.4g}, {x.max().item():.4g}]"
        )


@register_purifier("none")
class IdentityPurifier(Purifier):
    """No purification: the undefended classifier behind the same interface."""

    @dataclass
    class Params(DefenseParams):
        kind: str = "none"
        replicas: int = at_least(1, 1)

    label = "Undefended"
    stochastic = False

    @classmethod
    def from_params(cls, p, nets) -> IdentityPurifier:
        return cls()

    @classmethod
    def describe(cls, p) -> str:
        return cls.label

    @classmethod
    def settings(cls, p) -> str:
        return "Undefended: the bare classifier"

    def forward(self, x, rng, draws, fns=None, differentiable=False) -> PurifyResult:
        zeros = torch.zeros(draws * x.shape[0], dtype=torch.long, device=x.device)
        return PurifyResult(x=rows(x, draws), steps=zeros, score_evals=zeros.clone())


__all__ = [
    "FieldParams",
    "purify_precision",
    "field_slot",
    "NetFns",
    "NOISE_TYPES",
    "PURIFIERS",
    "DefenseParams",
    "IdentityPurifier",
    "Purifier",
    "PurifyResult",
    "check_images",
    "purifier_class",
    "register_purifier",
    "rows",
    "screen",
    "screened_rows",
]
