"""ADP: Adaptive Denoising Purification (Yoon, Hwang & Lee, ICML 2021), as plain torch.

One chain on a batch `x` in [0, 1] with a score net `f` trained by denoising score matching,
`f(x + sigma * eps) ~ -eps` (so f ~ sigma * grad log p_sigma; ADP uses the raw output):

  1. screening     x_0 = clip(x + sigma * n, 0, 1),  n ~ N(0, I)  (or Rademacher * sqrt(2/pi))
  2. for t < T:    g = f(x_t),  g_d = f(x_t + delta * g)
                   z = <g, g_d> / <g, g>                                   (per sample)
                   alpha = clamp(lambda * delta / (1 - z), 1e-5, 1e-1)     (per sample)
                   active <- active and (alpha > tau)        (a stopped sample stays stopped)
                   x_{t+1} = clip(x_t + alpha * active * g, 0, 1)
  3. classify x_T.

`adp_step` is step 2's update, `adp_chain` adds the bookkeeping (active rows, stopping, gradient
mode, counts), `ADPPurifier` is the registered purifier (screening + chain) behind `Defense`.

`alpha` is a secant estimate of the step along g that would reach the mode of a locally
Gaussian density: for f(x) = -c (x - mu), z = 1 - c*delta and alpha = lambda / c, so each step
shrinks x - mu by (1 - lambda). `1 - z` is of order delta/sigma (~4e-3), below bf16's resolution:
`Defense` runs the score net in fp32 for purification even under bf16 autocast, and the probe's
inner products here are taken in fp32 (or the input's wider dtype).

Departure from the official code, on purpose: it rescales images to the pixel grid
(x * 255/256 + 1/512) inconsistently at every step; we do not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from advpure.core.params import at_least, choice, validate
from advpure.core.rng import RNG, GeneratorRNG
from advpure.purify.base import (
    ALPHA_MAX,
    ALPHA_MIN,
    NOISE_TYPES,
    FieldParams,
    Purifier,
    PurifyResult,
    field_slot,
    register_purifier,
    screened_rows,
)
from advpure.purify.probe import adp_step_jvp

ScoreFn = Callable[[torch.Tensor], torch.Tensor]
PROBES = ("secant", "jvp")


@dataclass
class ADPParams(FieldParams):
    """The `defense` block of kind adp: the common keys, the field, and ADP's own (Yoon et al. 2021)."""

    kind: str = "adp"
    sigma: float = at_least(0.25, 0.0)  # screening noise std (images in [0, 1])
    lam: float = at_least(0.05, 0.0, strict=True)  # lambda: step scale of the adaptive update
    delta: float = at_least(1e-3, 0.0, strict=True)  # probe size of the step-size estimate
    tau: float = at_least(1e-3, 0.0)  # stop a sample once its step alpha <= tau
    steps: int = at_least(10, 1)  # T: at most this many updates
    noise: str = choice("gaussian", *NOISE_TYPES)  # screening noise distribution
    # step-size probe: the paper's secant (1 - z from f(x + delta g), fp32 only) or its delta -> 0 limit
    # from one forward-mode Jacobian-vector product (`advpure.purify.probe`; valid in bf16 too)
    probe: str = choice("secant", *PROBES)


DEFAULTS = ADPParams()  # the one place ADP's default values live


def step_size(g: torch.Tensor, g_delta: torch.Tensor, lam: float, delta: float) -> torch.Tensor:
    """Per-sample alpha = clamp(lam * delta / (1 - <g, g_d>/<g, g>), 1e-5, 1e-1), in >= fp32.

    g, g_delta: (R, ...) the field at x and at x + delta * g. Returns (R,) step sizes.
    """
    wide = torch.promote_types(g.dtype, torch.float32)
    g = g.detach().flatten(1).to(wide)
    g_delta = g_delta.detach().flatten(1).to(wide)
    gg = (g * g).sum(1).clamp_min(torch.finfo(wide).tiny)
    z = (g * g_delta).sum(1) / gg
    # 1 - z <= 0 (curvature pointing the wrong way) gives a negative or infinite ratio; the clamp
    # maps it to the smallest step (then the sample stops) or the largest one, as the formula says.
    return (lam * delta / (1.0 - z)).nan_to_num(nan=ALPHA_MIN).clamp(ALPHA_MIN, ALPHA_MAX)


def adp_step(
    x: torch.Tensor, score_fn: ScoreFn, lam: float, delta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One adaptive deterministic update (Yoon et al. 2021, Eq. for step 2):

        g = f(x);  g_d = f(x + delta g);  alpha = clamp(lam delta / (1 - <g, g_d>/<g, g>));
        x_next = clip(x + alpha g, 0, 1)

    x: (R, C, H, W) in [0, 1]. Returns (x_next, alpha) with alpha (R,) >= fp32. The probe and
    alpha are taken without gradient; x_next is differentiable through g = f(x) when the caller
    enables gradients (the full-gradient attack's definition).
    """
    g = score_fn(x)
    with torch.no_grad():
        alpha = step_size(g, score_fn(x.detach() + delta * g.detach().to(x.dtype)), lam, delta)
    x_next = (x + alpha.to(x.dtype).view(-1, *([1] * (x.dim() - 1))) * g.to(x.dtype)).clamp(0.0, 1.0)
    return x_next, alpha


def checkpointed(score_fn: ScoreFn) -> ScoreFn:
    """score_fn whose activations are recomputed in backward (memory flat in T); plain under no_grad."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return checkpoint(score_fn, x, use_reentrant=False)
        return score_fn(x)

    return fn


def adp_chain(
    x0: torch.Tensor,
    score_fn: ScoreFn,
    *,
    lam: float = DEFAULTS.lam,
    delta: float = DEFAULTS.delta,
    tau: float = DEFAULTS.tau,
    steps: int = DEFAULTS.steps,
    differentiable: bool = False,
    checkpointing: bool = True,
    probe: str = DEFAULTS.probe,
    input_grad: bool | None = None,
) -> PurifyResult:
    """The adaptive deterministic updates (step 2) from the screened images `x0` (R, C, H, W).
    `probe`: "secant" (`adp_step`, the paper's) or "jvp" (`advpure.purify.probe.adp_step_jvp`, its
    delta -> 0 limit, two evaluations per step as well; its dual pass is never checkpointed;
    `input_grad`: True for a field that is itself a gradient, the EBM's, see `jvp_field`).

    Only the rows still active are sent through the score net, so stopped samples cost nothing.
    `differentiable=True` keeps the graph through every step for full-gradient attacks: alpha
    and the probe f(x + delta g) are taken without gradient (as in the attack's definition),
    and each step's score evaluation is checkpointed so memory does not grow with T.
    Raises ValueError if steps < 1.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if probe not in PROBES:
        raise ValueError(f"unknown probe '{probe}'; allowed: {', '.join(PROBES)}")
    grad_mode = differentiable and torch.is_grad_enabled()
    fn = checkpointed(score_fn) if grad_mode and checkpointing else score_fn
    rows = x0.shape[0]
    x = x0
    active = torch.ones(rows, dtype=torch.bool, device=x0.device)
    n_steps = torch.zeros(rows, dtype=torch.long, device=x0.device)
    evals = torch.zeros(rows, dtype=torch.long, device=x0.device)
    with torch.set_grad_enabled(grad_mode):
        for _ in range(steps):
            idx = active.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            all_rows = idx.numel() == rows
            xa = x if all_rows else x.index_select(0, idx)
            if probe == "jvp":
                xa_next, alpha = adp_step_jvp(xa, fn, lam, probe_fn=score_fn, input_grad=input_grad)
            else:
                xa_next, alpha = adp_step(xa, fn, lam, delta)
            still = alpha > tau
            evals[idx] += 2
            xa_next = torch.where(still.view(-1, *([1] * (xa.dim() - 1))), xa_next, xa)
            x = xa_next if all_rows else x.index_copy(0, idx, xa_next)
            n_steps[idx] += still.long()
            active[idx] = still
    return PurifyResult(x=x if grad_mode else x.detach(), steps=n_steps, score_evals=evals)


@register_purifier("adp")
class ADPPurifier(Purifier):
    """ADP chains (Yoon et al. 2021): screening with `sigma`, then `adp_chain` on the field.

    `checkpointing=False` keeps every step's activations in the differentiable mode (faster
    backward, memory linear in T; for comparisons)."""

    Params = ADPParams

    label = "ADP"

    def __init__(self, p: Params | None = None, *, checkpointing: bool = True):
        super().__init__()
        self.p = p if p is not None else self.Params()
        self.input_grad: bool | None = None  # None: `jvp_field` finds out (one wasted pass per step)
        validate(self.p, self.Params, "defense.")  # a bad value through the Python API: one ConfigError
        self.checkpointing = checkpointing

    @classmethod
    def nets(cls, p) -> dict[str, str]:
        return field_slot(p)

    @classmethod
    def from_params(cls, p, nets) -> ADPPurifier:
        purifier = cls(p)
        # a field that is itself a gradient (the EBM's -c grad E): the jvp probe's dual pass needs
        # input gradients (`advpure.purify.probe.jvp_field`)
        purifier.input_grad = True if getattr(nets.get("field"), "is_gradient", False) else None
        return purifier

    def chain_args(self) -> dict:
        """lam, delta, tau, steps of `adp_chain`."""
        return {k: getattr(self.p, k) for k in ("lam", "delta", "tau", "steps")}

    @classmethod
    def low_precision(cls, p) -> str | None:
        if p.probe == "secant":
            return (
                "ADP's secant step-size probe divides by 1 - <g, f(x + delta g)>/<g, g> ~ delta/sigma (~4e-3), "
                "below bf16's resolution; use defense.probe=jvp (its delta -> 0 limit) for bf16 purification"
            )
        return None

    @classmethod
    def settings(cls, p) -> str:
        probe = "secant probe" if p.probe == "secant" else "jvp probe (delta -> 0)"
        return (
            f"{cls.describe(p)}: T={p.steps}, S={p.replicas} replicas merged by {p.merge}, "
            f"lambda={p.lam}, delta={p.delta}, tau={p.tau}, {p.noise} screening, {probe}"
        )

    def forward(self, x, rng, draws, fns, differentiable=False) -> PurifyResult:
        x0 = screened_rows(x, rng, draws, self.p.sigma, self.p.noise)
        return adp_chain(
            x0,
            fns["field"],
            **self.chain_args(),
            differentiable=differentiable,
            checkpointing=self.checkpointing,
            probe=self.p.probe,
            input_grad=self.input_grad,
        )


def adp_purify(
    x: torch.Tensor,
    score_fn: ScoreFn,
    *,
    generator: torch.Generator | None = None,
    rng: RNG | None = None,
    differentiable: bool = False,
    **params,
) -> PurifyResult:
    """Screen and purify a batch (B, C, H, W) in [0, 1]: the whole ADP chain in one call.

    `params` are ADP's (`ADPPurifier.Params`: sigma, lam, delta, tau, steps, noise), the rest at
    their defaults. Usage without Lightning:
        >>> out = adp_purify(x, score_net, sigma=0.25, generator=torch.Generator().manual_seed(0))
        >>> logits = classifier(out.x)
    The screening noise comes from `rng` (e.g. `SampleRNG` for per-image keyed noise) or else
    from `generator`. Raises ConfigError for an unknown or out-of-range parameter.
    """
    p = ADPPurifier.Params(**params)
    validate(p, ADPPurifier.Params, "adp_purify: ")
    if rng is None:
        rng = GeneratorRNG(generator if generator is not None else torch.default_generator)
    return ADPPurifier(p)(x, rng, 1, {"field": score_fn}, differentiable=differentiable)


__all__ = [
    "ALPHA_MAX",
    "ALPHA_MIN",
    "ADPParams",
    "ADPPurifier",
    "DEFAULTS",
    "adp_chain",
    "adp_purify",
    "adp_step",
    "step_size",
]
