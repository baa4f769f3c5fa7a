"""From a certification run's stored per-image certificates to the files a person reads:
results.{json,csv,md}, the console table and `plots/certified_accuracy.png`.

Every number is recomputed from the records of all rank files (`load_certificates`):

* certified accuracy at l2 radius r (Cohen, Rosenfeld & Kolter 2019): the fraction of images whose
  CERTIFY prediction is the label with certified radius >= r (`advpure.certify.certified_accuracy`),
  with a 95% Wilson interval (statsmodels) over the n images; at r = 0 it is the natural accuracy of
  CERTIFY (an abstention counts as wrong);
* natural accuracy (PREDICT): PREDICT's answer (two-sided binomial test of the top two counts at
  level alpha, abstaining counts as wrong) on the n estimation draws equals the label;
* abstain rate: CERTIFY abstained (p_A < 1/2);
* ACR: average certified radius (Zhai et al., ICLR 2020), the radius of correct certificates and 0
  for the others, averaged over all images;
* images/s: images / the summed per-image certification seconds (per process), and its physical
  limit (n0 + n) x the batched forward rate of the base classifier (denoiser + classifier), rows/s
  of its own forwards timed inside the same run on the same rows (`advpure.jobs.certify_loop.TimedBase`);
  overhead = certification time / that limit's time (goal <= 1.10).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from statsmodels.stats.proportion import proportion_confint

from advpure.certify.stats import ABSTAIN, certified_accuracy
from advpure.core.fsio import atomic_write, write_text_atomic
from advpure.results import plots
from advpure.results.rundir import load_certificates, rank_files
from advpure.results.store import RecordStore

CI_ALPHA = 0.05  # 95% Wilson intervals of every accuracy cell

# Numbers copied as printed in the sources: CIFAR-10, certified accuracy (%) at l2 radius 0.25 / 0.5 / 0.75 / 1.0.
CITED_HEADING = "Cited, not measured here: CIFAR-10 certified accuracy (%) at l2 radius r"
CITED = [
    (
        "Cohen et al. 2019, randomized smoothing, Gaussian-noise-trained ResNet-110, N = 100,000, best σ per radius",
        {0.25: "60", 0.5: "43", 0.75: "32", 1.0: "23"},
    ),
    (
        "Salman et al. 2020, denoised smoothing (full access: denoiser trained with the classifier's loss)",
        {0.25: "56", 0.5: "41", 0.75: "28", 1.0: "19"},
    ),
]


def wilson_ci(k: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of k successes in n trials (statsmodels); (0, 1) for n = 0."""
    if n == 0:
        return 0.0, 1.0
    lo, hi = proportion_confint(int(k), int(n), alpha=CI_ALPHA, method="wilson")
    return float(lo), float(hi)


def radius_key(r: float) -> str:
    """Column name of certified accuracy at radius r, e.g. `r0.25`."""
    return f"r{float(r):g}"


def _limits(run_dir: Path, units: Sequence[tuple[str, float]], keep: set) -> dict[tuple[str, float], dict]:
    """Per unit: certification seconds and images of each rank file, paired with the forward rate that
    the same process measured; summed into the time the base alone would have taken."""
    from advpure.jobs.certify_loop import unit_key

    out: dict[tuple[str, float], dict] = {}
    for path in rank_files(run_dir):
        with RecordStore(path) as store:
            certs = [r for r in store.certificates() if (r["base"], float(r["sigma"]), int(r["idx"])) in keep]
            for unit in units:
                mine = [r for r in certs if (r["base"], float(r["sigma"])) == unit]
                limit = store.get_meta(f"limit/{unit_key(*unit)}")
                if not mine or not limit or not limit.get("rows_per_s"):
                    continue
                agg = out.setdefault(unit, {"seconds": 0.0, "limit_seconds": 0.0, "rows_per_s": []})
                agg["seconds"] += sum(r["seconds"] for r in mine)
                agg["limit_seconds"] += sum((r["n0"] + r["n"]) / limit["rows_per_s"] for r in mine)
                agg["rows_per_s"].append(limit["rows_per_s"])
    return out


def summarize(
    records: Iterable[Mapping[str, Any]],
    units: Sequence[tuple[str, float]],
    radii: Sequence[float],
    limits: Mapping[tuple[str, float], Mapping] | None = None,
) -> list[dict[str, Any]]:
    """One row per (base, sigma) unit, in `units` order: certified accuracy at each radius with its
    Wilson CI, ACR, abstain rate, natural accuracy (PREDICT and CERTIFY), n, images/s, overhead."""
    by_unit: dict[tuple[str, float], list[Mapping]] = {}
    for r in records:
        by_unit.setdefault((r["base"], float(r["sigma"])), []).append(r)
    rows = []
    for base, sigma in units:
        recs = by_unit.get((base, float(sigma)), [])
        n = len(recs)
        acc = certified_accuracy(recs, radii)
        row: dict[str, Any] = {"base": base, "sigma": float(sigma), "n": n}
        for r in radii:
            k = round(acc[float(r)] * n) if n else 0
            lo, hi = wilson_ci(k, n)
            row[radius_key(r)], row[radius_key(r) + "_lo"], row[radius_key(r) + "_hi"] = (
                acc[float(r)] if n else None,
                lo,
                hi,
            )
        correct = [r["prediction"] == r["label"] and r["prediction"] != ABSTAIN for r in recs]
        pred_ok = sum(int(r["predict"] == r["label"] and r["predict"] != ABSTAIN) for r in recs)
        abstain = sum(int(bool(r["abstained"])) for r in recs)
        row["natural_predict"] = pred_ok / n if n else None
        row["natural_predict_lo"], row["natural_predict_hi"] = wilson_ci(pred_ok, n)
        row["natural_certify"] = sum(correct) / n if n else None
        row["abstain"] = abstain / n if n else None
        row["acr"] = float(np.mean([r["radius"] if c else 0.0 for r, c in zip(recs, correct)])) if n else None
        row["n0"] = int(recs[0]["n0"]) if n else None
        row["n_samples"] = int(recs[0]["n"]) if n else None
        row["alpha"] = float(recs[0]["alpha"]) if n else None
        seconds = sum(r["seconds"] for r in recs)
        row["images_per_s"] = n / seconds if seconds > 0 else None
        lim = (limits or {}).get((base, float(sigma)))
        if lim and lim["seconds"] > 0 and lim["limit_seconds"] > 0:
            row["limit_images_per_s"] = n / lim["limit_seconds"]
            row["overhead"] = lim["seconds"] / lim["limit_seconds"]
            row["forward_rows_per_s"] = float(np.median(lim["rows_per_s"]))
        else:
            row["limit_images_per_s"] = row["overhead"] = row["forward_rows_per_s"] = None
        rows.append(row)
    return rows


def envelope(rows: Sequence[Mapping[str, Any]], radii: Sequence[float]) -> list[dict[str, Any]]:
    """Per base: at each radius the best certified accuracy over its sigmas, and that sigma
    (Cohen et al. 2019 report this "best sigma per radius" envelope)."""
    out = []
    for base in dict.fromkeys(r["base"] for r in rows):
        mine = [r for r in rows if r["base"] == base and r["n"]]
        if not mine:
            continue
        env: dict[str, Any] = {"base": base}
        for rad in radii:
            best = max(mine, key=lambda r: r[radius_key(rad)])
            env[radius_key(rad)], env[radius_key(rad) + "_sigma"] = best[radius_key(rad)], best["sigma"]
        out.append(env)
    return out


def metric_values(rows: Sequence[Mapping[str, Any]], radii: Sequence[float]) -> dict[str, float]:
    """W&B scalars: `certify/<base>/s<sigma>/r<radius>` (certified accuracy, a fraction), and per unit
    `.../abstain`, `.../natural_predict`, `.../acr`, `.../images_per_s`."""
    out = {}
    for row in rows:
        if not row["n"]:
            continue
        prefix = f"certify/{row['base']}/s{row['sigma']:g}"
        for r in radii:
            out[f"{prefix}/r{float(r):g}"] = row[radius_key(r)]
        for k in ("abstain", "natural_predict", "acr", "images_per_s", "overhead"):
            if row.get(k) is not None:
                out[f"{prefix}/{k}"] = row[k]
    return out


# --- rendering -------------------------------------------------------------------------------------
def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _cell(row: Mapping, key: str) -> str:
    if row.get(key) is None:
        return "–"
    return f"{_pct(row[key])} [{_pct(row[key + '_lo'])}, {_pct(row[key + '_hi'])}]"


def _num(v: float | None, digits: int) -> str:
    return "–" if v is None else f"{v:,.{digits}f}"


def to_markdown(
    rows: Sequence[Mapping], env: Sequence[Mapping], radii: Sequence[float], header_lines: Sequence[str]
) -> str:
    """The measured table under its settings, the best-sigma envelope, then the cited anchors."""
    rcols = [f"r = {float(r):g}" for r in radii]
    out = ["# Certified robustness (randomized smoothing, Cohen et al. 2019)", ""]
    out += [f"- {line}" for line in header_lines]
    out += [
        "",
        "Certified accuracy in % at each l2 radius r (images in [0, 1]) with its 95% Wilson interval: CERTIFY "
        "returned the label with certified radius >= r (r = 0: CERTIFY's natural accuracy, abstaining = wrong). "
        "Natural (PREDICT) = PREDICT's answer on the n estimation draws is the label. Abstain = CERTIFY abstained "
        "(p_A < 1/2). ACR = average certified radius (Zhai et al. 2020). img/s = images per second of "
        "certification per process; overhead = certification time / the time of (n0 + n) forwards per image of "
        "the base classifier at its batched rate, timed inside the same run (goal <= 1.10).",
        "",
        "| Base | σ | " + " | ".join(rcols) + " | ACR | Abstain | Natural (PREDICT) | n | img/s | overhead |",
        "|---|---:|" + "---:|" * len(rcols) + "---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [r["base"], f"{r['sigma']:g}", *(_cell(r, radius_key(x)) for x in radii)]
        cells += [_num(r["acr"], 3), _pct(r["abstain"]), _cell(r, "natural_predict"), str(r["n"])]
        cells += [_num(r["images_per_s"], 3), _num(r["overhead"], 2)]
        out.append("| " + " | ".join(cells) + " |")
    if env:
        out += [
            "",
            "Best σ per radius (the envelope over σ of each base, as Cohen et al. report it; certified accuracy %, "
            "the σ in parentheses):",
            "",
            "| Base | " + " | ".join(rcols) + " |",
            "|---|" + "---:|" * len(rcols),
        ]
        for e in env:
            cells = [f"{_pct(e[radius_key(x)])} (σ={e[radius_key(x) + '_sigma']:g})" for x in radii]
            out.append(f"| {e['base']} | " + " | ".join(cells) + " |")
    out += ["", *cited_markdown()]
    return "\n".join(out) + "\n"


def cited_markdown() -> list[str]:
    """The published CIFAR-10 anchors, marked as not measured here."""
    radii = [0.25, 0.5, 0.75, 1.0]
    lines = [
        f"## {CITED_HEADING}",
        "",
        "| Source (CIFAR-10, not this dataset, not this run) | "
        + " | ".join(f"r = {r:g}" for r in radii)
        + " |",
        "|---|" + "---:|" * len(radii),
    ]
    for name, values in CITED:
        lines.append(f"| {name} | " + " | ".join(values[r] for r in radii) + " |")
    return lines


def to_console(rows: Sequence[Mapping], radii: Sequence[float]) -> str:
    head = ["base", "sigma", *(f"r={float(r):g}" for r in radii), "abstain", "nat(PREDICT)", "n", "img/s"]
    body = [
        [
            r["base"],
            f"{r['sigma']:g}",
            *(_pct(r[radius_key(x)]) for x in radii),
            _pct(r["abstain"]),
            _pct(r["natural_predict"]),
            str(r["n"]),
            _num(r["images_per_s"], 3),
        ]
        for r in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head), *(fmt(b) for b in body)])


def to_csv(rows: Sequence[Mapping], path: Path) -> None:
    """Every field of every row (missing = empty), written atomically; StorageError when it cannot be."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_write(path, what="results table", text=True, newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in keys})


def certified_accuracy_figure(
    records: Sequence[Mapping], units: Sequence[tuple[str, float]], radii: Sequence[float]
) -> Figure:
    """Certified accuracy (%) against the l2 radius: one thin curve per (base, sigma) (line style per
    sigma, colour per base) and each base's envelope over sigma as a thick line; the legend right of
    the axes, n (images) in the y label."""
    fig = plots.new_figure(6.0, 4.2)
    ax = fig.add_subplot()
    top = max([float(r["radius"]) for r in records] + [float(max(radii))])
    grid = np.linspace(0.0, 1.05 * top, 400)
    styles = ["--", ":", "-.", (0, (5, 1)), (0, (1, 3))]
    sigmas = list(dict.fromkeys(s for _, s in units))
    colours = {b: f"C{i}" for i, b in enumerate(dict.fromkeys(b for b, _ in units))}
    ns = []
    for base in colours:
        curves = []
        for b, sigma in units:
            if b != base:
                continue
            mine = [r for r in records if r["base"] == b and float(r["sigma"]) == float(sigma)]
            if not mine:
                continue
            ns.append(len(mine))
            acc = certified_accuracy(mine, grid)
            y = 100 * np.array([acc[float(g)] for g in grid])
            curves.append(y)
            ax.plot(
                grid,
                y,
                color=colours[base],
                linestyle=styles[sigmas.index(sigma) % len(styles)],
                linewidth=1.2,
                label=f"{base}, σ={sigma:g}",
            )
        if len(curves) > 1:
            ax.plot(
                grid,
                np.max(curves, axis=0),
                color=colours[base],
                linewidth=2.6,
                alpha=0.6,
                label=f"{base}, best σ",
            )
    ax.set_xlabel("ℓ2 radius r ([0, 1] pixel scale)")
    ax.set_ylabel(f"certified accuracy (%, {plots.n_text(ns)})")
    ax.set_ylim(0, 100)
    ax.set_xlim(0, grid[-1])
    ax.grid(alpha=0.3)
    plots.legend_outside(fig, ax, title="base, σ")
    return fig


def plot_certified_accuracy(
    records: Sequence[Mapping], units: Sequence[tuple[str, float]], path: Path, radii: Sequence[float]
) -> Path:
    """`certified_accuracy_figure` saved as a PNG at `path`."""
    return plots.save(certified_accuracy_figure(records, units, radii), path)


CERTIFY_CAPTION = (
    "Certified accuracy (%) of randomized smoothing (CERTIFY, Cohen et al. 2019) against the ℓ2 radius r "
    "(images in [0, 1]): thin lines one (base, σ), thick lines each base's best σ per radius."
)


def write_certify_report(
    run_dir: str | Path,
    *,
    indices: Iterable[int],
    units: Sequence[tuple[str, float]],
    radii: Sequence[float],
    header_lines: Sequence[str],
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write results.{json,csv,md} and plots/certified_accuracy.png of the images `indices` and the
    (base, sigma) `units` (other stored records are ignored); return {'rows', 'envelope', 'metrics',
    'plots', 'console', 'records'}."""
    run_dir = Path(run_dir)
    indices = {int(i) for i in indices}
    units = [(b, float(s)) for b, s in units]
    wanted = set(units)
    records = [
        r
        for r in load_certificates(run_dir)
        if (r["base"], float(r["sigma"])) in wanted and int(r["idx"]) in indices
    ]
    keep = {(r["base"], float(r["sigma"]), int(r["idx"])) for r in records}
    rows = summarize(records, units, radii, _limits(run_dir, units, keep))
    env = envelope(rows, radii)
    write_text_atomic(
        run_dir / "results.md", to_markdown(rows, env, radii, header_lines), what="results file"
    )
    to_csv(rows, run_dir / "results.csv")
    payload = {
        "rows": rows,
        "envelope": env,
        "radii": [float(r) for r in radii],
        "header": list(header_lines),
        **(meta or {}),
    }
    write_text_atomic(
        run_dir / "results.json", json.dumps(payload, indent=1, default=str), what="results file"
    )
    plot = plot_certified_accuracy(records, units, run_dir / "plots" / "certified_accuracy.png", radii)
    console = "\n".join([*header_lines, "", to_console(rows, radii)])
    return {
        "rows": rows,
        "envelope": env,
        "metrics": metric_values(rows, radii),
        "plots": {"certified_accuracy": plot},
        "captions": {"certified_accuracy": CERTIFY_CAPTION},
        "console": console,
        "records": records,
    }
