"""SPSA (Uesato et al. 2018): a black-box attack on the defended model D itself.

The gradient of the loss L(x) = -log D(x)_y is estimated by finite differences along N random
Rademacher directions v_j in {-1, 1}^D:

    g_hat = sum_j [L(x + c v_j) - L(x - c v_j)] / (2 N c) * v_j,        x_{i+1} = project(x_i + step * sign(g_hat))

E[v v^T] = I, so g_hat is an unbiased estimate of grad L for a locally quadratic L (up to O(c^2)).
Only the defense's outputs are used (`Defense.forward`: S replicas merged), never a gradient, so
SPSA measures gradient masking: it does not care how the purifier's backward pass looks.

All 2N queries of all images go to the defense as one batch with common random numbers
(`rng.tile(2N)`: every query of image i sees the same purification noise), so a +/- pair differs
only by the direction, not by the defense's own randomness. The queries are split into calls of
at most `max_queries` images (the memory budget) without changing the numbers: with `SampleRNG`
each call takes rows of the same tiled stream (a `GeneratorRNG` has a single stream and cannot
tile: there, queries see independent noise). Queries are clipped to [0, 1]: the deployed model
only accepts images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from advpure.attacks.base import Attack, AttackParams, AttackResult, Trace, register_attack
from advpure.attacks.losses import defended_loss
from advpure.attacks.projection import project, start_point
from advpure.core.params import at_least
from advpure.core.rng import RNG
from advpure.purify.merge import merge_scores

LossFn = Callable[[torch.Tensor], torch.Tensor]


def spsa_gradient(
    loss_fn: LossFn, x: torch.Tensor, rng: RNG, samples: int, delta: float, max_queries: int | None = None
) -> torch.Tensor:
    """SPSA estimate of grad loss_fn at each row of x.

    loss_fn maps a batch of M rows (M, ...) to per-row losses (M,); it is called on copy-major
    stacks [x + c v_a .. x + c v_b, x - c v_a .. x - c v_b] (2m copies of the batch, m directions),
    m chosen so that a call has at most `max_queries` rows (but at least one +/- pair).
    """
    if samples < 1:
        raise ValueError(f"SPSA needs samples >= 1, got {samples}")
    if delta <= 0:
        raise ValueError(f"SPSA needs delta > 0, got {delta}")
    b = x.shape[0]
    v = rng.rademacher(samples, x)  # (N, B, ...): all directions at once, independent of chunking
    per_call = samples if max_queries is None else max(1, min(samples, max_queries // (2 * b)))
    g = torch.zeros_like(x)
    for v_chunk in v.split(per_call):
        m = v_chunk.shape[0]
        queries = torch.cat([x + delta * v_chunk, x - delta * v_chunk])  # (2m, B, ...)
        losses = loss_fn(queries.reshape(2 * m * b, *x.shape[1:])).view(2, m, b).to(x.dtype)
        coef = (losses[0] - losses[1]) / (2 * samples * delta)  # (m, B)
        g += (coef.view(m, b, *[1] * (x.dim() - 1)) * v_chunk).sum(0)
    return g


def spsa_attack(
    defense,
    x,
    y,
    rng: RNG,
    p,
    *,
    eps: float,
    step: float,
    max_queries: int | None = None,
    trace: Trace | None = None,
    **hooks,
) -> AttackResult:
    """SPSA with parameters `p` (an `SPSA.Params`: iters, samples, delta, loss, random_start) and sign
    steps on x (B, C, H, W) in [0, 1]; returns the last iterate.

    max_queries: images per defense call (each is purified S times); default: enough to keep a
    call within the defense's own budget, `defense.max_batch // defense.replicas` chains.
    The objective recorded at x_i is -log D(x_i)_y from one defended prediction (S replicas,
    a separate stream), which is also the path's correctness check at x_i.
    """
    trace = trace or Trace(defense, y, rng, **hooks)  # hooks: track_path, progress, observer
    dir_rng, query_rng, eval_rng = rng.child("spsa"), rng.child("spsa_queries"), rng.child("eval")
    if max_queries is None:
        max_queries = max(1, defense.max_batch // defense.replicas)
    b = x.shape[0]
    loss, samples = p.loss, p.samples

    def defended(x_i):
        with torch.no_grad():
            chains, _ = defense.chain_logits(x_i, eval_rng, defense.replicas)
        return defended_loss(loss, merge_scores(chains, defense.merge), y, defense.merge), chains

    x_i = start_point(x, eps, rng, p.random_start)
    for i in range(p.iters):
        value, chains = defended(x_i)
        trace.visit(i, x_i, value, chains)
        tiled = query_rng.tile(2 * samples)  # common random numbers for all 2N copies of an image

        def loss_fn(q, tiled=tiled):
            rows = q.shape[0]
            q_rng = tiled.subset(torch.arange(rows))  # the first `rows` rows of the tiled stream
            with torch.no_grad():
                merged = defense(q.clamp(0.0, 1.0), q_rng)
            return defended_loss(loss, merged, y.repeat(rows // b), defense.merge)

        g = spsa_gradient(loss_fn, x_i, dir_rng, samples, p.delta, max_queries)
        x_i = project(x_i + step * g.sign(), x, eps)
        trace.step_done(i)
    return trace.finish(x_i, defended(x_i)[0])


@register_attack("spsa")
class SPSA(Attack):
    """SPSA (Uesato et al. 2018): black-box finite differences of the defended model's loss."""

    @dataclass
    class Params(AttackParams):
        kind: str = "spsa"
        samples: int = at_least(128, 1)  # N Rademacher directions per step
        delta: float = at_least(0.01, 0.0, strict=True)  # finite-difference step c

    black_box = True
    budget_fields = ("iters", "samples")

    @classmethod
    def gradient_source(cls, p) -> None:
        return None

    @classmethod
    def label(cls, p) -> str:
        return f"SPSA{p.iters} (N={p.samples})"

    @classmethod
    def run(cls, p, defense, x, y, rng, *, eps, step, trace) -> AttackResult:
        return spsa_attack(defense, x, y, rng, p, eps=eps, step=step, trace=trace)


__all__ = ["SPSA", "spsa_attack", "spsa_gradient"]
