"""Loop-structured reference implementations, for the performance suite's comparisons only.

They mirror the STRUCTURE of the original ADP code (Yoon et al. 2021), not its numerics
quirks (no pixel-grid rescaling, as in `advpure.purify.adp`):

* replicas and EOT draws are Python loops; each draw purifies the whole image batch on its own
  (batch = the B images, never B * draws rows);
* every ADP step evaluates the score net twice on ALL rows (a stopped sample is masked, not
  removed from the batch) and never exits early;
* with a classifier given, every purification iterate x_0 .. x_T is classified and the accuracy
  logged (`.item()`, as the original code logs accuracy along the chain).

Given the same noise they compute what the batched code computes (`tests/test_perf.py` proves it):
the purification noise is either passed in as tensors or drawn from the same `GeneratorRNG` in
the same order as `Defense` / `run_attack` draw it (one `(draws, B, ...)` block per call).
Nothing here is used by the framework itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

from advpure.purify.adp import adp_step  # the update rule is shared: the comparison is about structure
from advpure.purify.base import screen

ScoreFn = Callable[[torch.Tensor], torch.Tensor]


def reference_adp_chain(
    x0: torch.Tensor,
    score_fn: ScoreFn,
    *,
    lam: float = 0.05,
    delta: float = 1e-3,
    tau: float = 1e-3,
    steps: int = 10,
    classifier: Callable[[torch.Tensor], torch.Tensor] | None = None,
    y: torch.Tensor | None = None,
    log: list[float] | None = None,
) -> torch.Tensor:
    """One ADP chain on the batch x0 (already screened), the original code's way: T steps on all
    rows, two score evaluations per step, optional accuracy logging at every iterate."""
    x = x0.detach()
    active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    with torch.no_grad():
        if classifier is not None:
            _log_accuracy(classifier, x, y, log)
        for _ in range(steps):
            x_next, alpha = adp_step(x, score_fn, lam, delta)  # two score evaluations on all rows
            active = active & (alpha > tau)
            x = torch.where(active.view(-1, *([1] * (x.dim() - 1))), x_next, x)
            if classifier is not None:
                _log_accuracy(classifier, x, y, log)
    return x


def _log_accuracy(classifier, x, y, log) -> None:
    logits = classifier(x)
    if y is not None:
        acc = (logits.argmax(-1) == y).float().mean().item()  # a host sync per iterate, as logged
        if log is not None:
            log.append(acc)


def reference_screen(x: torch.Tensor, sigma: float, noise: torch.Tensor) -> torch.Tensor:
    """Gaussian screening of one replica (the purifiers' own `screen`)."""
    return screen(x, sigma, noise)


def reference_adp_purify(
    x: torch.Tensor,
    score_fn: ScoreFn,
    noise: torch.Tensor,
    *,
    sigma: float = 0.25,
    lam: float = 0.05,
    delta: float = 1e-3,
    tau: float = 1e-3,
    steps: int = 10,
) -> torch.Tensor:
    """S replicas as a Python loop: `noise` is (S, B, ...) standard normal; returns (S*B, ...)
    rows, draw-major (the layout of `ADPPurifier`)."""
    outs = []
    for s in range(noise.shape[0]):
        x0 = reference_screen(x, sigma, noise[s])
        outs.append(reference_adp_chain(x0, score_fn, lam=lam, delta=delta, tau=tau, steps=steps))
    return torch.cat(outs)


def reference_defended_probs(
    x, y, score_fn, classifier, noise: torch.Tensor, *, sigma, lam, delta, tau, steps, log=None
) -> torch.Tensor:
    """The defended prediction (mean softmax over S replicas), one replica at a time."""
    probs = 0.0
    for s in range(noise.shape[0]):
        x0 = reference_screen(x, sigma, noise[s])
        xp = reference_adp_chain(
            x0, score_fn, lam=lam, delta=delta, tau=tau, steps=steps, classifier=classifier, y=y, log=log
        )
        with torch.no_grad():
            probs = probs + classifier(xp).float().softmax(-1)
    return probs / noise.shape[0]


def reference_bpda_eot_attack(
    x: torch.Tensor,
    y: torch.Tensor,
    score_fn: ScoreFn,
    classifier: Callable[[torch.Tensor], torch.Tensor],
    rng,
    *,
    eps: float,
    step: float,
    iters: int,
    eot: int,
    replicas: int,
    sigma: float = 0.25,
    lam: float = 0.05,
    delta: float = 1e-3,
    tau: float = 1e-3,
    steps: int = 10,
    log: list[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BPDA + EOT (mean of the per-draw classifier gradients at the purified points), then the
    defended prediction at the result: returns (x_adv, mean-softmax probabilities over S replicas).

    Noise order equals `run_attack(pgd, bpda)` followed by `Defense.forward` with a
    `GeneratorRNG`: one `rng.normal(eot, x)` block per iteration, one for the final objective
    at x_iters (computed and discarded, as the batched attack records it), one
    `rng.normal(replicas, x)` block for the final prediction.
    """
    chain = dict(lam=lam, delta=delta, tau=tau, steps=steps, classifier=classifier, y=y, log=log)
    x_orig = x.detach()
    x_adv = x_orig.clone()
    for _ in range(iters):
        noise = rng.normal(eot, x_adv)
        grads = []
        for k in range(eot):
            xp = reference_adp_chain(reference_screen(x_adv, sigma, noise[k]), score_fn, **chain)
            xp = xp.detach().requires_grad_(True)
            with torch.enable_grad():
                loss = F.cross_entropy(classifier(xp).float(), y, reduction="none")
                grads.append(torch.autograd.grad(loss.sum(), xp)[0])
        grad = torch.stack(grads).mean(0)  # the EOT mean, summed in the same order as the batched code
        x_new = x_adv + step * grad.sign()
        x_adv = torch.minimum(torch.maximum(x_new, x_orig - eps), x_orig + eps).clamp(0.0, 1.0)
    # the objective at the last iterate (the batched attack records it as losses[-1])
    noise = rng.normal(eot, x_adv)
    for k in range(eot):
        xp = reference_adp_chain(reference_screen(x_adv, sigma, noise[k]), score_fn, **chain)
        with torch.no_grad():
            F.cross_entropy(classifier(xp).float(), y, reduction="none")
    noise = rng.normal(replicas, x_adv)
    probs = reference_defended_probs(
        x_adv,
        y,
        score_fn,
        classifier,
        noise,
        sigma=sigma,
        lam=lam,
        delta=delta,
        tau=tau,
        steps=steps,
        log=log,
    )
    return x_adv, probs


__all__ = [
    "reference_adp_chain",
    "reference_adp_purify",
    "reference_bpda_eot_attack",
    "reference_defended_probs",
    "reference_screen",
]
