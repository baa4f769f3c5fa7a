"""ADP with a choice of step-size probe and bf16 purification, for the suite and `gpu_check`.

A stand-in for the wiring of `advpure.purify.probe` into `advpure.purify.adp` / `Defense` (not
done here: those files are being restructured): `probe_chain` is `adp_chain` with
`probe="secant" | "jvp"`, `ProbeADP` the purifier using it, and `AmpDefense` a `Defense` whose
purification runs under the caller's autocast (bf16) instead of `score_fp32`'s forced fp32.
Once `ADPPurifier(probe=...)` and the bf16 purification path exist, the figures should call them
and this module goes.
"""

from __future__ import annotations

import torch

from advpure.core.errors import check_finite
from advpure.purify.adp import ADPPurifier, adp_step, checkpointed
from advpure.purify.base import PurifyResult, screened_rows
from advpure.purify.defense import Defense, chunked
from advpure.purify.probe import adp_step_jvp

PROBES = ("secant", "jvp")


def probe_chain(
    x0: torch.Tensor,
    score_fn,
    *,
    lam: float = 0.05,
    delta: float = 1e-3,
    tau: float = 1e-3,
    steps: int = 10,
    probe: str = "secant",
    differentiable: bool = False,
    checkpointing: bool = True,
    input_grad: bool | None = None,
) -> PurifyResult:
    """`adp.adp_chain` (same active-row bookkeeping, stopping at alpha <= tau, gradient mode and
    per-step checkpointing) with the step-size probe `probe`: "secant" (`adp_step`, the paper's)
    or "jvp" (`probe.adp_step_jvp`, its delta -> 0 limit; its dual pass is never checkpointed).
    x0: (R, C, H, W) screened rows in [0, 1]. Two score evaluations per step either way."""
    if probe not in PROBES:
        raise ValueError(f"unknown probe '{probe}'; allowed: {', '.join(PROBES)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
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


class ProbeADP(ADPPurifier):
    """`ADPPurifier` whose chain uses `probe_chain` with the given probe."""

    def __init__(self, score_net, *, probe: str = "secant", input_grad: bool | None = None, **kw):
        super().__init__(score_net, **kw)
        if probe not in PROBES:
            raise ValueError(f"unknown probe '{probe}'; allowed: {', '.join(PROBES)}")
        self.probe, self.input_grad = probe, input_grad

    def forward(self, x, rng, draws, score_fn, differentiable=False) -> PurifyResult:
        x0 = screened_rows(x, rng, draws, self.sigma, self.noise)
        return probe_chain(
            x0,
            score_fn,
            **self.chain,
            probe=self.probe,
            differentiable=differentiable,
            checkpointing=self.checkpointing,
            input_grad=self.input_grad,
        )


class AmpDefense(Defense):
    """A `Defense` whose purification runs the score net under `amp_dtype` autocast (bf16) when
    `amp_purify` is set: valid with the jvp probe only (the secant's 1 - z is below bf16's
    resolution). Everything else is `Defense`."""

    def __init__(self, *args, amp_purify: bool = False, **kw):
        super().__init__(*args, **kw)
        probe = getattr(self.purifier, "probe", "secant")
        if amp_purify and (self.amp_dtype is None or probe != "jvp"):
            raise ValueError("bf16 purification needs amp_dtype and the jvp probe (the secant's is noise)")
        self.amp_purify = amp_purify

    def score_fp32(self, x: torch.Tensor) -> torch.Tensor:
        if not self.amp_purify:
            return super().score_fp32(x)
        with self._autocast(x):
            out = chunked(self.score_net, x, self.max_batch)
        check_finite(out, f"the score network of defense '{self.name}'")
        return out


def probe_defense(
    score,
    clf,
    *,
    sigma: float,
    lam: float,
    delta: float,
    tau: float,
    steps: int,
    replicas: int,
    probe: str = "secant",
    dtype: str = "fp32",
    checkpointing: bool = True,
) -> AmpDefense:
    """ADP with `probe` defending `clf`; dtype "bf16": classifier and purification under bf16
    autocast (needs probe="jvp"), "fp32": both in fp32 (the secant's and today's default)."""
    purifier = ProbeADP(
        score,
        sigma=sigma,
        lam=lam,
        delta=delta,
        tau=tau,
        steps=steps,
        probe=probe,
        checkpointing=checkpointing,
    )
    bf16 = dtype == "bf16"
    return AmpDefense(
        clf, purifier, replicas=replicas, amp_dtype=torch.bfloat16 if bf16 else None, amp_purify=bf16
    )


__all__ = ["PROBES", "AmpDefense", "ProbeADP", "probe_chain", "probe_defense"]
