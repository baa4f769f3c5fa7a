"""`Defense` = purifier + classifier + merge of replicas: the one interface every attack talks to.

    classify(x)                     g_phi(x): the bare classifier's logits (differentiable)
    score(x)                        f_theta(x): the raw score network (joint attacks)
    purify(x, rng, draws)           `draws` independent purification chains per image
    chain_logits(x, rng, draws)     classifier logits on each purified chain, (draws, B, K)
    forward(x, rng)                 the defended prediction: S replicas merged (probabilities)
    evaluate(x, y, rng, n)          correctness of n independent defended predictions, per merge rule

Replicas and EOT draws are rows of one batch (draw-major: row d*B + i is draw d of image i);
nets see them in chunks of at most `max_batch` rows, the memory budget. Every stochastic call
takes an RNG (`advpure.rng`), so results are reproducible and independent of batch layout.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from advpure.purify.adp import PurifyResult, adp_chain, check_images, screen
from advpure.purify.langevin import langevin_chain
from advpure.rng import RNG

MERGE_RULES = ("softmax", "logits", "vote")
NOISE_TYPES = ("gaussian", "rademacher")


# --- merging replicas ---------------------------------------------------------------------------
def merge_scores(chain_logits: torch.Tensor, rule: str) -> torch.Tensor:
    """(S, B, K) logits of S replicas -> (B, K) merged scores (probabilities, logits or vote shares)."""
    if rule == "softmax":
        return chain_logits.float().softmax(-1).mean(0)
    if rule == "logits":
        return chain_logits.float().mean(0)
    if rule == "vote":
        k = chain_logits.shape[-1]
        return nn.functional.one_hot(chain_logits.argmax(-1), k).float().mean(0)
    raise ValueError(f"unknown merge rule '{rule}'; allowed: {', '.join(MERGE_RULES)}")


def merge_predict(chain_logits: torch.Tensor, rule: str) -> torch.Tensor:
    """(S, B, K) -> (B,) predicted classes. Ties: lowest class index for softmax/logits (argmax);
    for vote, the tied class with the highest mean softmax, then the lowest index."""
    scores = merge_scores(chain_logits, rule)
    if rule != "vote":
        return scores.argmax(-1)
    tied = scores == scores.max(-1, keepdim=True).values
    mean_prob = chain_logits.float().softmax(-1).mean(0)
    return torch.where(tied, mean_prob, torch.full_like(mean_prob, -1.0)).argmax(-1)


# --- counting and chunking ----------------------------------------------------------------------
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
    if x.shape[0] <= max_rows:
        return fn(x)
    return torch.cat([fn(c) for c in x.split(max_rows)])


# --- purifiers ----------------------------------------------------------------------------------
class Purifier(nn.Module):
    """Maps (B, ...) images to (draws*B, ...) purified rows, draw-major."""

    stochastic = True  # subclasses that use a score net register it as `self.score_net`

    def forward(self, x, rng: RNG, draws: int, score_fn, differentiable: bool = False) -> PurifyResult:
        raise NotImplementedError


def _rows(x: torch.Tensor, draws: int) -> torch.Tensor:
    return x.unsqueeze(0).expand(draws, *x.shape).reshape(draws * x.shape[0], *x.shape[1:])


class IdentityPurifier(Purifier):
    """No purification: the undefended classifier through the same interface."""

    stochastic = False

    def forward(self, x, rng, draws, score_fn=None, differentiable=False) -> PurifyResult:
        zeros = torch.zeros(draws * x.shape[0], dtype=torch.long, device=x.device)
        return PurifyResult(x=_rows(x, draws), steps=zeros, score_evals=zeros.clone())


class ADPPurifier(Purifier):
    """ADP chains (purify/adp.py). `checkpointing=False` keeps every step's activations in the
    differentiable mode (faster backward, memory linear in T; for comparisons)."""

    def __init__(
        self,
        score_net: nn.Module,
        *,
        sigma=0.25,
        lam=0.05,
        delta=1e-3,
        tau=1e-3,
        steps=10,
        noise="gaussian",
        checkpointing: bool = True,
    ):
        super().__init__()
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        if steps < 1:
            raise ValueError(f"steps (T) must be >= 1, got {steps}")
        if noise not in NOISE_TYPES:
            raise ValueError(f"unknown noise type '{noise}'; allowed: {', '.join(NOISE_TYPES)}")
        if lam <= 0 or delta <= 0 or tau < 0:
            raise ValueError(f"need lam > 0, delta > 0, tau >= 0; got {lam}, {delta}, {tau}")
        self.score_net = score_net
        self.sigma, self.noise, self.checkpointing = sigma, noise, checkpointing
        self.chain = dict(lam=lam, delta=delta, tau=tau, steps=steps)

    def forward(self, x, rng, draws, score_fn, differentiable=False) -> PurifyResult:
        n = rng.rademacher(draws, x) if self.noise == "rademacher" else rng.normal(draws, x)
        x0 = screen(_rows(x, draws), self.sigma, n.reshape(-1, *x.shape[1:]), self.noise)
        return adp_chain(
            x0, score_fn, **self.chain, differentiable=differentiable, checkpointing=self.checkpointing
        )


class LangevinPurifier(Purifier):
    def __init__(
        self, score_net: nn.Module, *, sigma=0.25, eta=1e-4, score_sigma=0.05, steps=100, noise="gaussian"
    ):
        super().__init__()
        if sigma < 0 or steps < 1:
            raise ValueError(f"need sigma >= 0 and steps >= 1, got {sigma}, {steps}")
        self.score_net = score_net
        self.sigma, self.eta, self.score_sigma, self.steps, self.noise = sigma, eta, score_sigma, steps, noise

    def forward(self, x, rng, draws, score_fn, differentiable=False) -> PurifyResult:
        def noise_fn():
            return rng.normal(draws, x).reshape(-1, *x.shape[1:])

        x0 = _rows(x, draws)
        if self.sigma > 0:
            x0 = screen(x0, self.sigma, noise_fn(), "gaussian")
        return langevin_chain(
            x0,
            score_fn,
            noise_fn,
            eta=self.eta,
            score_sigma=self.score_sigma,
            steps=self.steps,
            differentiable=differentiable,
        )


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


# --- the defense --------------------------------------------------------------------------------
class Defense(nn.Module):
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
        """Bare classifier logits (float32), chunked; differentiable."""
        with self._autocast(x):
            return chunked(self.classifier, x, self.max_batch).float()

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Raw score network f_theta(x) ~ -noise, chunked; differentiable."""
        if self.score_net is None:
            raise ValueError(f"defense '{self.name}' has no score network")
        with self._autocast(x):
            return chunked(self.score_net, x, self.max_batch).to(x.dtype)

    def score_fp32(self, x: torch.Tensor) -> torch.Tensor:
        """f_theta(x) in (at least) fp32 whatever autocast is active, for purification: ADP's step-size
        probe compares f(x) with f(x + delta f(x)), which differ by ~delta/sigma (~4e-3 relative),
        below bf16's resolution and close to TF32's. In bf16 the probe is noise (measured on the
        default: a third fewer steps before alpha <= tau)."""
        if self.score_net is None:
            raise ValueError(f"defense '{self.name}' has no score network")
        with torch.autocast(device_type=x.device.type, enabled=False), no_tf32(x.device):
            return chunked(self.score_net, x, self.max_batch)

    def purify(self, x: torch.Tensor, rng: RNG, draws: int = 1, differentiable: bool = False) -> PurifyResult:
        """`draws` independent chains per image; result rows are (draws * B), draw-major."""
        if draws < 1:
            raise ValueError(f"draws must be >= 1, got {draws}")
        return self.purifier(x, rng, draws, self.score_fp32, differentiable=differentiable)

    def chain_logits(
        self, x: torch.Tensor, rng: RNG, draws: int, differentiable: bool = False
    ) -> tuple[torch.Tensor, PurifyResult]:
        """Classifier logits of `draws` purified chains per image: (draws, B, K)."""
        if not self.stochastic:
            # deterministic defense: every draw is the same; classify once
            logits = self.classify(x)
            out = self.purifier(x, rng, 1, None)
            return logits.unsqueeze(0).expand(draws, *logits.shape), out
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            out = self.purify(x, rng, draws, differentiable=differentiable)
            logits = self.classify(out.x)
        return logits.view(draws, x.shape[0], -1), out

    def forward(self, x: torch.Tensor, rng: RNG, rule: str | None = None) -> torch.Tensor:
        """Defended prediction: S replicas merged by `rule` (default: the configured merge)."""
        logits, _ = self.chain_logits(x, rng, self.replicas)
        return merge_scores(logits, rule or self.merge)

    def evaluate(self, x: torch.Tensor, y: torch.Tensor, rng: RNG, n: int = 1) -> dict[str, torch.Tensor]:
        """Correctness of `n` independent defended predictions (each S replicas merged), for every
        merge rule: {rule: bool tensor (n, B)}. One batched call of n*S chains."""
        with torch.no_grad():
            logits, _ = self.chain_logits(x, rng, n * self.replicas)
        return correct_by_merge(logits.view(n, self.replicas, *logits.shape[1:]), y)


def correct_by_merge(grouped_logits: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """(n, S, B, K) logits -> {rule: (n, B) bool} correctness of each of the n merged predictions."""
    return {rule: torch.stack([merge_predict(g, rule) == y for g in grouped_logits]) for rule in MERGE_RULES}


def build_defense(
    cfg,
    classifier: nn.Module,
    score_net: nn.Module | None,
    *,
    channels=None,
    image_size=None,
    amp_dtype=None,
    name=None,
) -> Defense:
    """A `Defense` from a `DefenseConfig` (kind adp | langevin | none)."""
    if cfg.kind == "none":
        purifier, replicas = None, 1
    else:
        if score_net is None:
            raise ValueError(f"defense kind '{cfg.kind}' needs a score network")
        if cfg.kind == "adp":
            purifier = ADPPurifier(
                score_net,
                sigma=cfg.sigma,
                lam=cfg.lam,
                delta=cfg.delta,
                tau=cfg.tau,
                steps=cfg.steps,
                noise=cfg.noise,
            )
        elif cfg.kind == "langevin":
            purifier = LangevinPurifier(
                score_net,
                sigma=cfg.sigma,
                eta=cfg.langevin_eta,
                score_sigma=cfg.langevin_sigma,
                steps=cfg.steps,
                noise=cfg.noise,
            )
        else:
            raise ValueError(f"unknown defense kind '{cfg.kind}'; allowed: adp, langevin, none")
        replicas = cfg.replicas
    return Defense(
        classifier,
        purifier,
        replicas=replicas,
        merge=cfg.merge,
        max_batch=cfg.max_batch,
        amp_dtype=amp_dtype,
        channels=channels,
        image_size=image_size,
        name=name or defense_name(cfg),
    )


def defense_name(cfg) -> str:
    """Row name of a defense in result tables: none, adp_s0.25, langevin_s0.25."""
    return "none" if cfg.kind == "none" else f"{cfg.kind}_s{cfg.sigma:g}"


__all__ = [
    "MERGE_RULES",
    "ADPPurifier",
    "Counted",
    "Defense",
    "IdentityPurifier",
    "LangevinPurifier",
    "Purifier",
    "chunked",
    "correct_by_merge",
    "merge_predict",
    "merge_scores",
    "build_defense",
    "defense_name",
]
