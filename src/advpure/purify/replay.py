"""Exact gradients through a long purification chain, at memory flat in its number of steps.

Every diffusion purifier here (DiffPure, GDMP, reverse-VE) is a chain on R = draws * B rows:

    u_0     = chain.init(xr, noise)             xr: (R, C, H, W) the input rows, images in [0, 1]
    u_{k+1} = chain.step(k, u_k, xr, noise)     k = 0 .. N - 1, each step a few net evaluations
    output  = the purifier's finish(u_N)        (cheap: plain autograd)

where `noise` is a `NoiseStream` (standard-normal tensors of the state's shape from the purifier's
RNG). A step may depend on the input rows xr as well as on u_k (GDMP's guidance pulls towards the
diffused input at every step), so the gradient reaches x both along the chain and at every step.

`run_chain` evaluates a chain in one of four ways:

* no gradient (`differentiable=False`): a plain loop under `torch.no_grad`.
* `replay` (the default for attacks): `Replay`, a `torch.autograd.Function`. Its forward runs the
  chain WITHOUT a graph and keeps, per step, only the state u_k (on the CPU with `offload=True`) and
  the KEY of the step's noise (`NoiseStream.key`: a copy of a `SampleRNG` / `FrozenRNG` = its seed,
  index list and call counter, a few bytes; or a `GeneratorRNG`'s generator state, 5 kB on the CPU,
  16 bytes on CUDA). Its backward replays one step at a time, from the last: it rebuilds step k's
  graph from the stored u_k and the re-drawn noise, checks (with `check_replay=True`) that the
  replayed u_{k+1} equals the stored one bit for bit, takes the vector-Jacobian product
  (dL/du_k, dL/dxr_k) = vjp(step_k, dL/du_{k+1}), frees the graph and moves on. Second-order terms
  come for free: GDMP's guidance is itself a gradient (of an MSE / SSIM), built with
  `create_graph=True` whenever its input requires grad, so the replayed step differentiates through it.
  Memory: N stored states (N * R * C * H * W * itemsize bytes, e.g. 79 MB for 100 steps of 64 CIFAR-10
  images in fp32, movable to the CPU) + ONE step's graph, against N step graphs for plain autograd.
  Time: one graph-free forward + (one forward with graph + one backward) per step, the least any
  exact method can do without keeping every graph.
* `checkpoint`: plain autograd with each step under `torch.utils.checkpoint` (non-reentrant), what
  other evaluations use: the same memory and arithmetic, but the forward builds each step's
  checkpoint frame, and the recomputation re-draws the step's noise from its key.
* `autograd`: plain autograd through every step (memory linear in N; for comparison).

A purifier may also offer `surrogate` (`APPROXIMATE_MODES`): not a way to run this chain but another,
shorter chain in the attack's graph (see the purifiers' `surrogate_steps`).

Noise keys (`noise="key"`, default) cost nothing and re-draw the SAME numbers: `SampleRNG` keys every
draw by (seed, stream, call, image, draw), so a copy at the right call counter replays it exactly.
`noise="stored"` keeps every noise tensor instead (one state-sized tensor per draw: GDMP draws two per
step, so 2N states more); it is also what an RNG of another type falls back to.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.utils.checkpoint import checkpoint

from advpure.core.rng import GeneratorRNG, SampleRNG
from advpure.purify.base import Purifier, PurifyResult

GRADIENT_MODES = ("replay", "autograd", "checkpoint")
# named approximate modes a purifier offers besides the exact ones (`gradient_mode` of its block):
# `surrogate` (Lee & Kim, ICCV 2023, "Robust Evaluation of Diffusion-Based Adversarial Purification"):
# the attack differentiates a chain of fewer, larger steps (`surrogate_steps`) by plain autograd, while
# every evaluation without gradient runs the full chain
APPROXIMATE_MODES = ("surrogate",)
PURIFIER_GRADIENT_MODES = (*GRADIENT_MODES, *APPROXIMATE_MODES)
NOISE_KEYS = ("key", "stored")


class NoiseStream:
    """Standard-normal tensors of the chain's state shape (R, C, H, W), R = draws * B, draw-major.

    rng: the purifier's RNG (`SampleRNG` keys each image's numbers by its index, so they do not
    depend on the batch); like: a (B, C, H, W) tensor giving the batch, dtype and device; store:
    keep every drawn tensor (replay from the tape instead of from RNG keys)."""

    def __init__(self, rng: Any, draws: int, like: torch.Tensor, store: bool = False):
        self.rng, self.draws, self.like = rng, int(draws), like
        self.store = bool(store) or not isinstance(rng, (SampleRNG, GeneratorRNG))
        self.tape: list[torch.Tensor] | None = [] if self.store else None
        self.drawn = 0

    def normal(self) -> torch.Tensor:
        """One standard-normal draw (R, C, H, W); advances the stream."""
        n = self.rng.normal(self.draws, self.like).reshape(-1, *self.like.shape[1:])
        if self.tape is not None:
            self.tape.append(n)
        self.drawn += 1
        return n

    def key(self) -> Any:
        """A token from which `replay(token)` draws the numbers this stream draws from now on."""
        if self.tape is not None:
            return len(self.tape)
        if isinstance(self.rng, SampleRNG):
            return copy.copy(self.rng)  # seed, stream, index list, call counter (FrozenRNG: period)
        gen = self.rng.generator
        return gen.device, gen.get_state()

    def replay(self, token: Any) -> NoiseStream:
        """A new stream that re-draws, from `token` on, the numbers this stream drew."""
        if self.tape is not None:
            return _TapeStream(self.tape, token, self.like)
        if isinstance(self.rng, SampleRNG):
            return NoiseStream(copy.copy(token), self.draws, self.like)
        device, state = token
        gen = torch.Generator(device=device)
        gen.set_state(state)
        return NoiseStream(GeneratorRNG(gen), self.draws, self.like)


class _TapeStream(NoiseStream):
    """Reads back the stored draws of a `NoiseStream(store=True)` from position `pos`."""

    def __init__(self, tape: list[torch.Tensor], pos: int, like: torch.Tensor):
        self.tape_in, self.pos, self.like, self.drawn, self.tape = tape, int(pos), like, 0, None

    def normal(self) -> torch.Tensor:
        if self.pos >= len(self.tape_in):
            raise RuntimeError("replay drew more noise than the forward pass did")
        self.pos += 1
        self.drawn += 1
        return self.tape_in[self.pos - 1]


class Chain(Protocol):
    """What `run_chain` needs from a purification chain (see the module docstring)."""

    n_steps: int

    def init(self, xr: torch.Tensor, noise: NoiseStream) -> torch.Tensor: ...

    def step(self, k: int, u: torch.Tensor, xr: torch.Tensor, noise: NoiseStream) -> torch.Tensor: ...


@dataclass
class ReplayOptions:
    check_replay: bool = False  # compare every replayed state with the stored one, bit for bit
    offload: bool = False  # keep the stored states on the CPU


class ReplayMismatch(RuntimeError):
    """A replayed step did not reproduce the state the forward pass stored."""


def _check(k: int, replayed: torch.Tensor, stored: torch.Tensor) -> None:
    stored = stored.to(replayed.device)
    if not torch.equal(replayed.detach(), stored):
        diff = (replayed.detach() - stored).abs().max().item()
        raise ReplayMismatch(
            f"replay of step {k} differs from the forward pass (max |diff| {diff:.3g}): the step is not "
            "deterministic given its state and noise key (a nondeterministic kernel, or a net in train mode?)"
        )


class Replay(torch.autograd.Function):
    """u_N = chain(xr), differentiable in xr by step-wise replay (see the module docstring)."""

    @staticmethod
    def forward(ctx, chain: Chain, noise: NoiseStream, opts: ReplayOptions, xr: torch.Tensor):
        park = (lambda t: t.to("cpu")) if opts.offload else (lambda t: t)
        keys, tape = [noise.key()], []
        with torch.no_grad():
            u = chain.init(xr, noise)
            for k in range(chain.n_steps):
                tape.append(park(u))
                keys.append(noise.key())
                u = chain.step(k, u, xr, noise)
        tape.append(park(u.detach()) if opts.check_replay else None)
        ctx.chain, ctx.noise, ctx.opts, ctx.keys, ctx.tape = chain, noise, opts, keys, tape
        ctx.save_for_backward(xr)
        return u

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (xr,) = ctx.saved_tensors
        chain, noise, opts, keys, tape = ctx.chain, ctx.noise, ctx.opts, ctx.keys, ctx.tape
        xd = xr.detach().requires_grad_(True)
        gx = torch.zeros_like(xr)
        with torch.enable_grad():
            for k in reversed(range(chain.n_steps)):
                u = tape[k].to(xr.device).detach().requires_grad_(True)
                out = chain.step(k, u, xd, noise.replay(keys[k + 1]))
                if opts.check_replay:
                    _check(k, out, tape[k + 1])
                gu, gxk = torch.autograd.grad(out, (u, xd), g, allow_unused=True)
                tape[k + 1] = None  # the stored state is no longer needed
                g = gu if gu is not None else torch.zeros_like(u)
                if gxk is not None:
                    gx += gxk
            u0 = chain.init(xd, noise.replay(keys[0]))
            if opts.check_replay and chain.n_steps:
                _check(-1, u0, tape[0])
            (gxk,) = torch.autograd.grad(u0, xd, g, allow_unused=True)
            if gxk is not None:
                gx += gxk
        ctx.tape = None
        return None, None, None, gx


def _checkpointed_step(chain: Chain, k: int, noise: NoiseStream) -> Callable:
    """Step k for `torch.utils.checkpoint`: the first call draws from `noise`, the recomputation in
    backward re-draws the same numbers from the key taken before the step."""
    key, calls = noise.key(), [0]

    def fn(u: torch.Tensor, xr: torch.Tensor) -> torch.Tensor:
        src = noise if calls[0] == 0 else noise.replay(key)
        calls[0] += 1
        return chain.step(k, u, xr, src)

    return fn


def run_chain(
    chain: Chain,
    xr: torch.Tensor,
    noise: NoiseStream,
    *,
    differentiable: bool = False,
    gradient_mode: str = "replay",
    check_replay: bool = False,
    offload: bool = False,
) -> torch.Tensor:
    """u_N of `chain` from the input rows xr (R, C, H, W); differentiable in xr when `differentiable`
    and grad mode is on, by `gradient_mode` (replay | autograd | checkpoint). Raises ValueError for
    an unknown mode; `ReplayMismatch` (in backward) when `check_replay` finds a step that does not
    replay bit for bit."""
    if gradient_mode not in GRADIENT_MODES:
        raise ValueError(f"unknown gradient_mode {gradient_mode!r}; allowed: {', '.join(GRADIENT_MODES)}")
    if not (differentiable and torch.is_grad_enabled() and xr.requires_grad):
        with torch.no_grad():
            u = chain.init(xr, noise)
            for k in range(chain.n_steps):
                u = chain.step(k, u, xr, noise)
        return u
    if gradient_mode == "replay":
        return Replay.apply(chain, noise, ReplayOptions(check_replay, offload), xr)
    u = chain.init(xr, noise)
    for k in range(chain.n_steps):
        if gradient_mode == "checkpoint":
            u = checkpoint(_checkpointed_step(chain, k, noise), u, xr, use_reentrant=False)
        else:
            u = chain.step(k, u, xr, noise)
    return u


class ChainPurifier(Purifier):
    """Base of the purifiers whose chain runs through `run_chain` (diffpure, gdmp, ve): the shared
    gradient settings, the noise stream, and the identity result of a chain without noise."""

    def set_gradients(
        self, gradient_mode: str, surrogate_steps: int, noise_keys: str, check_replay: bool, offload: bool
    ) -> None:
        """How full-gradient attacks differentiate the chain (`PURIFIER_GRADIENT_MODES`), and how its
        noise is replayed (`NOISE_KEYS`). Raises ValueError for an unknown mode or surrogate_steps < 1."""
        if (
            gradient_mode not in PURIFIER_GRADIENT_MODES
            or noise_keys not in NOISE_KEYS
            or surrogate_steps < 1
        ):
            raise ValueError(
                f"unknown gradient_mode {gradient_mode!r} or noise_keys {noise_keys!r}, or surrogate_steps "
                f"{surrogate_steps} < 1"
            )
        self.gradient_mode, self.surrogate_steps = gradient_mode, surrogate_steps
        self.store_noise, self.check_replay, self.offload = noise_keys == "stored", check_replay, offload

    def surrogate(self, differentiable: bool) -> bool:
        """Whether this call differentiates the shorter surrogate chain (Lee & Kim 2023)."""
        return self.gradient_mode == "surrogate" and differentiable and torch.is_grad_enabled()

    def run(self, chain: Chain, xr: torch.Tensor, x: torch.Tensor, rng, draws: int, differentiable: bool):
        """u_N of `chain` from the rows xr (draws * B, C, H, W) of the images x, its noise keyed by
        `rng` (per image), by this purifier's gradient mode."""
        noise = NoiseStream(rng, draws, x.detach(), store=self.store_noise)
        mode = "autograd" if self.gradient_mode == "surrogate" else self.gradient_mode
        return run_chain(
            chain,
            xr,
            noise,
            differentiable=differentiable,
            gradient_mode=mode,
            check_replay=self.check_replay,
            offload=self.offload,
        )

    @staticmethod
    def unchanged(xr: torch.Tensor, differentiable: bool, steps: int = 0) -> PurifyResult:
        """The rows themselves (a chain without noise: t* = 0, sigma* = 0, no rounds)."""
        n = torch.full((xr.shape[0],), steps, dtype=torch.long, device=xr.device)
        return PurifyResult(x=xr if differentiable else xr.detach(), steps=n, score_evals=n.clone())


__all__ = [
    "ChainPurifier",
    "APPROXIMATE_MODES",
    "GRADIENT_MODES",
    "PURIFIER_GRADIENT_MODES",
    "NOISE_KEYS",
    "Chain",
    "NoiseStream",
    "Replay",
    "ReplayMismatch",
    "ReplayOptions",
    "run_chain",
]
