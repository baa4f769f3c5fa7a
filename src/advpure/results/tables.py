"""From per-sample records to the tables a paper reports.

`summarize` is the only place where records are reduced to accuracies: every number in the
markdown / console / CSV / JSON outputs comes from its rows, so they cannot disagree.

Row format (`summarize` returns a list of these dicts; accuracies are fractions in [0, 1], None
when there are no records; the renderers turn them into percentages with 2 decimals)::

    defense, attack, merge            names as stored
    defense_label, attack_label       display names (from `labels`, else the names)
    n                                 images with a `single` record in this row
    natural, natural_lo, natural_hi, natural_n
                                      clean accuracy of the same defense and merge (protocol
                                      single), on exactly this row's images
    <p>, <p>_lo, <p>_hi, <p>_n        for every protocol p in the records (single, worst_of_n,
                                      mean_of_n, ever_broken, and any registered one): robust
                                      accuracy, 95% Wilson CI, images
    score_evals_per_img, seconds_per_img           cost of this (defense, attack) from its batch
                                                   markers, divided by n (None without markers)
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from advpure.core.fsio import atomic_write, write_text_atomic
from advpure.purify.merge import MERGE_RULES
from advpure.results.cited import ADP_HEADING as CITED_HEADING  # noqa: F401 (re-exported)
from advpure.results.cited import cited_markdown
from advpure.results.protocols import PROTOCOLS, protocol
from advpure.results.stats import accuracy
from advpure.results.store import NATURAL

_TEXT_COLUMNS = {"defense", "attack", "merge", "defense_label", "attack_label"}


def stat_protocols(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Every protocol with stat fields in `rows` (registration order first, then others sorted)."""
    found = {c[:-3] for r in rows for c in r if c.endswith("_lo") and c != "natural_lo"}
    known = [p for p in PROTOCOLS.names() if p in found]
    return known + sorted(found - set(known))


def protocols_in(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The protocols that have a value in at least one of `rows`, in `stat_protocols` order."""
    return [p for p in stat_protocols(rows) if any(r.get(p) is not None for r in rows)]


def columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """CSV columns of `rows`: names, n, natural and every protocol's stats, cost."""
    stats = [f"{p}{s}" for p in ("natural", *stat_protocols(rows)) for s in ("", "_lo", "_hi", "_n")]
    head = ["defense", "attack", "merge", "defense_label", "attack_label", "n"]
    return [*head, *stats, "score_evals_per_img", "seconds_per_img"]


def _label(name: str) -> str:
    return protocol(name).label if name in PROTOCOLS else name


def _sort_key(defense: str, attack: str, merge: str) -> tuple:
    """Undefended first, clean accuracy before attacks, merges in their canonical order."""
    merge_rank = MERGE_RULES.index(merge) if merge in MERGE_RULES else len(MERGE_RULES)
    return (defense != "none", defense, attack != NATURAL, attack, merge_rank, merge)


def summarize(
    records: Iterable[Sequence],
    batches: Iterable[Sequence] | None = None,
    *,
    labels: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """One row per (defense, attack, merge); see the module docstring for the fields.

    records: `Record`s or 6-tuples (defense, attack, protocol, merge, idx, value).
    batches: `Batch`es or 7-tuples (defense, attack, batch, first_idx, n, score_evals, seconds).
    The attack's cost is shared by its merge rules (one attack run is classified with each of
    them), so every merge row of a (defense, attack) shows the same cost per image.
    labels: display names for defenses and attacks, e.g. {"adp_s0.25": "ADP σ=0.25"}.
    """
    labels = labels or {}
    # values[(defense, attack, merge)][protocol] = {idx: value}
    values: dict[tuple[str, str, str], dict[str, dict[int, float]]] = {}
    for defense, attack, name, merge, idx, value in records:
        values.setdefault((defense, attack, merge), {}).setdefault(name, {})[int(idx)] = float(value)

    cost: dict[tuple[str, str], list[float]] = {}
    for defense, attack, _batch, _first, _n, score_evals, seconds in batches or ():
        c = cost.setdefault((defense, attack), [0.0, 0.0])
        c[0] += score_evals
        c[1] += seconds

    rows = []
    for defense, attack, merge in sorted(values, key=lambda k: _sort_key(*k)):
        by_protocol = values[(defense, attack, merge)]
        images = sorted(by_protocol.get("single", {}))
        row: dict[str, Any] = {
            "defense": defense,
            "attack": attack,
            "merge": merge,
            "defense_label": labels.get(defense, defense),
            "attack_label": labels.get(attack, attack),
            "n": len(images),
        }
        clean = values.get((defense, NATURAL, merge), {}).get("single", {})
        _put(row, "natural", [clean[i] for i in images if i in clean])
        for name in [*PROTOCOLS.names(), *sorted(set(by_protocol) - set(PROTOCOLS))]:
            _put(row, name, list(by_protocol.get(name, {}).values()))
        spent = cost.get((defense, attack))
        n = len(images)
        row["score_evals_per_img"] = spent[0] / n if spent and n else None
        row["seconds_per_img"] = spent[1] / n if spent and n else None
        rows.append(row)
    return rows


def _put(row: dict[str, Any], name: str, vals: list[float]) -> None:
    acc, lo, hi, n = accuracy(vals)
    if n == 0:
        row.update({name: None, f"{name}_lo": None, f"{name}_hi": None, f"{name}_n": 0})
    else:
        row.update({name: acc, f"{name}_lo": lo, f"{name}_hi": hi, f"{name}_n": n})


# --- rendering ------------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def _num(x: float | None, digits: int) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def _ci(row: Mapping[str, Any]) -> str:
    if row.get("single") is None:
        return "–"
    return f"[{_pct(row['single_lo'])}, {_pct(row['single_hi'])}]"


def to_markdown(
    rows: Sequence[Mapping[str, Any]],
    *,
    header_lines: Sequence[str],
    merge: str = "softmax",
    sections: Sequence[str] = (),
    cited: Sequence[str] = (),
) -> str:
    """The measured table (rows of one merge rule) under its settings, then `sections` (markdown
    blocks: notes, checks), then the cited tables named in `cited` (`advpure.results.cited`; the
    experiment's `benchmark.cited`)."""
    shown = [r for r in rows if r["merge"] == merge]
    names = protocols_in(shown)
    legend = "; ".join(f"{_label(p)} = {protocol(p).legend}" for p in names if p in PROTOCOLS)
    out = [f"# Benchmark results (merge rule: {merge})", ""]
    out += [f"- {line}" for line in header_lines]
    out += [
        "",
        f"Accuracies in %. Natural = clean accuracy on the same images. {legend}. "
        "95% CI = Wilson interval of the single draw; n = images.",
        "",
        "| Defense | Attack | Natural | "
        + " | ".join(_label(p) for p in names)
        + " | 95% CI (single) | n | Score evals/img | s/img |",
        "|---|---|---:|" + "---:|" * len(names) + "---:|---:|---:|---:|",
    ]
    for r in shown:
        cells = [r["defense_label"], r["attack_label"], _pct(r["natural"]), *(_pct(r.get(p)) for p in names)]
        cells += [_ci(r), str(r["n"]), _num(r["score_evals_per_img"], 0), _num(r["seconds_per_img"], 3)]
        out.append("| " + " | ".join(cells) + " |")
    if not shown:
        out.append(f"| (no records for merge rule {merge}) |" + " |" * (len(names) + 7))
    for block in sections:
        out += ["", block.rstrip("\n")]
    if cited:
        out += ["", *cited_markdown(cited)]
    return "\n".join(out) + "\n"


def to_console(rows: Sequence[Mapping[str, Any]]) -> str:
    """A compact fixed-width table for the terminal (all merge rules)."""
    names = protocols_in(rows)
    head = ("defense", "attack", "merge", "natural", *names, "n", "evals/img", "s/img")
    lines = [
        [
            str(r["defense_label"]),
            str(r["attack_label"]),
            str(r["merge"]),
            _pct(r["natural"]),
            *(_pct(r.get(p)) for p in names),
            str(r["n"]),
            _num(r["score_evals_per_img"], 0),
            _num(r["seconds_per_img"], 3),
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]

    def fmt(cells: Sequence[str]) -> str:
        # names left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *map(fmt, lines)])


def to_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """All fields of every row; accuracies as fractions with full precision, missing = empty.
    Written atomically (`advpure.core.fsio.atomic_write`); StorageError when it cannot be."""
    path = Path(path)
    cols = columns(rows)
    with atomic_write(path, what="results table", text=True, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow(
                {
                    k: "" if r.get(k) is None else (repr(r[k]) if isinstance(r[k], float) else r[k])
                    for k in cols
                }
            )
    return path


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows written by `to_csv`, with numbers parsed back (exactly: floats are written by repr)."""

    def parse(key: str, text: str, ints: set[str]) -> Any:
        if key in _TEXT_COLUMNS:
            return text
        if text == "":
            return None
        return int(text) if key in ints else float(text)

    with Path(path).open(newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        ints = {"n"} | {k for k in fields if k.endswith("_n") and f"{k[:-2]}_lo" in fields}
        return [{k: parse(k, v, ints) for k, v in row.items()} for row in reader]


def to_json(rows: Sequence[Mapping[str, Any]], path: str | Path, meta: Mapping[str, Any]) -> Path:
    """`{"meta": meta, "rows": rows}`; meta should hold the settings (config, n images, eps...).
    Written atomically; StorageError when it cannot be."""
    path = Path(path)
    text = json.dumps({"meta": dict(meta), "rows": [dict(r) for r in rows]}, indent=2, default=str)
    return write_text_atomic(path, text, what="results file")


def read_json(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    data = json.loads(Path(path).read_text())
    return data["rows"], data["meta"]
