"""Figures of a benchmark run, each written as a PNG whose path is returned.

Figures are built on matplotlib's object API with the Agg canvas, never through pyplot: no global
backend switch, no figure registry to leak memory in long runs, safe in headless DDP workers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100
GRID_CELL_INCHES = 1.6  # one image of the grid: the grid is (4 x n) cells, i.e. 640 x 160·n pixels
GRID_COLUMNS = ("clean", "adversarial", "purified")


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, format="png")  # no bbox="tight": keep the promised pixel size
    return path


def plot_robust_vs_eps(points: Iterable[Sequence[Any]], path: str | Path) -> Path:
    """Robust accuracy (%) against the attack budget eps: one line per defense, 95% CI as a band.

    points: rows (defense, eps, acc, lo, hi), accuracies as fractions in [0, 1].
    """
    curves: dict[str, list[tuple[float, float, float, float]]] = {}
    for defense, eps, acc, lo, hi in points:
        curves.setdefault(str(defense), []).append((float(eps), float(acc), float(lo), float(hi)))
    fig = Figure(figsize=(6.0, 4.0), dpi=DPI)
    ax = fig.add_subplot()
    for defense, pts in curves.items():
        eps, acc, lo, hi = (np.array(c) for c in zip(*sorted(pts)))
        (line,) = ax.plot(eps, 100 * acc, marker="o", label=defense)
        ax.fill_between(eps, 100 * lo, 100 * hi, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("ε (l∞)")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(title="defense (band: 95% CI)", fontsize="small")
    fig.tight_layout()
    return _save(fig, path)


def plot_defense_bars(
    bars: Sequence[tuple[str, str, float, float, float]], path: str | Path, title: str = ""
) -> Path:
    """Grouped bars, the layout of the ADP paper's Fig. 2: one group per defense, one bar per
    column (natural accuracy, then each attack's robust accuracy), 95% CI as error bars.

    bars: (defense label, column label, acc, lo, hi), accuracies as fractions in [0, 1].
    """
    groups = list(dict.fromkeys(b[0] for b in bars))
    cols = list(dict.fromkeys(b[1] for b in bars))
    value = {(g, c): (acc, lo, hi) for g, c, acc, lo, hi in bars}
    width = 0.8 / max(1, len(cols))
    fig = Figure(figsize=(max(6.0, 1.6 * len(groups) + 2.0), 4.2), dpi=DPI)
    ax = fig.add_subplot()
    x = np.arange(len(groups))
    for k, c in enumerate(cols):
        acc, lo, hi = (np.array([value.get((g, c), (np.nan,) * 3)[j] for g in groups]) for j in range(3))
        pos = x - 0.4 + width * (k + 0.5)
        ax.bar(pos, 100 * acc, width, label=c, yerr=[100 * (acc - lo), 100 * (hi - acc)], capsize=3)
        for px, a in zip(pos, acc):
            if np.isfinite(a):
                ax.text(px, 100 * a + 1.5, f"{100 * a:.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, groups, fontsize="small")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", title="error bars: 95% CI")
    if title:
        ax.set_title(title, fontsize="medium")
    fig.tight_layout()
    return _save(fig, path)


def _stack(per_sample: Mapping[int, Any] | np.ndarray) -> np.ndarray:
    """(samples, iterations) array; shorter traces (e.g. early stopping) are padded with NaN."""
    if isinstance(per_sample, Mapping):
        traces = [np.asarray(t, dtype=np.float64).reshape(-1) for t in per_sample.values()]
    else:
        traces = list(np.atleast_2d(np.asarray(per_sample, dtype=np.float64)))
    length = max((len(t) for t in traces), default=0)
    out = np.full((len(traces), length), np.nan)
    for i, t in enumerate(traces):
        out[i, : len(t)] = t
    return out


def plot_loss_curves(
    traces: Mapping[tuple[str, str], Mapping[int, Any] | np.ndarray], path: str | Path
) -> Path:
    """Attack loss per iteration: mean over samples with the interquartile range as a band.

    traces: `{(defense, attack): {idx: 1-D losses}}` as returned by `load_traces` (a 2-D array
    (samples, iterations) is accepted in place of the inner dict). A flat curve says the attack
    stopped making progress, one that still rises says it needed more iterations.
    """
    fig = Figure(figsize=(6.5, 4.0), dpi=DPI)
    ax = fig.add_subplot()
    for (defense, attack), per_sample in traces.items():
        losses = _stack(per_sample)
        if losses.size == 0:
            continue
        it = np.arange(losses.shape[1])
        with np.errstate(all="ignore"):
            mean = np.nanmean(losses, axis=0)
            q1, q3 = np.nanpercentile(losses, [25, 75], axis=0)
        (line,) = ax.plot(it, mean, label=f"{defense} / {attack} (n={losses.shape[0]})")
        ax.fill_between(it, q1, q3, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("attack iteration")
    ax.set_ylabel("attack loss (mean, band: IQR)")
    ax.grid(alpha=0.3)
    if traces:
        ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, path)


def _image(ax: Any, chw: np.ndarray) -> None:
    chw = np.clip(np.asarray(chw, dtype=np.float32), 0.0, 1.0)
    if chw.shape[0] == 1:
        ax.imshow(chw[0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(np.transpose(chw[:3], (1, 2, 0)), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_image_grid(
    examples: Sequence[Sequence[Any]], path: str | Path, *, magnify: float | None = None
) -> Path:
    """One row per example: clean | adversarial | purified | |adv − clean| magnified.

    examples: `Example`s / tuples (defense, attack, idx, clean, adversarial, purified), images
    (C, H, W) in [0, 1], grey-scale for C = 1, RGB for C = 3. magnify: factor for the perturbation
    column; None scales the largest perturbation of the grid to full brightness (the factor is
    printed in the column title, so a faint perturbation is still visible and honestly labelled).
    The image is exactly 4 cells wide and len(examples) cells high (GRID_CELL_INCHES at DPI).
    """
    if not examples:
        raise ValueError("plot_image_grid needs at least one example")
    diffs = [np.abs(np.asarray(e[4], np.float32) - np.asarray(e[3], np.float32)) for e in examples]
    if magnify is None:
        peak = max(float(d.max()) for d in diffs)
        magnify = 1.0 / peak if peak > 0 else 1.0
    n = len(examples)
    fig = Figure(figsize=(4 * GRID_CELL_INCHES, n * GRID_CELL_INCHES), dpi=DPI)
    top = 1.0 - 0.25 / (n * GRID_CELL_INCHES)  # room for the column titles, in inches
    fig.subplots_adjust(left=0.12, right=0.99, bottom=0.01, top=top, wspace=0.05, hspace=0.08)
    axes = fig.subplots(n, 4, squeeze=False)
    titles = (*GRID_COLUMNS, f"|adv − clean| ×{magnify:.3g}")
    for r, (example, diff) in enumerate(zip(examples, diffs)):
        defense, attack, idx, clean, adv, purified = example[:6]
        for c, img in enumerate((clean, adv, purified, diff * magnify)):
            _image(axes[r, c], img)
            if r == 0:
                axes[r, c].set_title(titles[c], fontsize=8)
        axes[r, 0].set_ylabel(f"{defense}\n{attack}\n#{idx}", fontsize=6)
    return _save(fig, path)
