"""Published numbers of diffusion purification, keyed by the experiment that measures the same setting:
`results.md` of that experiment prints them under the measured table, as cited (never measured here).

All numbers are accuracies in %, copied as printed (strings: their precision is theirs). Settings:
CIFAR-10 l_inf eps = 8/255 and ImageNet l_inf eps = 4/255 (224 x 224, ResNet-50); "–" where the
setting does not state it. Sources:

  * DiffPure: Nie et al., "Diffusion Models for Adversarial Purification", ICML 2022 (AutoAttack's
    rand version, APGD-CE / DLR with EOT 20, gradients through the SDE by the adjoint method).
  * DiffAttack: Kang, Song & Li, "DiffAttack: Evasion Attacks Against Diffusion-Based Adversarial
    Purification", NeurIPS 2023 (exact gradients, one draw).
  * DiffBreak (NeurIPS 2025): exact gradients; one draw, worst of 10 and majority of 10 draws.
  * Lee & Kim, "Robust Evaluation of Diffusion-Based Adversarial Purification", ICCV 2023
    (PGD-EOT with surrogate gradients of a shorter solve).
  * GDMP: Wang et al., "Guided Diffusion Model for Adversarial Purification", arXiv 2205.14969, 2022.

To add rows: one `Cited` per published number under the experiment's name in `CITED`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Cited:
    """One published number: what was evaluated, how, and what it scored (strings, as printed)."""

    method: str
    classifier: str
    attack: str
    protocol: str  # single (one purification) | worst of 10 | majority of 10
    natural: str  # clean accuracy, "–" when the source gives none with this row
    robust: str
    source: str


_AA = "AutoAttack rand (APGD-CE/DLR, EOT 20), adjoint gradients"
_EXACT = "exact gradients"
_NIE, _KANG, _DB, _LK = (
    "Nie et al. 2022",
    "DiffAttack (Kang et al. 2023)",
    "DiffBreak (2025)",
    "Lee & Kim 2023",
)

# experiment -> (setting, rows)
CITED: dict[str, tuple[str, tuple[Cited, ...]]] = {
    "cifar10_diffpure": (
        "CIFAR-10, l_inf 8/255, DiffPure t* = 0.1 (score_sde DDPM++ VP)",
        (
            Cited("DiffPure", "WRN-28-10", _AA, "single", "89.02", "70.64", _NIE),
            Cited("DiffPure", "WRN-70-16", _AA, "single", "90.07", "71.29", _NIE),
            Cited("DiffPure", "WRN-28-10", _EXACT, "single", "–", "46.88", _KANG),
            Cited("DiffPure", "WRN-70-16", _EXACT, "single", "–", "45.31", _KANG),
            Cited("DiffPure", "–", _EXACT, "single", "–", "48.05", _DB),
            Cited("DiffPure", "–", "PGD-EOT, surrogate gradients", "single", "–", "48.28", _LK),
            Cited("DiffPure", "WRN-70-16", f"{_EXACT}, 256 images", "worst of 10", "–", "17.19", _DB),
            Cited("DiffPure", "WRN-70-16", f"{_EXACT}, 256 images", "majority of 10", "–", "39.45", _DB),
        ),
    ),
    "cifar10_gdmp": (
        "CIFAR-10, l_inf 8/255, GDMP (4 rounds of 36 steps, MSE guidance)",
        (
            Cited("GDMP", "–", _EXACT, "single", "–", "19.53", _DB),
            Cited("GDMP", "–", _EXACT, "worst of 10", "–", "7.03", _DB),
        ),
    ),
    "imagenet_diffpure": (
        "ImageNet, l_inf 4/255, DiffPure t* = 0.15 (guided-diffusion 256x256 uncond), ResNet-50",
        (
            Cited("DiffPure", "ResNet-50", _AA, "single", "67.79", "40.93", _NIE),
            Cited("DiffPure", "ResNet-50", _EXACT, "single", "–", "28.13", _KANG),
        ),
    ),
}


def cited_rows(experiment: str | None) -> tuple[Cited, ...]:
    """The cited rows of `experiment` (none for an experiment without published numbers)."""
    return CITED.get(experiment or "", ("", ()))[1]


def cited_markdown(experiment: str | None) -> str:
    """A markdown section with `experiment`'s published numbers, or "" when it has none."""
    if not cited_rows(experiment):
        return ""
    setting, rows = CITED[experiment]  # type: ignore[index]
    out = [
        f"## Published numbers for this setting, cited (not measured here): {setting}",
        "",
        "Accuracies in % as printed by each source; compare with the measured rows above.",
        "",
        "| Method | Classifier | Attack | Protocol | Natural | Robust | Source |",
        "|---|---|---|---|---:|---:|---|",
    ]
    out += [
        f"| {r.method} | {r.classifier} | {r.attack} | {r.protocol} | {r.natural} | {r.robust} | {r.source} |"
        for r in rows
    ]
    return "\n".join(out) + "\n"


__all__ = ["CITED", "Cited", "cited_markdown", "cited_rows"]
