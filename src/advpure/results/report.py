"""From a run directory's per-sample records to the files a person reads: results.{json,csv,md},
the console table and the plots. Everything is recomputed from the records of all processes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from advpure.results.plots import plot_image_grid, plot_loss_curves, plot_robust_vs_eps
from advpure.results.protocols import check_consistency, metric_name
from advpure.results.store import load_batches, load_examples, load_records, load_traces
from advpure.results.tables import stat_protocols, summarize, to_console, to_csv, to_json, to_markdown


def metric_values(rows: Sequence[dict], merge: str) -> dict[str, float]:
    """The scalar keys logged to W&B (`metric_name`): natural/<defense>[/<protocol>] and
    robust/<defense>/<attack>/<protocol>, for every protocol of each row."""
    out: dict[str, float] = {}
    for r in rows:
        if r["merge"] != merge:
            continue
        for p in stat_protocols([r]):
            if r.get(p) is not None:
                out[metric_name(r["defense"], r["attack"], p)] = r[p]
    return out


def write_report(
    run_dir: str | Path,
    *,
    header_lines: Sequence[str],
    labels: dict[str, str],
    merge: str,
    sweep: dict[str, float] | None = None,
    order: Sequence[tuple[str, str]] | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write results files and plots; return {'rows', 'metrics', 'plots', 'console'}.

    sweep: {attack key: eps} of the robust-vs-eps units. order: (defense, attack) pairs in the
    order the table lists them (the suite's order); others follow.
    """
    run_dir = Path(run_dir)
    records = load_records(run_dir)
    check_consistency(records)
    rows = summarize(records, load_batches(run_dir), labels=labels)
    if order:
        rank = {pair: i for i, pair in enumerate(order)}
        rows.sort(key=lambda r: rank.get((r["defense"], r["attack"]), len(rank)))  # stable: merges keep order
    to_json(rows, run_dir / "results.json", {**(meta or {}), "header": list(header_lines), "merge": merge})
    to_csv(rows, run_dir / "results.csv")
    (run_dir / "results.md").write_text(to_markdown(rows, header_lines=header_lines, merge=merge))

    plots: dict[str, Path] = {}
    pdir = run_dir / "plots"
    pdir.mkdir(exist_ok=True)
    sweep = sweep or {}
    traces = {k: v for k, v in load_traces(run_dir).items() if k[1] not in sweep}
    if traces:
        plots["loss_curves"] = plot_loss_curves(
            {(labels.get(d, d), labels.get(a, a)): t for (d, a), t in traces.items()},
            pdir / "loss_curves.png",
        )
    if sweep:
        points = [
            (
                labels.get(r["defense"], r["defense"]),
                sweep[r["attack"]],
                r["single"],
                r["single_lo"],
                r["single_hi"],
            )
            for r in rows
            if r["merge"] == merge and r["attack"] in sweep and r["single"] is not None
        ]
        if points:
            plots["robust_vs_eps"] = plot_robust_vs_eps(points, pdir / "robust_vs_eps.png")
    examples = load_examples(run_dir)
    for defense in dict.fromkeys(e.defense for e in examples):
        mine = [e for e in examples if e.defense == defense]
        # one grid per defense: the attack listed last in the table (the strongest ones come last)
        attack = [
            r["attack"]
            for r in rows
            if r["defense"] == defense and any(e.attack == r["attack"] for e in mine)
        ][-1]
        chosen = [e for e in mine if e.attack == attack]
        plots[f"grid_{defense}"] = plot_image_grid(chosen, pdir / f"grid_{defense}_{attack}.png")
    shown = [r for r in rows if r["merge"] == merge]
    console = "\n".join([*header_lines, "", to_console(shown)])
    return {"rows": rows, "metrics": metric_values(rows, merge), "plots": plots, "console": console}
