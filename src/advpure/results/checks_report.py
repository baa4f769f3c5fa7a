"""All gradient-masking checks of a run at once (`advpure.results.checks`), and their outputs: the
"## Checks" section of results.md and the `checks/<name>` scalars logged to W&B."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from advpure.results.checks import (
    CHECK_TITLES,
    PASS,
    SKIP,
    WARN,
    Check,
    black_box_vs_white_box,
    loss_still_rising,
    monotone_in_eps,
    more_budget,
    unbounded_eps,
    zero_gradients,
)
from advpure.results.checks_reach import reaches_eps


def run_checks(
    *,
    records: Iterable[Sequence] | None = None,
    rows: Sequence[Mapping[str, Any]] | None = None,
    traces: Mapping[tuple[str, str], Mapping[int, Any]] | None = None,
    zero_grad: Mapping[tuple[str, str], Any] | None = None,
    unbounded: str | Sequence[str] | None = None,
    sweep: Mapping[str, float] | None = None,
    black_box: str | Sequence[str] | None = None,
    white_box: Sequence[str] | None = None,
    budget_pairs: Sequence[tuple[str, str]] | None = None,
    reach: Mapping[str, tuple[int, float, float]] | None = None,
    protocol: str = "single",
    merge: str = "softmax",
    labels: Mapping[str, str] | None = None,
) -> list[Check]:
    """All checks in `CHECK_TITLES` order; a check whose inputs are not given is a skip.

    records / rows / traces: as described in the module docstring. zero_grad: flags for
    `zero_gradients`. unbounded: the eps = 1 check unit key(s). sweep: {attack key: eps}.
    black_box / white_box: attack keys. budget_pairs: [(base key, stronger-budget key)].
    reach: {attack key: (iterations, step, eps)} of the fixed-step attacks.
    """
    records = list(records) if records is not None else None
    out = [zero_gradients(zero_grad or {})]
    out.append(
        unbounded_eps(rows, unbounded, protocol=protocol, merge=merge)
        if rows is not None and unbounded
        else Check("unbounded_eps", SKIP, "no eps = 1 check unit in this run")
    )
    out.append(
        black_box_vs_white_box(records, black_box, white_box, protocol=protocol, merge=merge)
        if records is not None and black_box and white_box
        else Check("black_box_vs_white_box", SKIP, "no black-box and white-box attacks to compare")
    )
    out.append(
        monotone_in_eps(rows, sweep, protocol=protocol, merge=merge)
        if rows is not None and sweep
        else Check("monotone_in_eps", SKIP, "no eps sweep in this run")
    )
    out.append(
        loss_still_rising(traces)
        if traces
        else Check("loss_still_rising", SKIP, "no loss traces in this run")
    )
    out.append(
        more_budget(records, budget_pairs, protocol=protocol, merge=merge, labels=labels)
        if records is not None and budget_pairs
        else Check("more_budget", SKIP, "no stronger-budget check units in this run")
    )
    out.append(reaches_eps(reach or {}, labels))
    return out


def checks_markdown(checks: Sequence[Check]) -> str:
    """A "## Checks" markdown section: a table of check / what it tests / status, then one line per
    check with its numbers."""
    counts = {s: sum(c.status == s for c in checks) for s in (PASS, WARN, SKIP)}
    out = [
        "## Checks",
        "",
        'Gradient-masking checks (Carlini et al. 2019, "On Evaluating Adversarial Robustness"; '
        f"AutoAttack's checks): {counts[PASS]} pass, {counts[WARN]} warn, {counts[SKIP]} skipped. "
        "A warning means the robust accuracies above may be inflated.",
        "",
        "| Check | What it tests | Status |",
        "|---|---|---|",
    ]
    out += [f"| {c.name} | {CHECK_TITLES.get(c.name, '')} | {c.status.upper()} |" for c in checks]
    out.append("")
    out += [f"- **{c.name}** ({c.status}): {c.message}" for c in checks]
    return "\n".join(out) + "\n"


def checks_metrics(checks: Sequence[Check]) -> dict[str, float]:
    """W&B scalars: `checks/<name>` = 1.0 (pass) or 0.0 (warn); skipped checks are left out;
    `checks/warnings` = the number of warnings."""
    out = {f"checks/{c.name}": 1.0 if c.status == PASS else 0.0 for c in checks if c.status != SKIP}
    out["checks/warnings"] = float(sum(c.status == WARN for c in checks))
    return out


__all__ = ["checks_markdown", "checks_metrics", "run_checks"]
