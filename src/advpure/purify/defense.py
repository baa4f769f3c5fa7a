"""`Defense` = purifier + classifier + merge of replicas: the one interface every attack talks to.

    classify(x)                     g_phi(x): the bare classifier's logits (differentiable)
    field(x)                        f(x): the purifier's time-free field, if it has one (joint attacks)
    purify(x, rng, draws)           `draws` independent purification chains per image
    chain_logits(x, rng, draws)     classifier logits on each purified chain, (draws, B, K)
    forward(x, rng)                 the defended prediction: S replicas merged (probabilities)
    evaluate(x, y, rng, n)          correctness of n independent defended predictions, per merge rule

Images are (B, C, H, W) in [0, 1]. Replicas and EOT draws are rows of one batch (draw-major: row
d*B + i is draw d of image i). The Defense owns the purifier's networks and hands them to it as
callables (`NetFn`): every call counted (`score_evals`, the number of function evaluations), chunked
to at most `max_batch` rows (the memory budget) and run at the purification precision
(`advpure.nets.precision`: fp32 by default, whatever the classifier's autocast). Every stochastic
call takes an RNG (`advpure.core.rng`), so results are reproducible and independent of batch layout.

A Defense is an evaluation object: its nets are always in eval mode (BatchNorm statistics frozen,
dropout off), whatever mode they were in when passed in and whatever `.train()` is called with,
so an attack never changes the model it attacks and a dropout net is never mistaken for a
deterministic one. Non-finite outputs of the classifier, the purifier's nets or the purifier
raise `NonFiniteError`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
from torch import nn

from advpure.core.errors import check_finite
from advpure.core.rng import RNG, FrozenRNG
from advpure.nets.precision import PRECISIONS, Precision
from advpure.nets.registry import NET_KINDS
from advpure.purify.base import (
    IdentityPurifier,
    Purifier,
    PurifyResult,
    check_images,
    known_kinds,
    purifier_class,
    purify_precision,
)
from advpure.purify.merge import MERGE_RULES, correct_by_merge, merge_scores


class Counted(nn.Module):
    """Wraps a net and counts the rows (images) it has been evaluated on."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.evals = 0

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        self.evals += x.shape[0]
        return self.net(x, *args)


def chunked(fn, x: torch.Tensor, max_rows: int, *args) -> torch.Tensor:
    """fn(x, *args) in chunks of at most `max_rows` rows, concatenated. Tensor `args` with x's leading
    dimension (a per-row time t) are split with x; other arguments are passed whole."""
    if x.shape[0] <= max_rows:
        return fn(x, *args)
    rows = x.shape[0]
    parts = [
        a.split(max_rows) if torch.is_tensor(a) and a.dim() and a.shape[0] == rows else None for a in args
    ]
    out = []
    for k, c in enumerate(x.split(max_rows)):
        out.append(fn(c, *(p[k] if p is not None else a for p, a in zip(parts, args))))
    return torch.cat(out)


class NetFn:
    """One of the purifier's nets as the callable a purifier gets: fn(x, *args) -> output, counted
    (`Counted`), chunked to `max_rows` rows, run within `Precision(precision)` and checked finite
    (`NonFiniteError` naming `what`). The output has the input's dtype."""

    def __init__(self, net: Counted, max_rows: int, precision: str, what: str):
        self.net, self.max_rows, self.precision, self.what = net, max_rows, precision, what

    def __call__(self, x: torch.Tensor, *args) -> torch.Tensor:
        with Precision(self.precision, x.device):
            out = chunked(self.net, x, self.max_rows, *args)
        # checked at every evaluation: ADP's rows whose step size is NaN simply stop, so a NaN field
        # would otherwise leave the screened image as the "purified" one, silently
        check_finite(out, self.what)
        return out.to(x.dtype) if out.dtype != x.dtype and x.is_floating_point() else out


class Defense(nn.Module):
    """A classifier behind a purifier, S replicas merged by `merge` (see the module docstring).

    classifier: (B, C, H, W) in [0, 1] -> (B, K) logits. purifier: a `Purifier` (None: identity).
    nets: {slot: net} for the purifier's `nets` slots; field_slot: the slot holding a time-free
    field f(x), if any (what `field` and the joint (score) attack use). amp_dtype: autocast dtype
    for the classifier. precision: of the purifier's nets ("fp32" or "bf16", `advpure.nets.precision`).
    Raises ValueError for replicas < 1, an unknown merge rule, max_batch < 1 or a missing slot.
    """

    def __init__(
        self,
        classifier: nn.Module,
        purifier: Purifier | None = None,
        nets: Mapping[str, nn.Module] | None = None,
        *,
        field_slot: str | None = None,
        kinds: Mapping[str, str] | None = None,
        replicas: int = 1,
        merge: str = "softmax",
        max_batch: int = 4096,
        amp_dtype: torch.dtype | None = None,
        precision: str = "fp32",
        channels: int | None = None,
        image_size: int | None = None,
        name: str = "defense",
    ):
        super().__init__()
        if replicas < 1:
            raise ValueError(f"replicas (S) must be >= 1, got {replicas}")
        if merge not in MERGE_RULES:
            raise ValueError(f"unknown merge rule '{merge}'; allowed: {', '.join(MERGE_RULES)}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision '{precision}'; allowed: {', '.join(PRECISIONS)}")
        self.classifier = Counted(classifier)
        self.purifier = purifier if purifier is not None else IdentityPurifier()
        self.nets = nn.ModuleDict({slot: Counted(net) for slot, net in (nets or {}).items()})
        if field_slot is not None and field_slot not in self.nets:
            raise ValueError(
                f"field_slot '{field_slot}' is not one of the nets ({', '.join(self.nets) or 'none'})"
            )
        self.field_slot = field_slot
        self.kinds = dict(kinds or {})  # slot -> network kind, for messages ("the score network")
        self.replicas, self.merge, self.max_batch = replicas, merge, max_batch
        self.amp_dtype, self.precision = amp_dtype, precision
        self.channels, self.image_size, self.name = channels, image_size, name
        self.frozen_seed: int | None = None  # set by `frozen()`: the DW-box protocol
        self.eval()

    def train(self, mode: bool = True) -> Defense:
        """Always eval mode (see the module docstring); `mode` is ignored."""
        return super().train(False)

    # -- properties attacks ask about --
    @property
    def stochastic(self) -> bool:
        return self.purifier.stochastic

    @property
    def has_field(self) -> bool:
        """Whether the purifier follows a time-free field f(x) (`field` works)."""
        return self.field_slot is not None

    @property
    def score_evals(self) -> int:
        """Evaluations of the purifier's nets so far (rows; the NFE of all calls together)."""
        return sum(n.evals for n in self.nets.values())

    def fns(self, precision: str | None = None) -> dict[str, NetFn]:
        """{slot: NetFn}: the callables `purify` hands the purifier."""
        return {
            slot: NetFn(
                net,
                self.max_batch,
                precision or self.precision,
                f"the {self.kinds.get(slot, slot)} network of defense '{self.name}'",
            )
            for slot, net in self.nets.items()
        }

    def _autocast(self, x: torch.Tensor):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=x.device.type, dtype=self.amp_dtype)

    def check(self, x: torch.Tensor) -> None:
        check_images(x, self.channels, self.image_size)

    # -- the interface --
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Bare classifier logits (B, K) float32, chunked; differentiable."""
        with self._autocast(x):
            logits = chunked(self.classifier, x, self.max_batch).float()
        check_finite(logits, f"the classifier of defense '{self.name}'")
        return logits

    def field(self, x: torch.Tensor) -> torch.Tensor:
        """The purifier's time-free field f(x) (the DSM score net's raw output ~ -noise, or the
        EBM's rescaled field), of x's shape, at the purification precision; differentiable.
        Raises ValueError when the purifier follows no such field."""
        if self.field_slot is None:
            raise ValueError(f"defense '{self.name}' has no time-free score field")
        return self.fns()[self.field_slot](x)

    @contextlib.contextmanager
    def frozen(self, seed: int):
        """Within the block the defense's randomness is drawn once per image (keyed by `seed` and
        the image index): every purification, for every gradient and for the final evaluation,
        replays the same S replicas (the DW-box protocol, Liu et al. 2025; see `FrozenRNG`).
        The RNGs passed in then only say which images the rows are."""
        before, self.frozen_seed = self.frozen_seed, int(seed)
        try:
            yield self
        finally:
            self.frozen_seed = before

    def purify(self, x: torch.Tensor, rng: RNG, draws: int = 1, differentiable: bool = False) -> PurifyResult:
        """`draws` independent chains per image; result rows are (draws * B), draw-major."""
        if draws < 1:
            raise ValueError(f"draws must be >= 1, got {draws}")
        if self.frozen_seed is not None:
            if not hasattr(rng, "index"):
                raise ValueError("a frozen defense needs per-image keyed RNGs (SampleRNG)")
            rng = FrozenRNG(self.frozen_seed, rng.index, self.replicas)
        out = self.purifier(x, rng, draws, self.fns(), differentiable=differentiable)
        check_finite(out.x, f"the purifier ({self.purifier.name}) of defense '{self.name}'")
        return out

    def chain_logits(
        self, x: torch.Tensor, rng: RNG, draws: int, differentiable: bool = False
    ) -> tuple[torch.Tensor, PurifyResult]:
        """Classifier logits of `draws` purified chains per image x (B, C, H, W) in [0, 1]:
        (draws, B, K). A deterministic purifier runs once (the same score function, finiteness
        check and gradient mode as the stochastic path) and its logits are repeated."""
        runs = draws if self.stochastic else 1  # deterministic: every draw is the same; classify once
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            out = self.purify(x, rng, runs, differentiable=differentiable)
            logits = self.classify(out.x).view(runs, x.shape[0], -1)
        return logits.expand(draws, *logits.shape[1:]), out

    def forward(self, x: torch.Tensor, rng: RNG, rule: str | None = None) -> torch.Tensor:
        """Defended prediction (B, K): S replicas merged by `rule` (default: the configured merge)."""
        logits, _ = self.chain_logits(x, rng, self.replicas)
        return merge_scores(logits, rule or self.merge)

    def evaluate(self, x: torch.Tensor, y: torch.Tensor, rng: RNG, n: int = 1) -> dict[str, torch.Tensor]:
        """Correctness of `n` independent defended predictions (each S replicas merged), for every
        merge rule: {rule: bool tensor (n, B)}. One batched call of n*S chains."""
        with torch.no_grad():
            logits, _ = self.chain_logits(x, rng, n * self.replicas)
        return correct_by_merge(logits.view(n, self.replicas, *logits.shape[1:]), y)


def build_defense(
    params,
    classifier: nn.Module,
    nets: Mapping[str, nn.Module] | None = None,
    *,
    channels=None,
    image_size=None,
    amp_dtype=None,
    precision: str | None = None,
    name=None,
) -> Defense:
    """A `Defense` from a typed defense block (see `advpure.config`): the purifier registered as
    `params.kind` built by its `from_params`. `nets`: {network kind: loaded net} holding at least the
    kinds the purifier names (`Purifier.nets(params)`). `precision` of the purifier's nets: None =
    `purify_precision` (the block's `precision`, bf16 under a bf16 `amp_dtype` when the purifier
    allows it). Raises TypeError when `nets` is not a mapping, ValueError when a net is missing,
    ConfigError for bf16 the purifier refuses."""
    cls = purifier_class(params.kind)
    slots = cls.nets(params)
    nets = nets or {}
    if not isinstance(nets, Mapping):
        raise TypeError(f"build_defense: nets must be {{network kind: net}}, got a {type(nets).__name__}")
    missing = [kind for kind in slots.values() if nets.get(kind) is None]
    if missing:
        raise ValueError(f"defense kind '{params.kind}' needs the network(s) {', '.join(missing)}")
    by_slot = {slot: nets[kind] for slot, kind in slots.items()}
    purifier = cls.from_params(params, by_slot)
    precision = precision or purify_precision(cls, params, amp_dtype)
    signature = {slot: known_kinds(lambda k=kind: NET_KINDS.get(k)).signature for slot, kind in slots.items()}
    field = next((slot for slot, sig in signature.items() if sig == "field"), None)
    return Defense(
        classifier,
        purifier,
        by_slot,
        field_slot=field,
        kinds=slots,
        replicas=params.replicas if purifier.stochastic else 1,
        merge=params.merge,
        max_batch=params.max_batch,
        amp_dtype=amp_dtype,
        precision=precision,
        channels=channels,
        image_size=image_size,
        name=name or defense_name(params),
    )


def defense_name(params) -> str:
    """Row name of a defense in result tables and records: none, adp_s0.25, langevin_s0.25."""
    if params.kind == "none":
        return "none"
    kind = str(params.kind).rpartition(":")[2].lower()  # a user's module.path:Class -> class
    sigma = getattr(params, "sigma", None)
    return f"{kind}_s{sigma:g}" if sigma is not None else kind


def defense_label(params) -> str:
    """Display label of a defense, e.g. "ADP σ=0.25" (from the purifier's `describe`)."""
    return purifier_class(params.kind).describe(params)


__all__ = [
    "Counted",
    "Defense",
    "build_defense",
    "chunked",
    "defense_label",
    "defense_name",
    "NetFn",
]
