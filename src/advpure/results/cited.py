"""Published numbers printed under a benchmark's results as cited, never as measured: data keyed by name.

An experiment names the tables it is compared with (`benchmark.cited: [adp_paper, diffpure_cifar10]`),
and results.md prints exactly those, after the measured table, each under a heading that says it was
not measured here. A table is registered once, here or in a user's module:

    register_cited(CitedTable("mine", "Cited from Someone et al. 2024, not measured here", ...))

Numbers are strings copied as printed in the sources (their precision is theirs, not ours).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from advpure.core.registry import Registry


@dataclass(frozen=True)
class CitedSection:
    """One table: a title, its column headers (the first is the row label) and rows of strings."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class CitedTable:
    """A named block of cited numbers: a heading (says "not measured here"), sections, notes."""

    name: str
    heading: str
    sections: tuple[CitedSection, ...] = ()
    notes: tuple[str, ...] = ()

    def markdown(self) -> list[str]:
        out = [f"## {self.heading}", ""]
        if self.sections:
            out += [
                "These rows are copied from the sources for comparison; none of them was run by this benchmark.",
                "",
            ]
        for s in self.sections:
            out += [f"### {s.title}", "", "| " + " | ".join(s.columns) + " |"]
            out.append("|---|" + "---:|" * (len(s.columns) - 1))
            out += ["| " + " | ".join(r) + " |" for r in s.rows]
            out.append("")
        for note in self.notes:
            out += [note, ""]
        return out


def _check(obj) -> None:
    if not isinstance(obj, CitedTable):
        raise TypeError(f"a cited table must be a CitedTable, got {obj!r}")


CITED = Registry("cited table", check=_check)


def register_cited(table: CitedTable) -> CitedTable:
    CITED.add(table.name, table)
    return table


def cited_markdown(names: Sequence[str]) -> list[str]:
    """The markdown lines of the cited tables `names`, in that order (ConfigError for an unknown name)."""
    out: list[str] = []
    for name in names:
        out += CITED.get(name).markdown()
    return out


# --- the ADP paper (Yoon, Hwang & Lee, ICML 2021) and its re-evaluations --------------------------
ADP_HEADING = "Cited from the ADP paper (Yoon et al. 2021), not measured here"
ARCH = ("Method", "Natural", "Robust", "Architecture")
register_cited(
    CitedTable(
        "adp_paper",
        ADP_HEADING,
        (
            CitedSection(
                "CIFAR-10, strong adaptive attacks",  # l_inf eps = 8/255
                ARCH,
                (
                    ("ADP (σ=0.25), BPDA40+EOT", "86.14", "70.01", "WRN-28-10"),
                    ("ADP (σ=0.25), BPDA100+EOT", "86.14", "69.71", "WRN-28-10"),
                    ("ADP (σ=0.25), Joint (score)+EOT", "86.14", "70.61", "WRN-28-10"),
                    ("ADP (σ=0.25), Joint (full)+EOT", "86.14", "78.39", "WRN-28-10"),
                    ("ADP (σ=0.25), SPSA", "86.14", "80.80", "WRN-28-10"),
                    ("Hill et al. 2021", "84.12", "54.90", "WRN-28-10"),
                    ("Song et al. 2018", "95.00", "9", "ResNet-62"),
                    ("Yang et al. 2019", "88.7", "55.1", "WRN-28-10"),
                    ("Shi et al. 2021", "91.89", "53.58", "WRN-28-10"),
                    ("Madry et al. 2018", "87.3", "45.8", "ResNet-18"),
                    ("Zhang et al. 2019", "84.90", "56.43", "ResNet-18"),
                    ("Carmon et al. 2019", "89.67", "63.1", "WRN-28-10"),
                    ("Gowal et al. 2020", "89.48", "64.08", "WRN-28-10"),
                ),
            ),
            CitedSection(
                "CIFAR-10, preprocessor-blind attacks",
                ARCH,
                (
                    ("Raw WRN-28-10 (no defense)", "95.80", "0.00", "WRN-28-10"),
                    ("ADP (σ=0.1)", "93.09", "85.45", "WRN-28-10"),
                    ("ADP (σ=0.25)", "86.14", "80.24", "WRN-28-10"),
                    ("Hill et al. 2021", "84.12", "78.91", "–"),
                    ("Shi et al. 2021", "96.93", "63.10", "–"),
                    ("Du & Mordatch 2019", "48.7", "37.5", "–"),
                    ("Grathwohl et al. 2020", "75.5", "23.8", "–"),
                    ("Yang et al. 2019 (p = 0.8→1.0)", "94.9", "82.5", "ResNet-18"),
                    ("Yang et al. 2019 (p = 0.6→0.8)", "92.1", "80.3", "ResNet-18"),
                    ("Yang et al. 2019 (p = 0.4→0.6)", "89.2", "77.4", "ResNet-18"),
                    ("Song et al. 2018, Natural + PixelCNN", "82", "61", "ResNet-62"),
                    ("Song et al. 2018, AT + PixelCNN", "90", "70", "ResNet-62"),
                    ("Madry et al. 2018 (transfer)", "87.3", "70.2", "ResNet-56"),
                    ("Zhang et al. 2019 (transfer)", "84.9", "72.2", "ResNet-56"),
                ),
            ),
        ),
    )
)
ADP_REEVALUATION = (
    "ADP on CIFAR-10 under exact-gradient adaptive attacks: Croce et al. 2022 (RobustBench Standard "
    "WRN-28-10 + the public NCSNv2 checkpoint, APGD with the CW loss, 10 iterations, EOT 200, 1000 "
    "images): 33.7 ± 0.54% robust, 86.9 ± 0.44% clean; Lee & Kim 2023 (PGD-EOT, exact gradients): "
    "33.48% robust, 85.66% clean. Compare the BPDA+EOT rows above (70.01%)."
)
register_cited(
    CitedTable(
        "adp_reevaluations",
        "Cited from later re-evaluations (Lee & Kim 2023; Croce et al. 2022), not measured here",
        notes=(ADP_REEVALUATION,),
    )
)

# --- diffusion purification on CIFAR-10 (l_inf 8/255) and ImageNet (l_inf 4/255) -------------------
ROBUST = ("Defense, evaluation", "Classifier", "Images", "Robust (%)")
register_cited(
    CitedTable(
        "diffpure_cifar10",
        "Cited: DiffPure on CIFAR-10 (l_inf 8/255), claimed and re-evaluated, not measured here",
        (
            CitedSection(
                "DiffPure (Nie et al. 2022, t* = 0.1, score_sde DDPM++), robust accuracy",
                ROBUST,
                (
                    ("DiffPure, as published (adjoint gradients, one draw)", "WRN-28-10", "–", "70.64"),
                    ("DiffPure, as published (adjoint gradients, one draw)", "WRN-70-16", "–", "71.29"),
                    ("DiffAttack (Kang et al. 2023), exact gradients, one draw", "WRN-28-10", "–", "46.88"),
                    ("DiffAttack (Kang et al. 2023), exact gradients, one draw", "WRN-70-16", "–", "45.31"),
                    ("DiffBreak (Kassis et al. 2025), exact gradients, one draw", "–", "–", "48.05"),
                    ("Lee & Kim 2023, surrogate gradients, one draw", "–", "–", "48.28"),
                    ("DiffBreak, worst of 10 draws", "WRN-70-16", "256", "17.19"),
                    ("DiffBreak, majority vote of 10 draws (MV)", "WRN-70-16", "256", "39.45"),
                ),
            ),
        ),
        notes=(
            "DiffPure's clean accuracy as published: 89.02 % (WRN-28-10), 90.07 % (WRN-70-16).",
            "A dash: not restated here; see the source.",
        ),
    )
)
register_cited(
    CitedTable(
        "gdmp_cifar10",
        "Cited: GDMP on CIFAR-10 (l_inf 8/255) under exact gradients, not measured here",
        (
            CitedSection(
                "GDMP (Wang et al. 2022, MSE guidance, 4 x 36), exact-gradient re-evaluation (Kassis et al. 2025)",
                ROBUST,
                (
                    ("GDMP, one draw", "–", "–", "19.53"),
                    ("GDMP, worst of 10 draws", "–", "–", "7.03"),
                ),
            ),
        ),
        notes=("A dash: not restated here; see the source.",),
    )
)
register_cited(
    CitedTable(
        "diffpure_imagenet",
        "Cited: DiffPure on ImageNet (l_inf 4/255, ResNet-50, t* = 0.15), not measured here",
        (
            CitedSection(
                "DiffPure (Nie et al. 2022) and DiffAttack (Kang et al. 2023)",
                ("Evaluation", "Classifier", "Natural (%)", "Robust (%)"),
                (
                    ("DiffPure, as published", "ResNet-50", "67.79", "40.93"),
                    ("DiffAttack", "ResNet-50", "–", "28.13"),
                ),
            ),
        ),
    )
)

__all__ = [
    "ADP_HEADING",
    "ADP_REEVALUATION",
    "CITED",
    "CitedSection",
    "CitedTable",
    "cited_markdown",
    "register_cited",
]
