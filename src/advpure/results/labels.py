"""Display names of defenses and attacks: the one place the strings of table rows, plot ticks,
legends and figure captions come from.

Every defense and attack of a plan has a `Label`: `short`, a few words, is the table's row label
and the plot's tick or legend entry; `full` is the description, stated in the settings above the
table and in the caption under each figure (results.md, W&B).

Defenses that compare the arms of the ADP paper's Fig. 2 (Yoon et al. 2021) are named as the paper
names them: the field the purifier follows ("DSM": the denoising-score-matching net; "ML-EBM": the
energy-based model trained by maximum likelihood) + the purification ("Det": ADP's deterministic
updates; "Langevin": Langevin dynamics), with the method each arm is: "DSM + Det (ADP)", "DSM +
Langevin", "ML-EBM + Det", "ML-EBM + Langevin (Hill et al.)". The arm is derived from the defense
block (`kind` adp | langevin, `field` dsm | ebm), never written by hand per experiment. A plan with
a single arm (e.g. ADP at several σ) keeps the purifier's own label ("ADP σ=0.25").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from advpure.attacks.base import display_label, short_display_label
from advpure.nets.registry import field_labels
from advpure.purify.base import known_kinds, purifier_class

UPDATE_NAMES = {"adp": "Det", "langevin": "Langevin"}  # the purification (`defense.kind`)
METHOD_OF_ARM = {("dsm", "adp"): "ADP", ("ebm", "langevin"): "Hill et al."}  # the published recipes


@dataclass(frozen=True)
class Label:
    """short: table row, plot tick / legend entry; full: the description (settings, captions)."""

    short: str
    full: str


def fig2_arm(block: Any) -> str | None:
    """The ADP paper's Fig. 2 arm of a defense block, e.g. "ML-EBM + Langevin (Hill et al.)"; None
    for a kind outside the figure (none, a plugin purifier)."""
    kind = str(block.kind)
    if kind not in UPDATE_NAMES:
        return None
    field = str(getattr(block, "field", "dsm"))
    arm = f"{known_kinds(field_labels)[field]} + {UPDATE_NAMES[kind]}"
    method = METHOD_OF_ARM.get((field, kind))
    return f"{arm} ({method})" if method else arm


def _sigma(block: Any) -> str:
    sigma = getattr(block, "sigma", None)
    return f" σ={float(sigma):g}" if sigma is not None else ""


def _full(short: str, block: Any) -> str:
    """The purifier's settings line, led by the short label when that is not already its start."""
    cls = purifier_class(block.kind)
    line = cls.settings(block)
    return line if line.startswith(short) else f"{short} = {line}"


def defense_labels(blocks: Mapping[str, Any]) -> dict[str, Label]:
    """{defense name: Label} for the typed defense blocks of one plan (`Plan.defenses`).

    When the blocks span two or more Fig. 2 arms, each such defense is named by its arm (" σ=…"
    added where two defenses share an arm); otherwise by its purifier's `describe` ("ADP σ=0.25",
    "Undefended"). Labels that still coincide get the defense name in parentheses, so every row
    and every legend entry names one defense.
    """
    arms = {name: fig2_arm(b) for name, b in blocks.items()}
    compare_arms = len({a for a in arms.values() if a is not None}) > 1
    short = {
        name: arms[name] if compare_arms and arms[name] else purifier_class(b.kind).describe(b)
        for name, b in blocks.items()
    }
    count = Counter(short.values())
    for name, b in blocks.items():
        if compare_arms and arms[name] and count[short[name]] > 1:
            short[name] += _sigma(b)
    count = Counter(short.values())
    for name in blocks:
        if count[short[name]] > 1:
            short[name] += f" ({name})"
    return {name: Label(short[name], _full(short[name], b)) for name, b in blocks.items()}


def attack_label(spec: Any, eps: float | None = None) -> Label:
    """Label of attack parameters `spec` (at budget `eps` for an ε-sweep point), e.g.
    short "standard_rand", full "standard_rand (APGD-CE, APGD-T-DLR x3; 100 it, EOT 20; ...)"."""
    return Label(short_display_label(spec, eps), display_label(spec, eps))


__all__ = [
    "METHOD_OF_ARM",
    "UPDATE_NAMES",
    "Label",
    "attack_label",
    "defense_labels",
    "fig2_arm",
]
