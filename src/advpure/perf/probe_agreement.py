"""Do ADP's two step-size probes, and bf16 purification, give the same table? Per-sample agreement.

The `jvp` probe replaces ADP's secant rule (Yoon et al. 2021, Alg. 1: α from
1 − ⟨g, f(x + δg)⟩/⟨g, g⟩) by its δ → 0 limit, α = λ⟨g, g⟩ / (−⟨g, J g⟩), which is what lets
purification run in bf16. `make benchmark EXP=fmnist_probe` attacks the same images with ADP
three times (fp32 secant, fp32 jvp, bf16 jvp; every other setting equal, the same keyed noise);
this script reads that run's per-sample records and, for the natural row and every attack, prints
each variant's accuracy with its 95% Wilson interval, whether the intervals of the variant and the
reference overlap, the per-sample agreement with the reference (fraction of images judged the
same) and the two-sided exact McNemar p-value of the discordant images (McNemar 1947).

    python -m advpure.perf.probe_agreement runs/benchmark/fmnist_probe            # reference adp_s0.25
    python -m advpure.perf.probe_agreement RUN_DIR --reference adp_s0.25 --protocol worst_of_n --merge softmax --json out.json

Raises RunDirError (one line) when the run holds no records; a variant without the reference's
rows is named and skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from scipy import stats

from advpure.core.errors import AdvpureError, RunDirError
from advpure.results import load_records, wilson


@dataclass(frozen=True)
class Agreement:
    """One variant against the reference on one (attack, protocol, merge): accuracies in %, the
    fraction of images judged the same in %, the discordant counts and the two-sided McNemar p."""

    attack: str
    variant: str
    n: int
    reference_acc: float
    reference_ci: tuple[float, float]
    variant_acc: float
    variant_ci: tuple[float, float]
    intervals_overlap: bool
    agreement: float
    only_reference_correct: int
    only_variant_correct: int
    mcnemar_p: float


def per_image(run_dir: Path, protocol: str, merge: str) -> dict[tuple[str, str], dict[int, float]]:
    """{(defense, attack): {idx: 0/1}} of one protocol's records under one merge rule."""
    out: dict[tuple[str, str], dict[int, float]] = {}
    for r in load_records(run_dir):
        if r.protocol == protocol and r.merge == merge:
            out.setdefault((r.defense, r.attack), {})[r.idx] = r.value
    if not out:
        raise RunDirError(
            f"{run_dir}: no '{protocol}' records merged by '{merge}' (run `make benchmark EXP=fmnist_probe` first)"
        )
    return out


def compare(ref: dict[int, float], var: dict[int, float], attack: str, variant: str) -> Agreement:
    """Agreement of two {idx: 0/1} maps on the images both cover. Raises ValueError if none."""
    common = sorted(set(ref) & set(var))
    if not common:
        raise ValueError(f"{variant} / {attack}: no image shared with the reference")
    n = len(common)
    a = [int(ref[i]) for i in common]
    b = [int(var[i]) for i in common]
    only_ref = sum(x == 1 and y == 0 for x, y in zip(a, b))
    only_var = sum(x == 0 and y == 1 for x, y in zip(a, b))
    d = only_ref + only_var
    p = float(stats.binomtest(only_ref, d, 0.5).pvalue) if d else 1.0
    ci_a, ci_b = wilson(sum(a), n), wilson(sum(b), n)
    pct = lambda ci: (round(100 * ci[0], 2), round(100 * ci[1], 2))  # noqa: E731
    return Agreement(
        attack=attack,
        variant=variant,
        n=n,
        reference_acc=100 * sum(a) / n,
        reference_ci=pct(ci_a),
        variant_acc=100 * sum(b) / n,
        variant_ci=pct(ci_b),
        intervals_overlap=ci_a[0] <= ci_b[1] and ci_b[0] <= ci_a[1],
        agreement=100 * (n - d) / n,
        only_reference_correct=only_ref,
        only_variant_correct=only_var,
        mcnemar_p=p,
    )


def agreements(
    run_dir: Path, reference: str, protocol: str = "single", merge: str = "softmax"
) -> list[Agreement]:
    """Every other defense of the run against `reference`, per attack both ran."""
    rows = per_image(run_dir, protocol, merge)
    out = []
    for (defense, attack), var in sorted(rows.items()):
        if defense in (reference, "none"):
            continue
        ref = rows.get((reference, attack))
        if ref is None:
            print(
                f"[probe_agreement] {defense}/{attack}: the reference has no such rows; skipped",
                file=sys.stderr,
            )
            continue
        out.append(compare(ref, var, attack, defense))
    return out


def render(rows: list[Agreement], reference: str, protocol: str, merge: str) -> str:
    head = (
        f"reference {reference}; protocol {protocol}; replicas merged by {merge}\n"
        f"{'attack':<26}{'variant':<16}{'n':>4}  {'reference % [95% CI]':<24}{'variant % [95% CI]':<24}"
        f"{'CIs overlap':<13}{'agree %':>8}{'ref only':>9}{'var only':>9}{'McNemar p':>11}"
    )
    lines = [head, "-" * len(head.splitlines()[1])]
    for r in rows:
        ci = lambda acc, c: f"{acc:6.2f} [{c[0]:.1f}, {c[1]:.1f}]"  # noqa: E731
        lines.append(
            f"{r.attack:<26}{r.variant:<16}{r.n:>4}  {ci(r.reference_acc, r.reference_ci):<24}"
            f"{ci(r.variant_acc, r.variant_ci):<24}{'yes' if r.intervals_overlap else 'NO':<13}"
            f"{r.agreement:>8.1f}{r.only_reference_correct:>9}{r.only_variant_correct:>9}{r.mcnemar_p:>11.3g}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path, help="a benchmark run directory (runs/benchmark/fmnist_probe)")
    ap.add_argument("--reference", default="adp_s0.25", help="the reference defense's row name (fp32 secant)")
    ap.add_argument("--protocol", default="single", help="a 0/1 protocol: single, worst_of_n, ever_broken")
    ap.add_argument(
        "--merge", default="softmax", help="the merge rule of the replicas (softmax, logits, vote)"
    )
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    try:
        rows = agreements(args.run_dir, args.reference, args.protocol, args.merge)
    except AdvpureError as e:
        print(f"probe_agreement: error: {e}", file=sys.stderr)
        return 2
    print(render(rows, args.reference, args.protocol, args.merge))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
