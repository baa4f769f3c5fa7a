"""CERTIFY and PREDICT of randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019, Section 3.2).

    >>> smooth = SmoothedClassifier(build_base("denoised", clf, 0.25, score_net=f), 0.25, num_classes=10)
    >>> results = smooth.certify(x, idx, n0=100, n=100_000, alpha=0.001, labels=y)
    >>> results[0].prediction, results[0].radius

Noise samples are batch rows: the (n0 + n) draws of every image of the batch are laid out one
after another and sent through the base classifier in chunks of exactly `max_batch` rows (the
last chunk shorter), chunks mixing images when an image's draws end mid-chunk. Counts
accumulate on the device with one integer `scatter_add_` per chunk (exact, no host sync); only the (images, classes) count
tables reach the host. The noise of every image comes from `KeyedNormal` blocks keyed by the
dataset index, so counts are the same for any images-per-call, `max_batch`, image order or DDP
sharding, and after a resume (up to the nets' own floating-point differences between batch
shapes, which can only matter for a draw within rounding of a decision boundary).

Both stages of CERTIFY run in one pass: the n estimation draws are independent of the n0
selection draws, so counting every class of both and then choosing c_A from the n0 counts is
exactly Cohen et al.'s procedure. PREDICT applied to the estimation counts comes for free
(`CertifyResult.predict`): each procedure's guarantee holds on its own, they are not independent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from advpure.certify.noise import BLOCK, KeyedNormal, block_rows, num_blocks
from advpure.certify.stats import ABSTAIN, certify_from_counts, check_alpha, predict_from_counts
from advpure.core.errors import ConfigError, NonFiniteError
from advpure.purify.base import check_images


@dataclass(frozen=True)
class CertifyResult:
    """One image's CERTIFY outcome.

    idx: dataset index; sigma: smoothing noise std ([0, 1] image units); base: base classifier name;
    label: true class (-1 when not given); guess: c_A from the n0 selection counts;
    prediction: c_A, or -1 (ABSTAIN) when p_A < 1/2; p_a: one-sided (1 - alpha) Clopper-Pearson
    lower bound of P(h(x + sigma n) = c_A); radius: certified l2 radius sigma * Phi^-1(p_A), 0.0
    when abstained; abstained: p_A < 1/2; counts0 / counts: per-class counts of the n0 selection and
    the n estimation draws; predict / predict_pvalue: PREDICT on the estimation counts (-1 = abstain).
    """

    idx: int
    sigma: float
    base: str
    label: int
    guess: int
    prediction: int
    p_a: float
    radius: float
    abstained: bool
    n0: int
    n: int
    alpha: float
    counts0: tuple[int, ...]
    counts: tuple[int, ...]
    predict: int
    predict_pvalue: float

    def as_record(self) -> dict:
        """Plain-Python fields (counts as lists) for a results store or JSON."""
        out = asdict(self)
        out["counts0"], out["counts"] = list(self.counts0), list(self.counts)
        return out


@dataclass(frozen=True)
class PredictResult:
    """One image's PREDICT outcome: prediction (-1 = abstain), the binomial test's p-value, the counts of n draws."""

    idx: int
    sigma: float
    base: str
    label: int
    prediction: int
    pvalue: float
    n: int
    alpha: float
    counts: tuple[int, ...]

    @property
    def abstained(self) -> bool:
        return self.prediction == ABSTAIN

    def as_record(self) -> dict:
        out = asdict(self)
        out["counts"] = list(self.counts)
        return out


class SmoothedClassifier:
    """G(x) = argmax_c P(h(x + sigma n) = c), n ~ N(0, I), estimated by Monte Carlo (Cohen et al. 2019).

    base: an nn.Module mapping noisy rows (rows, C, H, W) to logits (rows, num_classes), e.g. from
        `advpure.certify.build_base`; its `name` attribute names it in the results.
    sigma: smoothing noise std (> 0) in [0, 1] image units.
    seed: key of the noise (`KeyedNormal`); block: rows per keyed noise block (part of the key).
    max_batch: rows per forward of the base classifier (the memory budget).
    Raises ConfigError for sigma <= 0, max_batch < 1 or block < 1.
    """

    def __init__(
        self,
        base: nn.Module,
        sigma: float,
        num_classes: int,
        *,
        seed: int = 0,
        max_batch: int = 4096,
        block: int = BLOCK,
        name: str | None = None,
    ):
        if not sigma > 0:
            raise ConfigError(f"certify: sigma must be > 0, got {sigma}")
        if max_batch < 1 or block < 1 or num_classes < 2:
            raise ConfigError(
                f"certify: need max_batch >= 1, block >= 1, num_classes >= 2; got {max_batch}, {block}, {num_classes}"
            )
        self.base, self.sigma, self.num_classes = base, float(sigma), int(num_classes)
        self.seed, self.max_batch, self.block = int(seed), int(max_batch), int(block)
        self.name = name or getattr(base, "name", type(base).__name__)

    # --- sampling -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def sample_counts(
        self, x: torch.Tensor, idx: Sequence[int] | torch.Tensor, draws: Sequence[tuple[str, int]]
    ) -> list[torch.Tensor]:
        """Class counts of the base classifier on keyed noisy copies of every image.

        x: (B, C, H, W) clean images in [0, 1] (used in fp32); idx: their B dataset indices (the noise keys);
        draws: [(stream, num), ...] e.g. [("select", n0), ("estimate", n)].
        Returns one (B, num_classes) int64 tensor per entry of `draws`, on x's device.
        Raises ValueError for bad images, a wrong number of indices or logits of the wrong width, and
        NonFiniteError when the base produced NaN/inf logits (nothing is returned to be recorded).
        """
        check_images(x)
        # the noisy rows x + sigma n are formed in fp32 whatever x's dtype: a lower precision (autocast)
        # inside the base is then part of h, and the smoothing noise stays the exact Gaussian
        x = x.float()
        idx = [int(i) for i in (idx.tolist() if torch.is_tensor(idx) else idx)]
        if len(idx) != x.shape[0]:
            raise ValueError(f"{x.shape[0]} images but {len(idx)} indices")
        for stream, num in draws:
            if int(num) < 1:
                raise ConfigError(f"certify: the number of '{stream}' draws must be >= 1, got {num}")
        b, r, k = x.shape[0], len(draws), self.num_classes
        shape = tuple(x.shape[1:])
        counts = torch.zeros(b * r * k, dtype=torch.long, device=x.device)
        total = b * sum(int(num) for _, num in draws)
        cap = max(1, min(self.max_batch, total))
        buf = torch.empty((cap, *shape), dtype=torch.float32, device=x.device)
        slots = torch.empty(cap, dtype=torch.long, device=x.device)
        ones = torch.ones(cap, dtype=torch.long, device=x.device)
        noise = KeyedNormal(self.seed, x.device, self.block)
        nonfinite = torch.zeros((), dtype=torch.long, device=x.device)
        fill = 0

        def flush(m: int) -> None:
            logits = self.base(buf[:m])
            if logits.dim() != 2 or logits.shape != (m, k):
                raise ValueError(f"base classifier returned {tuple(logits.shape)}, expected ({m}, {k})")
            # scatter_add_ rather than bincount: bincount reads its input's max, a device sync on CUDA
            counts.scatter_add_(0, slots[:m] * k + logits.argmax(-1), ones[:m])
            nonfinite.add_((~torch.isfinite(logits)).any(-1).sum())  # read once at the end (no sync)

        for i in range(b):
            for j, (stream, num) in enumerate(draws):
                slot = i * r + j
                for blk in range(num_blocks(num, self.block)):
                    eps = noise.draw(idx[i], stream, blk, num, shape)
                    rows, off = block_rows(num, blk, self.block), 0
                    while off < rows:
                        take = min(rows - off, cap - fill)
                        torch.add(x[i], eps[off : off + take], alpha=self.sigma, out=buf[fill : fill + take])
                        slots[fill : fill + take] = slot
                        fill, off = fill + take, off + take
                        if fill == cap:
                            flush(cap)
                            fill = 0
        if fill:
            flush(fill)
        if int(nonfinite):  # an argmax over NaN logits would be counted as a vote for some class
            raise NonFiniteError(
                f"the {self.name} base classifier produced NaN or infinite logits for {int(nonfinite)} "
                f"of {total} noisy rows"
            )
        table = counts.view(b, r, k)
        return [table[:, j] for j in range(r)]

    # --- CERTIFY / PREDICT --------------------------------------------------------------------------
    def certify(
        self,
        x: torch.Tensor,
        idx: Sequence[int] | torch.Tensor,
        *,
        n0: int = 100,
        n: int = 100_000,
        alpha: float = 0.001,
        labels: Sequence[int] | torch.Tensor | None = None,
    ) -> list[CertifyResult]:
        """CERTIFY (Cohen et al. 2019) for each image of x (B, C, H, W) in [0, 1].

        n0 selection draws (stream "select") guess c_A; n estimation draws (stream "estimate")
        bound p_A; abstain if p_A < 1/2, else radius sigma * Phi^-1(p_A). Also PREDICT on the
        estimation counts. Raises ConfigError for n0 < 1, n < 1, alpha outside (0, 1).
        """
        check_alpha(alpha)
        c0, c = self.sample_counts(x, idx, [("select", n0), ("estimate", n)])
        c0, c = c0.cpu().tolist(), c.cpu().tolist()
        out = []
        for i, key in enumerate(_indices(idx)):
            guess, pred, p_a, radius, abstained = certify_from_counts(c0[i], c[i], self.sigma, alpha)
            p_pred, p_val = predict_from_counts(c[i], alpha)
            out.append(
                CertifyResult(
                    idx=key,
                    sigma=self.sigma,
                    base=self.name,
                    label=_label(labels, i),
                    guess=guess,
                    prediction=pred,
                    p_a=p_a,
                    radius=radius,
                    abstained=abstained,
                    n0=int(n0),
                    n=int(n),
                    alpha=float(alpha),
                    counts0=tuple(c0[i]),
                    counts=tuple(c[i]),
                    predict=p_pred,
                    predict_pvalue=p_val,
                )
            )
        return out

    def predict(
        self,
        x: torch.Tensor,
        idx: Sequence[int] | torch.Tensor,
        *,
        n: int = 100_000,
        alpha: float = 0.001,
        labels: Sequence[int] | torch.Tensor | None = None,
        stream: str = "predict",
    ) -> list[PredictResult]:
        """PREDICT (Cohen et al. 2019) for each image of x (B, C, H, W) in [0, 1], from n fresh draws of
        `stream`: the top class, or ABSTAIN when the two-sided binomial test of the top two counts
        at 1/2 has p-value > alpha. Raises ConfigError for n < 1 or alpha outside (0, 1)."""
        check_alpha(alpha)
        (c,) = self.sample_counts(x, idx, [(stream, n)])
        c = c.cpu().tolist()
        out = []
        for i, key in enumerate(_indices(idx)):
            pred, pvalue = predict_from_counts(c[i], alpha)
            out.append(
                PredictResult(
                    idx=key,
                    sigma=self.sigma,
                    base=self.name,
                    label=_label(labels, i),
                    prediction=pred,
                    pvalue=pvalue,
                    n=int(n),
                    alpha=float(alpha),
                    counts=tuple(c[i]),
                )
            )
        return out


def _indices(idx: Sequence[int] | torch.Tensor) -> list[int]:
    return [int(i) for i in (idx.tolist() if torch.is_tensor(idx) else idx)]


def _label(labels, i: int) -> int:
    if labels is None:
        return -1
    return int(labels[i])
