"""Reading a matplotlib figure's layout as drawn: where its texts, legends, bars and error bars
land on the canvas (display pixels, from the renderer's own extents), for tests that check a
figure reads at a glance: nothing outside the figure, nothing on top of the data."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.container import BarContainer
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.text import Text
from matplotlib.transforms import Bbox

TOLERANCE_PX = 0.5  # anti-aliasing slack


def draw(fig: Figure):
    """Run the figure's layout (constrained layout acts at draw time) and return its renderer."""
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def texts(fig: Figure) -> list[Text]:
    """Every visible, non-empty text the figure draws: figure texts, legend entries and titles, axes
    titles, axis labels, annotations and the tick labels of ticks inside the axis range (call after
    `draw`, which places the ticks)."""
    out: list[Text] = [*fig.texts]
    for lg in legends(fig):
        out += [*lg.get_texts(), lg.get_title()]
    for ax in fig.axes:
        out += [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
        for axis, lim in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            lo, hi = sorted(lim)
            slack = 1e-9 * (hi - lo)
            for tick in axis.get_major_ticks():
                loc = tick.get_loc()
                if loc is not None and lo - slack <= loc <= hi + slack:
                    out += [tick.label1, tick.label2]
    return [t for t in out if t.get_visible() and t.get_text().strip()]


def inside(box: Bbox, outer: Bbox, tol: float = TOLERANCE_PX) -> bool:
    return (
        box.x0 >= outer.x0 - tol
        and box.y0 >= outer.y0 - tol
        and box.x1 <= outer.x1 + tol
        and box.y1 <= outer.y1 + tol
    )


def intersect(a: Bbox, b: Bbox, tol: float = TOLERANCE_PX) -> bool:
    """True when the boxes share more than `tol` pixels in both directions."""
    return min(a.x1, b.x1) - max(a.x0, b.x0) > tol and min(a.y1, b.y1) - max(a.y0, b.y0) > tol


def outside_figure(fig: Figure) -> list[str]:
    """The texts and legends whose drawn extent leaves the figure (empty when all are inside)."""
    r = draw(fig)
    bad = [repr(t.get_text()) for t in texts(fig) if not inside(t.get_window_extent(r), fig.bbox)]
    bad += [f"legend {legend_box(lg, r)}" for lg in legends(fig) if not inside(legend_box(lg, r), fig.bbox)]
    return bad


def legends(fig: Figure) -> list[Legend]:
    return [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]


def legend_box(legend: Legend, renderer=None) -> Bbox:
    return legend.get_window_extent(renderer)


def data_boxes(ax, renderer) -> list[Bbox]:
    """Extents of the plotted data: lines, bands / collections and bars of the axes."""
    artists: Iterable = [*ax.lines, *ax.collections, *ax.patches]
    return [a.get_window_extent(renderer) for a in artists if a.get_visible()]


def legend_clear_of_data(fig: Figure, ax) -> bool:
    """Every legend lies outside the axes, or at least off every data artist's extent."""
    r = draw(fig)
    axes_box = ax.get_window_extent(r)
    for lg in legends(fig):
        box = legend_box(lg, r)
        if intersect(box, axes_box) and any(intersect(box, d) for d in data_boxes(ax, r)):
            return False
    return True


def legend_outside_axes(fig: Figure, ax) -> bool:
    r = draw(fig)
    return bool(legends(fig)) and not any(
        intersect(legend_box(lg, r), ax.get_window_extent(r)) for lg in legends(fig)
    )


def error_bar_boxes(ax, renderer) -> list[Bbox]:
    """One box per drawn error-bar segment and per cap (caps are markers of one Line2D per bar
    series: each marker gets its own box, markersize wide, marker edge width high)."""
    px = ax.figure.dpi / 72.0
    boxes = []
    for container in ax.containers:
        if not isinstance(container, BarContainer) or container.errorbar is None:
            continue
        _, caplines, barlinecols = container.errorbar.lines
        for col in barlinecols:
            assert isinstance(col, LineCollection)
            half = max(np.max(col.get_linewidths()), 1.0) * px / 2
            for seg in col.get_segments():
                (x0, y0), (x1, y1) = ax.transData.transform(np.asarray(seg))
                boxes.append(
                    Bbox([[min(x0, x1) - half, min(y0, y1) - half], [max(x0, x1) + half, max(y0, y1) + half]])
                )
        for cap in caplines:
            w = cap.get_markersize() * px / 2
            h = max(cap.get_markeredgewidth(), 1.0) * px / 2
            for x, y in ax.transData.transform(np.column_stack(cap.get_data())):
                boxes.append(Bbox([[x - w, y - h], [x + w, y + h]]))
    return boxes


def pairwise_overlaps(boxes: list[Bbox]) -> list[tuple[int, int]]:
    return [
        (i, j) for i in range(len(boxes)) for j in range(i + 1, len(boxes)) if intersect(boxes[i], boxes[j])
    ]
