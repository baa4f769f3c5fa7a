"""Worst case over an attack ensemble, per image, from the per-sample records.

The number a robustness paper reports for a defense is the accuracy that holds against every
attack tried: an image counts as robust only if no attack broke it. AutoAttack keeps this as a
per-sample `robust_flags` vector that each attack of the ensemble can only clear (Croce & Hein
2020, "Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free
attacks"); Croce et al. 2022 ("Evaluating the adversarial robustness of adaptive test-time
defenses") report test-time defenses the same way. Averaging or taking the minimum of per-attack
percentages is wrong: two attacks that each break a different half of the images give 50 % each
and 0 % together.

`worst_case_records` turns the records of the included attacks into synthetic records of two
attack names that `tables.summarize` turns into ordinary rows (accuracy, Wilson CI, n, and the
clean accuracy of the same images):

* `worst_case`     — over the images that EVERY included attack covered (the paired number);
* `worst_case_all` — over every image any included attack covered, each image robust iff it is
  robust under every included attack that ran on it (more images, but an image that only the
  weaker attacks saw counts with their verdict only; the returned note says which attacks ran on
  fewer images, e.g. SPSA's `max_images`).

Per protocol p and merge rule, the worst-case value of an image is the minimum over attacks of
that attack's p-value on it: for 0/1 protocols (single, worst_of_n, ever_broken and DW-box) this
is "robust under every attack"; for mean_of_n (a fraction of N draws) it is the per-image worst
expected accuracy, i.e. an attacker who picks, per image, the attack that did best. The minimum
keeps every per-sample relation of the protocols (worst_of_n <= single, ...) when all attacks
recorded the same protocols, so `check_consistency` holds on the synthetic records too; an attack
that lacks a protocol enters through the protocols it is declared at most (see the function).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from advpure.purify.merge import MERGE_RULES
from advpure.results.protocols import PROTOCOLS, protocol
from advpure.results.store import NATURAL, Record

WORST_CASE = "worst_case"  # attack name of the rows over the images every attack covered
WORST_CASE_ALL = "worst_case_all"  # attack name of the rows over all images
WORST_CASE_LABELS = {
    WORST_CASE: "Worst case (all attacks; images every attack covered)",
    WORST_CASE_ALL: "Worst case (all attacks; all images)",
}


@dataclass(frozen=True)
class WorstCase:
    """What `worst_case_records` returns.

    records: synthetic `Record(defense, WORST_CASE | WORST_CASE_ALL, protocol, merge, idx, value)`
      to pass to `summarize` together with the run's records (values in [0, 1]).
    labels: {attack name: display label} for `summarize(labels=...)`.
    note: one paragraph for the report: per defense, the attacks combined, how many images each
      covered, which ran on fewer images than the others and which lacked a protocol.
    attacks: {defense: included attacks that had records for it, in the order given}.
    """

    records: list[Record]
    labels: dict[str, str]
    note: str
    attacks: dict[str, tuple[str, ...]] = field(default_factory=dict)


def worst_case_records(
    records: Iterable[Sequence],
    attacks: Sequence[str],
    *,
    labels: dict[str, str] | None = None,
    names: tuple[str, str] = (WORST_CASE, WORST_CASE_ALL),
) -> WorstCase:
    """Per-image worst case over `attacks`, for every defense, protocol and merge rule.

    records: `Record`s or 6-tuples (defense, attack, protocol, merge, idx, value), values in [0, 1]
      (e.g. `load_records(run_dir)`); records of attacks not in `attacks` (clean accuracy, eps-sweep
      units, check units) are ignored.
    attacks: the attack keys the worst case is over (e.g. the suite's main units). A key that has
      no records for some defense (e.g. an attack the undefended model does not run) is left out for
      that defense and the note says so; a defense none of whose included attacks ran gets no rows.
    labels: optional display names of attacks, used in the note only.
    names: the two synthetic attack names (covered-by-all, all-images).

    For a defense and merge rule m, an attack "ran on" an image when it has any record of it under
    m. `names[0]` gets a record for each image every combined attack ran on, `names[1]` for each
    image at least one ran on; per protocol p the value is the minimum, over the attacks that ran
    on the image, of their p-value. An attack that ran on the image but recorded no p for it (say,
    a protocol it did not run) enters with the protocols p is declared at most (`Protocol.at_most`:
    ever_broken <= single, so its single value bounds its ever_broken), else it is left out for p
    there; the note counts both cases.

    Raises ValueError when `attacks` is empty, names `natural` or a synthetic name, repeats a key,
    or when the records already contain an attack called like a synthetic name.
    """
    attacks = list(attacks)
    covered_name, all_name = names
    if not attacks:
        raise ValueError("worst case over attacks needs at least one attack key")
    if len(set(attacks)) != len(attacks):
        raise ValueError(f"worst case: attack keys repeated in {attacks}")
    for a in attacks:
        if a in (NATURAL, covered_name, all_name):
            raise ValueError(f"worst case: '{a}' is not an attack that can be combined")
    labels = labels or {}
    included = set(attacks)

    # obs[(defense, merge)][attack][idx] = {protocol: value}
    obs: dict[tuple[str, str], dict[str, dict[int, dict[str, float]]]] = {}
    for defense, attack, name, merge, idx, value in records:
        if attack in (covered_name, all_name):
            raise ValueError(f"records already contain an attack named '{attack}'; pick other names")
        if attack not in included:
            continue
        idx, value = int(idx), float(value)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"record value must be in [0, 1], got {value} for {defense}/{attack} idx {idx}")
        obs.setdefault((defense, merge), {}).setdefault(attack, {}).setdefault(idx, {})[name] = value

    out: list[Record] = []
    # (defense, merge, protocol, attack) -> images where the attack lacked the protocol, and how
    gaps: dict[tuple[str, str, str, str], list] = {}
    for (defense, merge), by_attack in sorted(obs.items(), key=_key_order):
        present = [a for a in attacks if a in by_attack]
        common = set.intersection(*(set(by_attack[a]) for a in present))
        union = sorted(set.union(*(set(by_attack[a]) for a in present)))
        names_here = {p for a in present for o in by_attack[a].values() for p in o}
        for name in _protocol_order(names_here):
            bounds = protocol(name).at_most if name in PROTOCOLS else ()
            for idx in union:
                candidates = []
                for a in present:
                    o = by_attack[a].get(idx)
                    if o is None:
                        continue  # this attack did not run on this image
                    if name in o:
                        candidates.append(o[name])
                        continue
                    # not recorded: a protocol it is declared at most (e.g. single for ever_broken)
                    # bounds it per sample, which keeps the worst case an upper bound
                    upper = [o[q] for q in bounds if q in o]
                    gap = gaps.setdefault((defense, merge, name, a), [0, set()])
                    gap[0] += 1
                    if upper:
                        candidates.append(min(upper))
                        gap[1].update(q for q in bounds if q in o)
                if not candidates:
                    continue
                v = min(candidates)
                if idx in common:
                    out.append(Record(defense, covered_name, name, merge, idx, v))
                out.append(Record(defense, all_name, name, merge, idx, v))

    ran: dict[str, dict[str, set[int]]] = {}  # defense -> attack -> images (any protocol, any merge)
    for (defense, _), by_attack in obs.items():
        for a, per_image in by_attack.items():
            ran.setdefault(defense, {}).setdefault(a, set()).update(per_image)
    order = {a: i for i, a in enumerate(attacks)}
    per_defense = {d: tuple(sorted(ran[d], key=order.__getitem__)) for d in ran}
    note = _note(ran, gaps, per_defense, attacks, labels)
    return WorstCase(
        out,
        {covered_name: WORST_CASE_LABELS[WORST_CASE], all_name: WORST_CASE_LABELS[WORST_CASE_ALL]},
        note,
        per_defense,
    )


def _protocol_order(names: set[str]) -> list[str]:
    known = [p for p in PROTOCOLS.names() if p in names]
    return known + sorted(names - set(known))


def _key_order(item) -> tuple:
    (defense, merge), _ = item
    return (defense, MERGE_RULES.index(merge) if merge in MERGE_RULES else len(MERGE_RULES), merge)


def _note(
    ran: dict[str, dict[str, set[int]]],
    gaps: dict[tuple[str, str, str, str], list],
    per_defense: dict[str, tuple[str, ...]],
    attacks: list[str],
    labels: dict[str, str],
) -> str:
    if not ran:
        return "Worst case over attacks: none of the included attacks has records."
    parts = []
    for defense in sorted(ran):
        present = per_defense[defense]
        sizes = {a: len(ran[defense][a]) for a in present}
        common = set.intersection(*(ran[defense][a] for a in present))
        union = set.union(*(ran[defense][a] for a in present))
        most = max(sizes.values())
        text = f"{defense}: {len(present)} attack(s), " + ", ".join(
            f"{labels.get(a, a)} on {sizes[a]} images" for a in present
        )
        fewer = [labels.get(a, a) for a in present if sizes[a] < most]
        text += f"; {len(common)} images every attack covered, {len(union)} in all"
        if fewer:
            text += f" ({', '.join(fewer)} ran on fewer images)"
        missing = [labels.get(a, a) for a in attacks if a not in present]
        if missing:
            text += f"; not run on this defense: {', '.join(missing)}"
        # one phrase per (protocol, how it entered), naming the attacks and, unless every merge rule
        # is concerned alike, the merge rules
        grouped: dict[tuple[str, tuple[str, ...]], dict[tuple[str, int], list[str]]] = {}
        for (d, merge, name, a), (count, used) in sorted(gaps.items()):
            if d == defense:
                grouped.setdefault((name, tuple(sorted(used))), {}).setdefault((a, count), []).append(merge)
        merges = {m for (d, m, _, _) in gaps if d == defense}
        lacking = []
        for (name, used), by_attack in grouped.items():
            who = ", ".join(
                f"{labels.get(a, a)} ({count} images"
                + ("" if set(ms) == merges else f", merge {'/'.join(ms)}")
                + ")"
                for (a, count), ms in by_attack.items()
            )
            how = f"bounded by their {', '.join(used)}" if used else f"left out of the {name} worst case"
            lacking.append(f"no {name} records for {who}: {how}")
        if lacking:
            text += "; " + "; ".join(lacking)
        parts.append(text)
    return (
        "Worst case over attacks (per image: robust only if robust under every attack that ran on it): "
        + ". ".join(parts)
        + "."
    )


__all__ = ["WORST_CASE", "WORST_CASE_ALL", "WORST_CASE_LABELS", "WorstCase", "worst_case_records"]
