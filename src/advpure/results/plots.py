"""Figures of a benchmark run, each written as a PNG whose path is returned.

Figures are built on matplotlib's object API with the Agg canvas, never through pyplot: no global
backend switch, no figure registry to leak memory in long runs, safe in headless DDP workers.
Every `plot_*` saves the figure its `*_figure` builder returns (the tests inspect the builders).

Layout rules of every figure (tests/test_plots.py checks them on matplotlib's own layout):

* labels in a figure are short (`advpure.results.labels`: "DSM + Det (ADP)", "standard_rand"); the full
  descriptions go to the caption under the figure (results.md, W&B);
* a legend stands outside the axes, right of them, and the figure grows by its width and height:
  many or long entries never cover the data and are never cut off;
* value labels sit above the upper cap of their error bar; axis labels state the unit and n.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.legend import Legend

from advpure.core.fsio import atomic_write

DPI = 100
LEGEND_PAD_INCHES = 0.25  # between the legend and the figure's edge, added to the grown figure
GRID_CELL_INCHES = 1.6  # one image of the example grid
GRID_GAP_INCHES = 0.08  # between images of a row
GRID_TEXT_INCHES = 0.3  # the line under each image (index, true / predicted class)
GRID_HEADER_INCHES = 0.62  # a block's header line and its column titles
GRID_COLORBAR_INCHES = 0.85  # the perturbation's colorbar with its ticks and label
GRID_MARGIN_INCHES = 0.1
GRID_COLUMNS = ("clean", "adversarial", "purified (one draw)", "adv − clean")
PERTURBATION_CMAP = "RdBu_r"  # diverging: blue = darker than clean, white = unchanged, red = brighter
RIGHT, WRONG = "#1a7f37", "#c62828"  # predicted class: correct / wrong


# --- shared layout -----------------------------------------------------------------------------------
def new_figure(width: float, height: float, layout: str | None = "constrained") -> Figure:
    """A figure (inches) on its own Agg canvas (so text can be measured before saving)."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: str | Path) -> Path:
    """Save `fig` as a PNG at `path` atomically (the folder is created; mode 0666 & ~umask).
    Raises StorageError (one line) when it cannot be written; an older plot there stays intact."""
    path = Path(path)
    with atomic_write(path, what="plot") as f:
        fig.savefig(f, dpi=DPI, format="png")  # no bbox="tight": the layout tested is the one saved
    return path


def _inches(fig: Figure, artist: Any) -> tuple[float, float]:
    """(width, height) of an artist as drawn, in inches."""
    box = artist.get_window_extent(fig.canvas.get_renderer())
    return box.width / fig.dpi, box.height / fig.dpi


def legend_outside(fig: Figure, ax: Any, *, title: str | None = None) -> Legend | None:
    """The axes' legend right of the axes (outside them), the figure widened by its width and
    heightened when its entries are taller than the figure; None when nothing is labelled."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return None
    legend = fig.legend(
        handles,
        labels,
        loc="outside right upper",
        fontsize="small",
        title=title,
        title_fontsize="small",
        alignment="left",
    )
    width, height = fig.get_size_inches()
    w, h = _inches(fig, legend)
    fig.set_size_inches(width + w + LEGEND_PAD_INCHES, max(height, h + 2 * LEGEND_PAD_INCHES))
    return legend


def line_style(k: int) -> str:
    """The k-th curve's line style: solid for the first 10 (one colour each), then dashed, dotted...,
    so curves beyond the colour cycle stay distinguishable in the legend."""
    return ("-", "--", ":", "-.")[(k // 10) % 4]


def n_text(ns: Iterable[int]) -> str:
    """ "n = 32 images", or "n = 8–32 images" when the curves or bars count different images."""
    ns = sorted({int(n) for n in ns})
    if not ns:
        return "n = ?"
    return f"n = {ns[0]} images" if len(ns) == 1 else f"n = {ns[0]}–{ns[-1]} images"


def eps_text(eps: float) -> str:
    """ε as a reader recognises it: "0.15", or "8/255" for a whole number of 8-bit grey levels that
    is no short decimal (CIFAR-10's 8/255)."""
    levels = eps * 255
    if len(f"{eps:g}") > 5 and abs(levels - round(levels)) < 1e-4 and round(levels) > 0:
        return f"{round(levels)}/255"
    return f"{eps:g}"


def _pad(row: Sequence[Any], width: int) -> list[Any]:
    return [*row, *([None] * (width - len(row)))]


# --- robust accuracy against eps ---------------------------------------------------------------------
def robust_vs_eps_figure(points: Iterable[Sequence[Any]]) -> Figure:
    """Robust accuracy (%) against the attack budget ε: one line per defense, 95% CI as a band.

    points: rows (defense label, eps, acc, lo, hi[, n]), accuracies as fractions in [0, 1], eps in
    the images' [0, 1] units, n the images of that point.
    """
    curves: dict[str, list[tuple[float, float, float, float]]] = {}
    ns: list[int] = []
    for defense, eps, acc, lo, hi, n in (_pad(p, 6) for p in points):
        curves.setdefault(str(defense), []).append((float(eps), float(acc), float(lo), float(hi)))
        ns += [n] if n is not None else []
    fig = new_figure(6.0, 4.0)
    ax = fig.add_subplot()
    for k, (defense, pts) in enumerate(curves.items()):
        eps, acc, lo, hi = (np.array(c) for c in zip(*sorted(pts)))
        (line,) = ax.plot(eps, 100 * acc, marker="o", linestyle=line_style(k), label=defense)
        ax.fill_between(eps, 100 * lo, 100 * hi, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("ε (ℓ∞ radius, [0, 1] pixel scale)")
    ax.set_ylabel("robust accuracy (%" + (f", {n_text(ns)})" if ns else ")"))
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    legend_outside(fig, ax, title="defense (band: 95% CI)")
    return fig


def plot_robust_vs_eps(points: Iterable[Sequence[Any]], path: str | Path) -> Path:
    """`robust_vs_eps_figure` saved as a PNG at `path`."""
    return save(robust_vs_eps_figure(points), path)


# --- defenses side by side (the ADP paper's Fig. 2) --------------------------------------------------
def _wrap(label: str, width: int = 20) -> str:
    """A tick label on lines of at most `width` characters (broken between words)."""
    return textwrap.fill(label, width, break_long_words=False, break_on_hyphens=False)


def defense_bars_figure(bars: Sequence[Sequence[Any]], title: str = "") -> Figure:
    """Grouped bars, the layout of the ADP paper's Fig. 2: one group per defense, one bar per
    column (natural accuracy, then each attack's robust accuracy), 95% CI as error bars, the value
    above each bar's upper cap.

    bars: (defense label, column label, acc, lo, hi[, n]), accuracies as fractions in [0, 1].
    The figure is as wide as its groups need (each group at least as wide as its tick label).
    """
    rows = [_pad(b, 6) for b in bars]
    groups = list(dict.fromkeys(str(b[0]) for b in rows))
    cols = list(dict.fromkeys(str(b[1]) for b in rows))
    value = {(str(g), str(c)): (acc, lo, hi) for g, c, acc, lo, hi, _ in rows}
    width = 0.8 / max(1, len(cols))
    fig = new_figure(6.0, 4.2)
    ax = fig.add_subplot()
    x = np.arange(len(groups))
    for k, c in enumerate(cols):
        acc, lo, hi = (
            np.array([value.get((g, c), (np.nan,) * 3)[j] for g in groups], dtype=float) for j in range(3)
        )
        pos = x - 0.4 + width * (k + 0.5)
        ax.bar(pos, 100 * acc, width, label=c, yerr=[100 * (acc - lo), 100 * (hi - acc)], capsize=3)
        for px, a, top in zip(pos, acc, np.fmax(acc, hi)):
            if np.isfinite(a):  # above the cap: 3 points clear of the error bar's upper end
                ax.annotate(
                    f"{100 * a:.0f}",
                    xy=(px, 100 * top),
                    xytext=(0, 3),
                    textcoords="offset points",
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
    ax.set_xticks(x, [_wrap(g) for g in groups], fontsize="small")
    ns = [n for *_, n in rows if n is not None]
    ax.set_ylabel("accuracy (%" + (f", {n_text(ns)} per bar)" if ns else ")"))
    ax.set_ylim(0, 112)  # room for the value labels above a 100% cap
    ax.set_yticks(range(0, 101, 20))
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title, fontsize="medium")
    widest = max((_inches(fig, t)[0] for t in ax.get_xticklabels()), default=0.0)
    group = max(0.45 * len(cols) + 0.4, widest + 0.3)  # inches per group
    fig.set_size_inches(1.0 + group * max(1, len(groups)), 4.2)
    legend_outside(fig, ax, title="error bars: 95% CI")
    return fig


def plot_defense_bars(bars: Sequence[Sequence[Any]], path: str | Path, title: str = "") -> Path:
    """`defense_bars_figure` saved as a PNG at `path`."""
    return save(defense_bars_figure(bars, title), path)


# --- attack loss along the iterations ----------------------------------------------------------------
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


def loss_curves_figure(traces: Mapping[tuple[str, str], Mapping[int, Any] | np.ndarray]) -> Figure:
    """Attack loss per iteration: mean over images with the interquartile range as a band.

    traces: `{(defense label, attack label): {idx: 1-D losses}}` (a 2-D array (images, iterations)
    is accepted in place of the inner dict). A flat curve says the attack stopped making progress,
    one that still rises says it needed more iterations. n is in the y label when every curve has
    the same images, else in each legend entry.
    """
    stacks = {k: _stack(v) for k, v in traces.items()}
    stacks = {k: v for k, v in stacks.items() if v.size}
    ns = {v.shape[0] for v in stacks.values()}
    fig = new_figure(6.0, 4.0)
    ax = fig.add_subplot()
    for k, ((defense, attack), losses) in enumerate(stacks.items()):
        it = np.arange(losses.shape[1])
        with np.errstate(all="ignore"):
            mean = np.nanmean(losses, axis=0)
            q1, q3 = np.nanpercentile(losses, [25, 75], axis=0)
        label = f"{defense} / {attack}" + (f" (n={losses.shape[0]})" if len(ns) > 1 else "")
        (line,) = ax.plot(it, mean, linestyle=line_style(k), label=label)
        ax.fill_between(it, q1, q3, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("attack iteration")
    ax.set_ylabel("attack loss (mean; band: IQR" + (f"; {n_text(ns)})" if len(ns) == 1 else ")"))
    ax.grid(alpha=0.3)
    legend_outside(fig, ax, title="defense / attack")
    return fig


def plot_loss_curves(
    traces: Mapping[tuple[str, str], Mapping[int, Any] | np.ndarray], path: str | Path
) -> Path:
    """`loss_curves_figure` saved as a PNG at `path`."""
    return save(loss_curves_figure(traces), path)


# --- example images ----------------------------------------------------------------------------------
def _show(ax: Any, chw: np.ndarray) -> None:
    """A (C, H, W) image in [0, 1] (grey for C = 1, RGB for C = 3), without ticks."""
    chw = np.clip(np.asarray(chw, dtype=np.float32), 0.0, 1.0)
    if chw.shape[0] == 1:
        ax.imshow(chw[0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(np.transpose(chw[:3], (1, 2, 0)), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def signed_perturbation(clean: np.ndarray, adversarial: np.ndarray) -> np.ndarray:
    """adv − clean as one (H, W) map in [−ε, ε]: the pixel's change (C = 1) or the mean change
    over the colour channels (C = 3)."""
    delta = np.asarray(adversarial, np.float32) - np.asarray(clean, np.float32)
    return delta.mean(axis=0)


def grid_inches(block_rows: Sequence[int]) -> tuple[float, float]:
    """(width, height) of an example grid whose blocks have `block_rows` rows each."""
    width = 2 * GRID_MARGIN_INCHES + 4 * GRID_CELL_INCHES + 3 * GRID_GAP_INCHES + GRID_COLORBAR_INCHES
    rows = sum(block_rows) * (GRID_CELL_INCHES + GRID_TEXT_INCHES)
    return width, 2 * GRID_MARGIN_INCHES + len(block_rows) * GRID_HEADER_INCHES + rows


def _class_name(names: Sequence[str] | None, k: int) -> str:
    """Class k's name (its index without `names`), at most 16 characters."""
    name = names[k] if names is not None and 0 <= k < len(names) else str(k)
    return name if len(name) <= 16 else name[:15] + "…"


def _under(ax: Any, text: str, color: str = "black") -> None:
    """One line of text centred under an image axes."""
    ax.text(0.5, -0.03, text, transform=ax.transAxes, ha="center", va="top", fontsize=7, color=color)


def _block_eps(block: Sequence[Any], eps: float | Mapping[str, float] | None) -> float:
    """The colour scale's ε of a block: the attack's budget, else its largest |adv − clean|."""
    attack = str(block[0][1])
    if isinstance(eps, Mapping) and attack in eps:
        return float(eps[attack])
    if isinstance(eps, (int, float)):
        return float(eps)
    peak = max(
        float(np.abs(np.asarray(e[4], np.float32) - np.asarray(e[3], np.float32)).max()) for e in block
    )
    return peak if peak > 0 else 1.0


def _axes_at(fig: Figure, left: float, bottom: float, width: float, height: float) -> Any:
    """New axes at a rectangle given in inches from the figure's lower left corner."""
    w, h = fig.get_size_inches()
    return fig.add_axes((left / w, bottom / h, width / w, height / h))


def _header(fig: Figure, block: Sequence[Any], top: float, eps: float, labels: Mapping[str, str]) -> None:
    """The block's one header line (wrapped to the figure's width), its top at `top` inches."""
    width, height = fig.get_size_inches()
    defense, attack = str(block[0][0]), str(block[0][1])
    idx = [int(e[2]) for e in block]
    header = (
        f"{labels.get(defense, defense)} · attack {labels.get(attack, attack)} · ε = {eps_text(eps)} · "
        f"test images #{min(idx)}–#{max(idx)}"
    )
    chars = int((width - 2 * GRID_MARGIN_INCHES) * 72 / 9 / 0.62)  # characters of 9 pt per line
    fig.text(
        GRID_MARGIN_INCHES / width,
        (top - 0.06) / height,
        textwrap.fill(header, chars),
        ha="left",
        va="top",
        fontsize=9,
        fontweight="bold",
    )


def _row(axes: Sequence[Any], example: Sequence[Any], eps: float, class_names: Sequence[str] | None) -> Any:
    """One example on its 4 axes with the lines under them; returns the perturbation's image."""
    _, _, i, clean, adv, purified, *classes = example
    label, prediction = _pad(classes, 2)[:2]
    for ax, img in zip(axes, (clean, adv, purified)):
        _show(ax, img)
    image = axes[3].imshow(
        signed_perturbation(clean, adv), cmap=PERTURBATION_CMAP, vmin=-eps, vmax=eps, interpolation="nearest"
    )
    axes[3].set_xticks([])
    axes[3].set_yticks([])
    _under(axes[0], f"#{int(i)}" + ("" if label is None else f" · true: {_class_name(class_names, label)}"))
    linf = float(np.abs(np.asarray(adv, np.float32) - np.asarray(clean, np.float32)).max())
    _under(axes[1], f"max |adv − clean| = {linf:.3g}")
    if prediction is not None:
        ok = label is not None and int(prediction) == int(label)
        mark = "✓" if ok else "✗"
        _under(axes[2], f"pred: {_class_name(class_names, prediction)} {mark}", RIGHT if ok else WRONG)
    return image


def _draw_block(
    fig: Figure,
    block: Sequence[Any],
    top: float,
    *,
    eps: float,
    labels: Mapping[str, str],
    class_names: Sequence[str] | None,
) -> float:
    """Draw one (defense, attack) block (header, column titles, rows, colorbar) with its top at
    `top` inches from the figure's bottom; return the block's bottom (inches)."""
    _header(fig, block, top, eps, labels)
    rgb = np.asarray(block[0][3]).shape[0] == 3
    titles = (*GRID_COLUMNS[:3], GRID_COLUMNS[3] + (" (RGB mean)" if rgb else ""))
    rows_top = y = top - GRID_HEADER_INCHES
    step = GRID_CELL_INCHES + GRID_GAP_INCHES
    for r, example in enumerate(block):
        y -= GRID_CELL_INCHES
        axes = [
            _axes_at(fig, GRID_MARGIN_INCHES + c * step, y, GRID_CELL_INCHES, GRID_CELL_INCHES)
            for c in range(4)
        ]
        image = _row(axes, example, eps, class_names)
        if r == 0:
            for ax, t in zip(axes, titles):
                ax.set_title(t, fontsize=8, pad=3)
        y -= GRID_TEXT_INCHES
    cax = _axes_at(
        fig, GRID_MARGIN_INCHES + 4 * step + 0.04, y + GRID_TEXT_INCHES, 0.12, rows_top - y - GRID_TEXT_INCHES
    )
    bar = fig.colorbar(image, cax=cax, ticks=[-eps, 0.0, eps])
    bar.ax.set_yticklabels([f"−{eps_text(eps)}", "0", f"+{eps_text(eps)}"], fontsize=7)
    bar.set_label("adv − clean ([0, 1] pixel scale)", fontsize=7)
    return y


def image_grid_figure(
    examples: Sequence[Sequence[Any]],
    *,
    eps: float | Mapping[str, float] | None = None,
    labels: Mapping[str, str] | None = None,
    class_names: Sequence[str] | None = None,
) -> Figure:
    """Example images, one block per (defense, attack) under one header line, one row per image:
    clean | adversarial | purified (one purification draw) | adv − clean, the signed perturbation in
    a diverging map on the fixed scale −ε … +ε (white = unchanged) with a colorbar; under the images
    the test index and true class, max |adv − clean|, the predicted class of the purified image.

    examples: `Example`s / tuples (defense, attack, idx, clean, adversarial, purified[, label,
    prediction]), images (C, H, W) in [0, 1] (grey for C = 1, RGB for C = 3; C = 3 shows the mean
    change over the channels), label / prediction class indices (None: not shown).
    eps: the attack's ℓ∞ budget, one float or {attack key: eps} (missing: the block's largest
    |adv − clean|). labels: {defense / attack key: short label} for the headers. class_names: index
    -> name (else the index). The figure is `grid_inches(rows per block)` large.
    """
    if not examples:
        raise ValueError("plot_image_grid needs at least one example")
    blocks: dict[tuple[str, str], list[Sequence[Any]]] = {}
    for e in examples:
        blocks.setdefault((str(e[0]), str(e[1])), []).append(e)
    width, height = grid_inches([len(b) for b in blocks.values()])
    fig = new_figure(width, height, layout=None)
    top = height - GRID_MARGIN_INCHES
    for block in blocks.values():
        top = _draw_block(
            fig, block, top, eps=_block_eps(block, eps), labels=labels or {}, class_names=class_names
        )
    return fig


def plot_image_grid(examples: Sequence[Sequence[Any]], path: str | Path, **kwargs: Any) -> Path:
    """`image_grid_figure(examples, **kwargs)` saved as a PNG at `path`."""
    return save(image_grid_figure(examples, **kwargs), path)


# --- samples of a generative model -------------------------------------------------------------------
def _tile(images: np.ndarray, columns: int) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> (rows*H, columns*W) grey or (rows*H, columns*W, 3) RGB, black fill."""
    n, c, h, w = images.shape
    rows = -(-n // columns)
    tile = np.zeros((c, rows * h, columns * w), np.float32)
    for i in range(n):
        r, k = divmod(i, columns)
        tile[:, r * h : (r + 1) * h, k * w : (k + 1) * w] = images[i]
    return tile[0] if c == 1 else np.transpose(tile[:3], (1, 2, 0))


def sample_grid_figure(images: np.ndarray, title: str, *, columns: int = 8, zoom: int = 3) -> Figure:
    """Samples (N, C, H, W) in [0, 1] as one tile, `zoom` screen pixels per image pixel (nearest
    neighbour), under a title line that says what they are (e.g. "ML-EBM samples: 64 persistent
    Langevin chains, ..."), wrapped to the tile's width."""
    images = np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0)
    tile = _tile(images, min(columns, max(1, images.shape[0])))
    margin = GRID_MARGIN_INCHES
    tile_w, tile_h = tile.shape[1] * zoom / DPI, tile.shape[0] * zoom / DPI
    width = max(tile_w, 3.0) + 2 * margin
    chars = int((width - 2 * margin) * 72 / 9 / 0.62)
    text = textwrap.fill(title, chars)
    title_h = 0.12 + 0.17 * (text.count("\n") + 1)
    height = tile_h + title_h + 2 * margin
    fig = new_figure(width, height, layout=None)
    fig.text(0.5, 1 - margin / height, text, ha="center", va="top", fontsize=9)
    ax = fig.add_axes(((width - tile_w) / 2 / width, margin / height, tile_w / width, tile_h / height))
    ax.imshow(tile, cmap="gray" if tile.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_axis_off()
    return fig


def plot_sample_grid(images: np.ndarray, path: str | Path, title: str, **kwargs: Any) -> Path:
    """`sample_grid_figure` saved as a PNG at `path`."""
    return save(sample_grid_figure(images, title, **kwargs), path)


def figure_rgb(fig: Figure) -> np.ndarray:
    """The figure rendered as an (H, W, 3) uint8 array (what the PNG shows), e.g. for W&B."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
