"""One convention for diffusion nets used by purifiers: eps-prediction on images in [-1, 1] at time t in [0, 1].

Every diffusion net family (score_sde's NCSN++ `advpure.nets.ncsnpp`, Ho et al.'s DDPM `advpure.nets.ddpm`,
guided-diffusion's ADM `advpure.nets.adm`) subclasses `DiffusionNet`, which fixes

* ``forward(u, t)``: u (R, C, H, W) float in [-1, 1] (u = 2x - 1 for images x in [0, 1]); t (R,) float time in
  [0, 1] (a Python float or 0-d tensor is broadcast to every row). Returns eps_theta(u, t), (R, C, H, W): the
  prediction of the unit Gaussian noise in u = sqrt(abar(t)) u0 + sqrt(1 - abar(t)) eps.
* ``.schedule`` (`advpure.nets.schedules.NoiseSchedule`): abar(t) and the label the net was trained with
  (score_sde continuous VP: 999 t; DDPM / ADM: the step index i of t = (i + 1) / T).
* ``score(u, t) = -eps_theta(u, t) / sqrt(1 - abar(t))`` (Song et al. 2021, score_sde ``models/utils.py``
  ``get_score_fn`` for VP models; Ho et al. 2020, Eq. 11 / Sec. 3.2).
* ``.in_channels``, ``.image_size``.

A subclass implements ``net_forward(u, label)``: the official network's own forward (whatever it returns;
ADM returns 2C channels), and ``split_output`` (eps = everything, or the first C channels).

Also here: the sinusoidal time embeddings the three families use (two variants), `diffuse`, and the
score / eps conversions, written from the papers' equations.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from advpure.nets.schedules import NoiseSchedule

__all__ = [
    "DiffusionNet",
    "diffuse",
    "eps_to_score",
    "score_to_eps",
    "timestep_embedding",
    "time_batch",
]


def timestep_embedding(labels: torch.Tensor, dim: int, *, style: str = "ddpm", max_period: float = 10000.0):
    """Sinusoidal embedding of time labels (Vaswani et al. 2017, as adapted by Ho et al. 2020).

    labels: (R,) float (or integer) time labels (999 t, or the step index). Returns (R, dim), computed in
    float64 for float64 labels and float32 otherwise. With half = dim // 2 and k = 0 .. half - 1:

    * ``style="ddpm"`` (Ho et al.'s ``diffusion_tf/nn.py``, score_sde ``models/layers.py``
      ``get_timestep_embedding``, pytorch_diffusion ``model.py``): f_k = exp(-k log(max_period) / (half - 1)),
      embedding [sin(label f_k), cos(label f_k)];
    * ``style="adm"`` (guided-diffusion ``nn.py`` ``timestep_embedding``): f_k = exp(-k log(max_period) / half),
      embedding [cos(label f_k), sin(label f_k)].

    An odd `dim` gets one zero column at the end.
    """
    if labels.ndim != 1:
        raise ValueError(f"time labels must be 1-D (R,), got shape {tuple(labels.shape)}")
    dtype = torch.float64 if labels.dtype == torch.float64 else torch.float32
    half = dim // 2
    k = torch.arange(half, dtype=dtype, device=labels.device)
    if style == "ddpm":
        freqs = torch.exp(-math.log(max_period) / (half - 1) * k)
    elif style == "adm":
        freqs = torch.exp(-math.log(max_period) * k / half)
    else:
        raise ValueError(f"unknown embedding style {style!r} (ddpm or adm)")
    args = labels.to(dtype)[:, None] * freqs[None, :]
    parts = [torch.sin(args), torch.cos(args)] if style == "ddpm" else [torch.cos(args), torch.sin(args)]
    emb = torch.cat(parts, dim=1)
    if dim % 2:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], 1)], dim=1)
    return emb


def time_batch(t, rows: int, like: torch.Tensor) -> torch.Tensor:
    """t as a (rows,) tensor of `like`'s dtype and device: a Python number or 0-d tensor is repeated.
    Raises ValueError for another shape or for times outside [0, 1]."""
    t = torch.as_tensor(t, device=like.device)
    if t.ndim == 0:
        t = t.expand(rows)
    if t.shape != (rows,):
        raise ValueError(f"t must be a number or have shape ({rows},), got {tuple(t.shape)}")
    t = t.to(like.dtype if like.is_floating_point() else torch.float32)
    if bool(((t < 0) | (t > 1)).any()):
        raise ValueError(
            f"diffusion time t must lie in [0, 1], got values in [{float(t.min())}, {float(t.max())}]"
        )
    return t


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def diffuse(u0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """u_t = sqrt(abar(t)) u0 + sqrt(1 - abar(t)) noise (Ho et al. 2020 Eq. 4; Song et al. 2021 Eq. 33 for VP).
    u0, noise: (R, ...); t: (R,) in [0, 1]. abar is evaluated in float64, then cast to u0's dtype."""
    ab = schedule.alpha_bar(t.double())
    return _bcast(ab.sqrt(), u0) * u0 + _bcast((1 - ab).sqrt(), u0) * noise


def eps_to_score(eps: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """s(u, t) = -eps / sqrt(1 - abar(t)); eps (R, ...), t (R,). Undefined (division by 0) where abar(t) = 1."""
    ab = schedule.alpha_bar(t.double())
    return -eps / _bcast((1 - ab).sqrt(), eps)


def score_to_eps(score: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """eps = -sqrt(1 - abar(t)) s(u, t): the inverse of `eps_to_score`."""
    ab = schedule.alpha_bar(t.double())
    return -_bcast((1 - ab).sqrt(), score) * score


class DiffusionNet(nn.Module):
    """Base class of the diffusion nets: ``forward(u, t)`` -> eps, ``score(u, t)``, ``.schedule``.

    Subclasses set ``self.schedule``, ``self.in_channels``, ``self.image_size`` and implement
    ``net_forward(u, label)`` (the official forward: u (R, C, H, W) in [-1, 1], label (R,) float in the
    net's own time units) and, if the net returns more than eps, ``split_output``.
    """

    schedule: NoiseSchedule
    in_channels: int
    image_size: int

    def net_forward(self, u: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def split_output(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(eps, extra) from the official output: by default the whole output is eps (no extra)."""
        return out, None

    def check_input(self, u: torch.Tensor) -> None:
        if u.ndim != 4 or u.shape[1] != self.in_channels or u.shape[2:] != (self.image_size,) * 2:
            raise ValueError(
                f"{type(self).__name__} takes (R, {self.in_channels}, {self.image_size}, {self.image_size}) "
                f"images, got {tuple(u.shape)}"
            )

    def labels(self, t, u: torch.Tensor) -> torch.Tensor:
        """The net's time labels (R,) for times t (see `time_batch`), in u's dtype; computed in float64."""
        t = time_batch(t, u.shape[0], u)
        return self.schedule.label(t.double()).to(u.dtype)

    def output(self, u: torch.Tensor, t) -> torch.Tensor:
        """The official net's whole output at time t (ADM: eps and the learned-variance channels)."""
        self.check_input(u)
        return self.net_forward(u, self.labels(t, u))

    def forward(self, u: torch.Tensor, t) -> torch.Tensor:
        """eps_theta(u, t): (R, C, H, W) for u (R, C, H, W) in [-1, 1] and t (R,) in [0, 1]."""
        return self.split_output(self.output(u, t))[0]

    def score(self, u: torch.Tensor, t) -> torch.Tensor:
        """s_theta(u, t) = -eps_theta(u, t) / sqrt(1 - abar(t)), (R, C, H, W); t must be > 0."""
        t = time_batch(t, u.shape[0], u)
        return eps_to_score(self(u, t), t, self.schedule)

    def alpha_bar(self, t) -> torch.Tensor:
        """abar(t) of this net's schedule, float64."""
        return self.schedule.alpha_bar(torch.as_tensor(t, dtype=torch.float64))
