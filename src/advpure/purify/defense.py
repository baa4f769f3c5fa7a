"""`Defense` = purifier + classifier + merge of replicas: the one interface every attack talks to.

    classify(x)                     g_phi(x): the bare classifier's logits (differentiable)
    score(x)                        f_theta(x): the raw score network (joint attacks)
    purify(x, rng, draws)           `draws` independent purification chains per image
    chain_logits(x, rng, draws)     classifier logits on each purified chain, (draws, B, K)
    forward(x, rng)                 the defended prediction: S replicas merged (probabilities)
    evaluate(x, y, rng, n)          correctness of n independent defended predictions, per merge rule

Images are (B, C, H, W) in [0, 1]. Replicas and EOT draws are rows of one batch (draw-major: row
d*B + i is draw d of image i); nets see them in chunks of at most `max_batch` rows, the memory
budget. Every stochastic call takes an RNG (`advpure.core.rng`), so results are reproducible and
independent of batch layout.

A Defense is an evaluation object: its nets are always in eval mode (BatchNorm statistics frozen,
dropout off), whatever mode they were in when passed in and whatever `.train()` is called with,
so an attack never changes the model it attacks and a dropout net is never mistaken for a
deterministic one. Non-finite outputs of the classifier or the purifier raise `NonFiniteError`.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from advpure.core.errors import check_finite
from advpure.core.rng import RNG, FrozenRNG
from advpure.purify.base import IdentityPurifier, Purifier, PurifyResult, check_images, purifier_class
from advpure.purify.merge import MERGE_RULES, correct_by_merge, merge_scores


class Counted(nn.Module):
    """Wraps a net and counts the rows (images) it has been evaluated on."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.evals = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.evals += x.shape[0]
        return self.net(x)


def chunked(fn, x: torch.Tensor, max_rows: int) -> torch.Tensor:
    """fn applied to `x` in chunks of at most `max_rows` rows, concatenated."""
    if x.shape[0] <= max_rows:
        return fn(x)
    return torch.cat([fn(c) for c in x.split(max_rows)])


@contextlib.contextmanager
def no_tf32(device: torch.device):
    """cuDNN convolutions in full fp32 (TF32 keeps 10 mantissa bits) for the block, on CUDA."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


class Defense(nn.Module):
    """A classifier behind a purifier, S replicas merged by `merge` (see the module docstring).

    classifier: (B, C, H, W) in [0, 1] -> (B, K) logits. purifier: a `Purifier` (None: identity).
    amp_dtype: autocast dtype for the classifier (purification always runs in fp32).
    Raises ValueError for replicas < 1, an unknown merge rule or max_batch < 1.
    """

    def __init__(
        self,
        classifier: nn.Module,
        purifier: Purifier | None = None,
        *,
        replicas: int = 1,
        merge: str = "softmax",
        max_batch: int = 4096,
        amp_dtype: torch.dtype | None = None,
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
        self.classifier = Counted(classifier)
        self.purifier = purifier if purifier is not None else IdentityPurifier()
        net = getattr(self.purifier, "score_net", None)
        self.score_net = Counted(net) if net is not None else None
        self.replicas, self.merge, self.max_batch = replicas, merge, max_batch
        self.amp_dtype, self.channels, self.image_size, self.name = amp_dtype, channels, image_size, name
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
    def has_score(self) -> bool:
        return self.score_net is not None

    @property
    def score_evals(self) -> int:
        return self.score_net.evals if self.score_net is not None else 0

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

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Raw score network f_theta(x) ~ -noise, of x's shape, chunked; differentiable."""
        if self.score_net is None:
            raise ValueError(f"defense '{self.name}' has no score network")
        with self._autocast(x):
            out = chunked(self.score_net, x, self.max_batch).to(x.dtype)
        check_finite(out, f"the score network of defense '{self.name}'")
        return out

    def score_fp32(self, x: torch.Tensor) -> torch.Tensor:
        """f_theta(x) in (at least) fp32 whatever autocast is active, for purification: ADP's step-size
        probe compares f(x) with f(x + delta f(x)), which differ by ~delta/sigma (~4e-3 relative),
        below bf16's resolution and close to TF32's. In bf16 the probe is noise (measured on the
        default: a third fewer steps before alpha <= tau)."""
        if self.score_net is None:
            raise ValueError(f"defense '{self.name}' has no score network")
        with torch.autocast(device_type=x.device.type, enabled=False), no_tf32(x.device):
            out = chunked(self.score_net, x, self.max_batch)
        # checked at every evaluation: ADP's rows whose step size is NaN simply stop, so a NaN field
        # would otherwise leave the screened image as the "purified" one, silently
        check_finite(out, f"the score network of defense '{self.name}'")
        return out

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
        out = self.purifier(x, rng, draws, self.score_fp32, differentiable=differentiable)
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
    nets: dict[str, nn.Module | None] | nn.Module | None = None,
    *,
    channels=None,
    image_size=None,
    amp_dtype=None,
    name=None,
) -> Defense:
    """A `Defense` from a typed defense block (see `advpure.config.compose`): the purifier registered as
    `params.kind` built by its `from_params`. `nets`: {"score": score net} (or the score net).
    Raises ValueError when the purifier needs a score network and none is given."""
    cls = purifier_class(params.kind)
    nets = nets if isinstance(nets, dict) else {"score": nets}
    if cls.needs_score and nets.get("score") is None:
        raise ValueError(f"defense kind '{params.kind}' needs a score network")
    purifier = cls.from_params(params, nets)
    return Defense(
        classifier,
        purifier,
        replicas=params.replicas if cls.stochastic else 1,
        merge=params.merge,
        max_batch=params.max_batch,
        amp_dtype=amp_dtype,
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
    "no_tf32",
]
