"""From a run directory's per-sample records to the files a person reads: results.{json,csv,md},
the console table and the plots. Everything is recomputed from the records of all processes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advpure.core.fsio import storage_errors, write_text_atomic
from advpure.results.checks_report import checks_markdown, checks_metrics, run_checks
from advpure.results.plots import plot_defense_bars, plot_image_grid, plot_loss_curves, plot_robust_vs_eps
from advpure.results.protocols import check_consistency, metric_name
from advpure.results.rundir import load_batches, load_examples, load_records, load_stats, load_traces
from advpure.results.store import EXAMPLE_LABEL, EXAMPLE_PREDICTION, NATURAL, Example
from advpure.results.tables import stat_protocols, summarize, to_console, to_csv, to_json, to_markdown
from advpure.results.worst_case import WORST_CASE, WORST_CASE_ALL, worst_case_records


@dataclass
class ReportPlan:
    """What the report needs to know about the units of a run (attack keys, as in the records)."""

    order: list[tuple[str, str]] = field(
        default_factory=list
    )  # (defense, attack) rows of the table, in order
    main: list[str] = field(default_factory=list)  # the threat model's attacks: the worst case combines them
    sweep: dict[str, float] = field(default_factory=dict)  # eps-sweep attack key -> eps
    hidden: set[str] = field(default_factory=set)  # check runs: in the Checks section, not the table
    unbounded: str | None = None  # the eps = 1 check run
    budget_pairs: list[tuple[str, str]] = field(default_factory=list)  # (base, 2x-budget check run)
    # fixed-step attack key -> (iterations, step, eps): can it travel the whole eps?
    reach: dict[str, tuple[int, float, float]] = field(default_factory=dict)
    black_box: list[str] = field(default_factory=list)
    white_box: list[str] = field(default_factory=list)
    # key -> full description, for the captions (`Plan.descriptions`; the table rows show `labels`)
    descriptions: dict[str, str] = field(default_factory=dict)
    eps: dict[str, float] = field(default_factory=dict)  # attack key -> its l_inf budget (grid scale)
    class_names: tuple[str, ...] | None = None  # class index -> name, under the grid's images
    cited: list[str] = field(
        default_factory=list
    )  # cited tables printed after the results (`benchmark.cited`)


# captions under the figures (results.md, W&B), before the labels they explain
CAPTIONS = {
    "loss_curves": "Attack loss per iteration (mean over the images; band: interquartile range) of each "
    "(defense, attack) pair: a curve still rising at its end says the attack needed more iterations.",
    "robust_vs_eps": "Robust accuracy (%, single draw) against the l_inf budget ε (images in [0, 1]); "
    "band: 95% Wilson interval.",
    "defenses": "Natural and robust accuracy (%, single draw) of each defense side by side, the layout "
    "of Fig. 2 of Yoon et al. 2021 (ADP); error bars: 95% Wilson intervals, the value above each bar.",
    "grid": "Rows: clean test image, adversarial image, one purification draw of it, and the signed "
    "perturbation adv − clean on the fixed scale −ε … +ε (white: unchanged; red: brighter; blue: darker). "
    "Under them: test index and true class; the largest pixel change; the classifier's class of the "
    "purified image (green: correct, red: wrong).",
}


def explained(keys: Iterable[str], labels: Mapping[str, str], descriptions: Mapping[str, str]) -> list[str]:
    """The full description of each label of `keys` that has more to say than its short label, led
    by that label ("standard_rand (APGD-CE, ...)", "DSM + Det (ADP) = ADP σ=0.25: T=10, ...")."""
    out = []
    for k in dict.fromkeys(keys):
        short, full = labels.get(k, k), descriptions.get(k)
        if full and full != short:
            out.append(full if full.startswith(short) else f"{short} = {full}")
    return out


def caption(
    text: str, keys: Iterable[str], labels: Mapping[str, str], descriptions: Mapping[str, str]
) -> str:
    """`text`, then the full description of each label of `keys` the figure shows (`explained`)."""
    return " ".join([text, *(f"{line}." for line in explained(keys, labels, descriptions))])


def figures_markdown(plots: Mapping[str, Path], captions: Mapping[str, str], run_dir: Path) -> str:
    """The "Figures" section of results.md: each plot (linked relative to the run dir) and its caption."""
    out = ["## Figures"]
    for name, path in plots.items():
        out += ["", f"![{name}]({Path(path).relative_to(run_dir).as_posix()})", "", f"*{captions[name]}*"]
    return "\n".join(out)


def labels_markdown(keys: Iterable[str], labels: Mapping[str, str], descriptions: Mapping[str, str]) -> str:
    """'**Labels.** <full description>; ...' for the table's attacks whose row label is short ("" if none)."""
    said = explained(keys, labels, descriptions)
    return "**Labels.** " + "; ".join(said) + "." if said else ""


def with_classes(examples: Iterable[Example], stats: Mapping[tuple[str, str], Mapping]) -> list[Example]:
    """The examples with their true and predicted class from the per-sample stats (None if absent)."""
    out = []
    for e in examples:
        s = stats.get((e.defense, e.attack), {})
        label, pred = (s.get(name, {}).get(e.idx) for name in (EXAMPLE_LABEL, EXAMPLE_PREDICTION))
        out.append(
            e._replace(
                label=None if label is None else int(label), prediction=None if pred is None else int(pred)
            )
        )
    return out


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
    plan: ReportPlan | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write results files and plots; return {'rows', 'metrics', 'plots', 'console', 'checks'}.

    Rows: every (defense, attack, merge) of the records, plus the worst case over `plan.main`
    (AutoAttack's per-sample rule; Croce et al. 2022) after each defense's attacks; the check runs
    (`plan.hidden`) feed the Checks section of results.md instead of the table.
    """
    run_dir = Path(run_dir)
    plan = plan or ReportPlan()
    records = load_records(run_dir)
    check_consistency(records)
    sections: list[str] = []
    wc_labels: dict[str, str] = {}
    extra: list = []
    if plan.main:
        wc = worst_case_records(records, plan.main, labels=labels)
        extra, wc_labels = wc.records, wc.labels
        sections.append(f"**Worst case over attacks.** {wc.note}")
    labels = {**labels, **wc_labels}
    rows = summarize([*records, *extra], load_batches(run_dir), labels=labels)
    order = list(plan.order)
    for d in dict.fromkeys(d for d, _ in plan.order):  # worst-case rows after each defense's attacks
        last = max(i for i, (dd, _) in enumerate(order) if dd == d)
        order[last + 1 : last + 1] = [(d, WORST_CASE), (d, WORST_CASE_ALL)]
    if order:
        rank = {pair: i for i, pair in enumerate(order)}
        rows.sort(key=lambda r: rank.get((r["defense"], r["attack"]), len(rank)))  # stable: merges keep order
    traces = {
        k: v for k, v in load_traces(run_dir).items() if k[1] not in plan.sweep and k[1] not in plan.hidden
    }
    zero_grad = {k: v["zero_grad"] for k, v in load_stats(run_dir).items() if "zero_grad" in v}
    checks = run_checks(
        records=records,
        rows=rows,
        traces={k: v for k, v in traces.items() if k[1] in plan.main},
        zero_grad={k: v for k, v in zero_grad.items() if k[1] in plan.main},
        unbounded=plan.unbounded,
        sweep=plan.sweep,
        black_box=plan.black_box,
        white_box=plan.white_box,
        budget_pairs=plan.budget_pairs,
        reach={k: v for k, v in plan.reach.items() if k in plan.main},
        merge=merge,
        labels=labels,
    )
    sections.append(checks_markdown(checks))
    table = [r for r in rows if r["attack"] not in plan.hidden]
    to_json(rows, run_dir / "results.json", {**(meta or {}), "header": list(header_lines), "merge": merge})
    to_csv(rows, run_dir / "results.csv")
    plots, captions = _plots(run_dir, rows, table, traces, plan, labels, merge)
    sections.append(labels_markdown((r["attack"] for r in table), labels, plan.descriptions))
    sections.append(figures_markdown(plots, captions, run_dir))
    md = to_markdown(
        table, header_lines=header_lines, merge=merge, sections=[s for s in sections if s], cited=plan.cited
    )
    write_text_atomic(run_dir / "results.md", md, what="results file")
    shown = [r for r in table if r["merge"] == merge]
    warnings = [c for c in checks if c.status == "warn"]
    console = "\n".join(
        [
            *header_lines,
            "",
            to_console(shown),
            "",
            f"checks: {len(checks) - len(warnings)} of {len(checks)} pass",
        ]
        + [f"  warn: {c.name}: {c.message}" for c in warnings]
    )
    metrics = {**metric_values(rows, merge), **checks_metrics(checks)}
    return {
        "rows": rows,
        "metrics": metrics,
        "plots": plots,
        "captions": captions,
        "console": console,
        "checks": checks,
    }


def _plots(
    run_dir: Path,
    rows: Sequence[dict],
    table: Sequence[dict],
    traces: Mapping[tuple[str, str], Any],
    plan: ReportPlan,
    labels: Mapping[str, str],
    merge: str,
) -> tuple[dict[str, Path], dict[str, str]]:
    """Write the run's figures under `run_dir/plots` with short labels; return ({name: path},
    {name: caption}), each caption ending with the full descriptions of the labels it shows."""
    plots: dict[str, Path] = {}
    captions: dict[str, str] = {}
    pdir = run_dir / "plots"
    with storage_errors(pdir, "plots folder", "create"):
        pdir.mkdir(exist_ok=True)
    desc = plan.descriptions

    def add(name: str, path: Path, text: str, keys: Iterable[str]) -> None:
        plots[name], captions[name] = path, caption(text, keys, labels, desc)

    if traces:  # in the table's order
        rank = {pair: i for i, pair in enumerate(plan.order)}
        traces = dict(sorted(traces.items(), key=lambda kv: rank.get(kv[0], len(rank))))
        path = plot_loss_curves(
            {(labels.get(d, d), labels.get(a, a)): t for (d, a), t in traces.items()},
            pdir / "loss_curves.png",
        )
        add("loss_curves", path, CAPTIONS["loss_curves"], [k for pair in traces for k in pair])
    sweep = plan.sweep
    swept = [r for r in rows if r["merge"] == merge and r["attack"] in sweep and r["single"] is not None]
    if swept:
        points = [
            (r["defense_label"], sweep[r["attack"]], r["single"], r["single_lo"], r["single_hi"], r["n"])
            for r in swept
        ]
        path = plot_robust_vs_eps(points, pdir / "robust_vs_eps.png")
        attacks = sorted({r["attack"].split("@")[0] for r in swept})
        text = f"{CAPTIONS['robust_vs_eps']} Attack: {', '.join(labels.get(a, a) for a in attacks)}."
        add("robust_vs_eps", path, text, [*(r["defense"] for r in swept), *attacks])
    purified = [d for d in dict.fromkeys(d for d, _ in plan.order) if d != "none"]
    if len(purified) > 1:  # defenses side by side (Fig. 2 of Yoon et al. 2021 (ADP)): natural + each attack
        shown = [
            r
            for r in table
            if r["merge"] == merge
            and r["defense"] in purified
            and r["single"] is not None
            and r["attack"] not in sweep
            and not r["attack"].startswith("worst_case")
        ]
        bars = [
            (
                r["defense_label"],
                "natural" if r["attack"] == NATURAL else r["attack_label"],
                r["single"],
                r["single_lo"],
                r["single_hi"],
                r["n"],
            )
            for r in shown
        ]
        path = plot_defense_bars(
            bars, pdir / "defenses.png", title="natural and robust accuracy (single draw)"
        )
        add("defenses", path, CAPTIONS["defenses"], [k for r in shown for k in (r["defense"], r["attack"])])
    examples = with_classes(load_examples(run_dir), load_stats(run_dir))
    order = list(dict.fromkeys(d for d, _ in plan.order))
    for defense in sorted(
        dict.fromkeys(e.defense for e in examples),
        key=lambda d: (d not in order, order.index(d) if d in order else 0),
    ):
        mine = [e for e in examples if e.defense == defense]
        # one grid per defense: the attack listed last in the table (the strongest ones come last)
        attack = [
            r["attack"]
            for r in rows
            if r["defense"] == defense and any(e.attack == r["attack"] for e in mine)
        ][-1]
        path = plot_image_grid(
            [e for e in mine if e.attack == attack],
            pdir / f"grid_{defense}_{attack}.png",
            eps=plan.eps,
            labels=labels,
            class_names=plan.class_names,
        )
        add(f"grid_{defense}", path, CAPTIONS["grid"], [defense, attack])
    return plots, captions
