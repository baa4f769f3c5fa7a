"""ADP's step size from one Jacobian-vector product: the delta -> 0 limit of the secant probe.

ADP (Yoon, Hwang & Lee, ICML 2021) takes per sample the step

    alpha = clamp(lam * delta / (1 - z), 1e-5, 1e-1),   z = <g, f(x + delta g)> / <g, g>,   g = f(x)

(`advpure.purify.adp.step_size`, "the secant probe"). With J = df/dx at x, f(x + delta g) =
g + delta J g + O(delta^2), so 1 - z = -delta <g, J g> / <g, g> + O(delta^2) and the limit is

    alpha = clamp(lam * <g, g> / (-<g, J g>), 1e-5, 1e-1)                        ("the jvp probe")

= lam / kappa with kappa = -<g, J g>/<g, g> the curvature of the field along g (a Rayleigh
quotient; for f(x) = -c (x - mu), kappa = c and alpha = lam / c, each step shrinks x - mu by
1 - lam, exactly as the secant's). The secant's 1 - z is a difference of two evaluations
~delta/sigma ~ 4e-3 apart, below bf16's resolution (2^-8 ~ 3.9e-3): in bf16 it is noise. J g is
computed directly by forward-mode AD, no difference is taken, so it carries the evaluation's own
relative error (~1 % in bf16) and the probe is valid in fp32 and under bf16 autocast.

Which AD API works through which field (torch 2.13 CPU, fp32 and bf16 autocast; tests/test_probe.py):
  * NCSNv2 (InstanceNorm++, ELU, bilinear interpolation, separable max-pool): `torch.func.jvp` and
    `torch.autograd.forward_ad` dual tensors both work and agree exactly.
  * the EBM field f = -c grad_x E (`advpure.nets.ebm.EnergyField`): J g is a Hessian-vector product
    (forward-over-reverse). `torch.func.jvp` refuses it (the field calls `torch.autograd.grad` and
    `requires_grad_` inside: "unsupported inside a functorch transform"); dual tensors work if the
    primal requires grad and the field runs in grad mode (create_graph=True: the double-backward
    ops carry the tangents; without it `silu_backward` has no forward-AD formula).
So `jvp_field` uses dual tensors (`torch.autograd.forward_ad`).

Cost: the direction g = f(x) must be known before the tangent pass starts, so a step is one
forward for g plus one dual pass (the primal again + the tangent): 3 passes of convolution work
where the secant makes 2. PyTorch's own forward-AD formula for convolution also convolves the
primal with the (zero) weight tangent: 3 convolutions per conv in the dual pass. `fast_tangents()`
(used by `jvp_field` for fields without input gradients) routes conv2d, ELU and elementwise maximum
through autograd Functions with minimal JVPs (conv: conv(t, W); ELU: t * (1 if y > 0 else y + a);
maximum: the tangent of the larger argument): 2 convolutions per conv. Measured on a 2-core CPU
(bf16 autocast, random NCSNv2, experiments/perf/README.md): the dual pass costs 2.7 forwards at
32x32 (ngf 32) and 3.9 at 28x28 (ngf 16), the rest of the gap being the tangents' elementwise ops
(where, mul, add, dtype copies); so on that CPU a bf16 jvp step is slower than an fp32 secant step
(0.87x and 0.49x), bf16's own gain (1.6x and 1.3x per forward) being smaller than the 3/2 extra
conv work. Where bf16 is much faster than fp32 (GPU tensor cores) the jvp probe is what lets
purification use it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from advpure.purify.base import ALPHA_MAX, ALPHA_MIN

ScoreFn = Callable[[torch.Tensor], torch.Tensor]


# --- fast forward-mode rules ----------------------------------------------------------------------
class _Conv2dJvp(torch.autograd.Function):
    """conv2d whose JVP is conv(x_t, W) only (the weights and bias are constants here)."""

    @staticmethod
    def forward(ctx, x, w, b, stride, padding, dilation, groups):
        ctx.save_for_forward(w)
        ctx.args = (stride, padding, dilation, groups)
        return F.conv2d(x, w, b, stride, padding, dilation, groups)

    @staticmethod
    def jvp(ctx, x_t, *_):
        (w,) = ctx.saved_tensors
        return F.conv2d(x_t, w, None, *ctx.args)


class _EluJvp(torch.autograd.Function):
    """ELU with JVP t * f'(x), f'(x) = 1 (x > 0) or y + alpha (x <= 0, y = alpha (e^x - 1))."""

    @staticmethod
    def forward(ctx, x, alpha):
        y = F.elu(x, alpha)
        ctx.save_for_forward(y)
        ctx.alpha = alpha
        return y

    @staticmethod
    def jvp(ctx, x_t, _):
        (y,) = ctx.saved_tensors
        if ctx.alpha == 1.0:  # y + 1 clamped at 1 is f' on both sides
            return x_t * (y.clamp(max=0.0) + 1.0)
        return x_t * torch.where(y > 0, 1.0, y + ctx.alpha)


class _MaximumJvp(torch.autograd.Function):
    """Elementwise maximum with JVP: the tangent of the larger argument (a's at ties; torch's own
    rule averages the two at ties, a set of measure zero for continuous inputs)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_forward(a >= b)
        return torch.maximum(a, b)

    @staticmethod
    def jvp(ctx, a_t, b_t):
        (mask,) = ctx.saved_tensors
        a_t = torch.zeros_like(b_t) if a_t is None else a_t
        b_t = torch.zeros_like(a_t) if b_t is None else b_t
        return torch.where(mask, a_t, b_t)


def _has_tangent(t) -> bool:
    return isinstance(t, torch.Tensor) and fwad.unpack_dual(t).tangent is not None


def _arg(args, kwargs, i: int, name: str, default):
    return args[i] if len(args) > i else kwargs.get(name, default)


FAST_OPS = ("conv2d", "elu", "maximum")


class fast_tangents(TorchFunctionMode):  # noqa: N801 - used as a context manager, like torch.no_grad
    """Within the block, conv2d, F.elu and torch.maximum on dual tensors use minimal JVP rules
    (see the module docstring); everything else keeps PyTorch's own. Only under no_grad (the
    Functions define no backward); in grad mode every call keeps PyTorch's rules. An in-place ELU
    on a dual tensor keeps PyTorch's rule (the fast one would not mutate its input).
    `ops`: which of FAST_OPS to reroute (all by default; fewer for ablations)."""

    def __init__(self, ops: tuple[str, ...] = ("conv2d", "elu", "maximum")):
        super().__init__()
        unknown = set(ops) - set(FAST_OPS)
        if unknown:
            raise ValueError(
                f"fast_tangents: unknown op(s) {sorted(unknown)}; allowed: {', '.join(FAST_OPS)}"
            )
        self.ops = frozenset(ops)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_grad_enabled() and args and _has_tangent(args[0]):
            if (func is F.conv2d or func is torch.conv2d) and "conv2d" in self.ops:
                return _Conv2dJvp.apply(
                    args[0],
                    _arg(args, kwargs, 1, "weight", None),
                    _arg(args, kwargs, 2, "bias", None),
                    _arg(args, kwargs, 3, "stride", 1),
                    _arg(args, kwargs, 4, "padding", 0),
                    _arg(args, kwargs, 5, "dilation", 1),
                    _arg(args, kwargs, 6, "groups", 1),
                )
            if func is F.elu and "elu" in self.ops and not _arg(args, kwargs, 2, "inplace", False):
                return _EluJvp.apply(args[0], float(_arg(args, kwargs, 1, "alpha", 1.0)))
            if func is torch.maximum and "maximum" in self.ops and len(args) == 2 and not kwargs:
                return _MaximumJvp.apply(args[0], args[1])
        return func(*args, **kwargs)


# --- the probe -----------------------------------------------------------------------------------
def jvp_field(
    fn: ScoreFn, x: torch.Tensor, v: torch.Tensor, *, input_grad: bool | None = None, fast: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(x), J_f(x) v), both detached, by one forward-mode pass with dual tensors.

    x, v: (R, ...) of the same shape (v is cast to x's dtype); f maps rows to a field of x's
    shape. Runs in the caller's autocast state (under bf16 autocast both outputs are bf16).
    `input_grad`: run f on a primal that requires grad, in grad mode, as a field that is itself a
    gradient needs (EBM: -c grad E, J v a Hessian-vector product, forward-over-reverse); None: try
    without, and retry with it when f's output carries no tangent (a field that detaches its
    input, as `EnergyField` does without grad). `fast`: use `fast_tangents` (no-grad fields only).
    Raises RuntimeError when f's output has no tangent even with input gradients.
    """
    v = v.detach().to(x.dtype)
    attempts = [False, True] if input_grad is None else [bool(input_grad)]
    for grad_mode in attempts:
        with fwad.dual_level():
            with torch.set_grad_enabled(grad_mode):
                xp = x.detach().requires_grad_(grad_mode)
                dual = fwad.make_dual(xp, v)
                if fast and not grad_mode:
                    with fast_tangents():
                        out = fn(dual)
                else:
                    out = fn(dual)
            primal, tangent = fwad.unpack_dual(out)
            if tangent is not None:
                return primal.detach(), tangent.detach()
    raise RuntimeError("jvp_field: the field's output carries no tangent (does it detach its input?)")


def curvature(g: torch.Tensor, jg: torch.Tensor) -> torch.Tensor:
    """kappa = -<g, J g> / <g, g> per sample, (R,) in >= fp32 (the secant's (1 - z) / delta in the
    limit delta -> 0). g, jg: (R, ...). Positive where the field contracts along g."""
    wide = torch.promote_types(g.dtype, torch.float32)
    g = g.detach().flatten(1).to(wide)
    jg = jg.detach().flatten(1).to(wide)
    gg = (g * g).sum(1).clamp_min(torch.finfo(wide).tiny)
    return -(g * jg).sum(1) / gg


def step_size_jvp(g: torch.Tensor, jg: torch.Tensor, lam: float) -> torch.Tensor:
    """Per-sample alpha = clamp(lam <g, g> / (-<g, J g>), 1e-5, 1e-1), in >= fp32: `step_size`'s
    delta -> 0 limit, with the same rules: a curvature <= 0 (the field expands along g) gives a
    negative or infinite ratio, which the clamp maps to the smallest step (the sample stops) or
    the largest one; NaN gives the smallest. g, jg: (R, ...) the field and J g at x. Returns (R,)."""
    return (lam / curvature(g, jg)).nan_to_num(nan=ALPHA_MIN).clamp(ALPHA_MIN, ALPHA_MAX)


def adp_step_jvp(
    x: torch.Tensor,
    score_fn: ScoreFn,
    lam: float,
    *,
    probe_fn: ScoreFn | None = None,
    input_grad: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One adaptive update with the jvp probe (`adp.adp_step` with alpha = `step_size_jvp`):

        g = f(x);  J g by forward-mode AD at x;  alpha = clamp(lam <g, g> / (-<g, J g>));
        x_next = clip(x + alpha g, 0, 1)

    x: (R, C, H, W) in [0, 1]. Returns (x_next, alpha), alpha (R,) >= fp32. As for the secant:
    alpha is taken without gradient, x_next is differentiable through g = score_fn(x) when grad
    is enabled. `probe_fn` (default score_fn) evaluates the dual pass: pass the plain field when
    score_fn is checkpointed. `input_grad`: see `jvp_field` (True for the EBM field).
    Two evaluations per step, like the secant (the dual pass counts as one).
    """
    g = score_fn(x)
    with torch.no_grad():
        _, jg = jvp_field(probe_fn or score_fn, x.detach(), g.detach(), input_grad=input_grad)
        alpha = step_size_jvp(g, jg, lam)
    x_next = (x + alpha.to(x.dtype).view(-1, *([1] * (x.dim() - 1))) * g.to(x.dtype)).clamp(0.0, 1.0)
    return x_next, alpha


__all__ = ["adp_step_jvp", "curvature", "fast_tangents", "jvp_field", "step_size_jvp"]
