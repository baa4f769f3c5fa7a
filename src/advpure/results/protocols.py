"""Evaluation protocols: how a stochastic defense counts as robust on one sample.

A randomised defense answers differently each time it is asked, so "robust accuracy" needs a
protocol. A protocol is defined once, here or in a user's module, by one decorated function of
the observations of one attack run; the store, the tables, the CSV/JSON, the W&B keys and the
report all derive from its registration:

    @register_protocol("nine_in_ten", label="90% of N", legend="robust if 90% of the N draws are correct")
    def nine_in_ten(obs: Observations) -> torch.Tensor:
        return obs.final.float().mean(0) >= 0.9

Built in (computed from the same observations of one attack run):

* `single`      — the final adversarial input classified once (draw 0 of the N fresh draws);
* `worst_of_n`  — robust only if all N fresh classifications are correct;
* `mean_of_n`   — the fraction of the N draws that are correct (expected accuracy of one query);
* `majority_of_n` — robust if more than half of the N draws are correct: the majority vote of N fresh
  purifications (DiffBreak's MV.Rob, Kassis et al. 2025, arXiv 2411.16598);
* `ever_broken` — robust only if the defense was correct at every attack iterate and at the end
  (Hill et al. 2021: an attacker who checks along the way keeps any iterate that fooled it).

Because the single draw is draw 0 and the final check of the path, the protocols are ordered per
sample (worst_of_n <= single, ever_broken <= single, worst_of_n <= mean_of_n); every protocol
states such relations (`at_most`) and `check_consistency` verifies them on stored records, which
catches mis-wired callers and mixed-up stores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from advpure.core.registry import Registry
from advpure.purify.merge import MERGE_RULES
from advpure.results.store import NATURAL, Record


@dataclass(frozen=True)
class Observations:
    """What one attack run (or the clean evaluation) observed for a batch of B images.

    For protocols with `run="shared"` (the attack run every protocol shares): `final` holds the N
    fresh defended classifications of the final input (row 0 = the single draw) and `path` the
    correctness at the I iterates before it. `run="frozen"`: `final` (1, B) is the frozen
    defense's verdict after an attack on that same frozen defense. `run="clean"` (noise floors):
    `final` (M, B) holds M fresh classifications of the clean input, `n` = N and `path_len` = I
    of the attack the floor belongs to.
    """

    final: torch.Tensor  # (rows, B) bool
    path: torch.Tensor | None = None  # (I, B) bool
    n: int | None = None  # N of worst-of-N (clean observations)
    path_len: int | None = None  # I, the attack's iterates (clean observations)


@dataclass(frozen=True)
class Protocol:
    """One evaluation protocol. `compute(obs)` returns (B,) values in [0, 1] (bool or float), or
    None when `obs` lacks what it needs (e.g. no path for clean inputs)."""

    name: str
    compute: Callable[[Observations], torch.Tensor | None]
    label: str  # column header in tables
    legend: str  # one sentence for the table's legend
    at_most: tuple[str, ...] = ()  # per sample, value <= these protocols' values
    invariant: Callable[[Mapping[str, float]], str | None] | None = None  # extra per-sample check
    needs_path: bool = False  # the attack must record the defense's correctness at every iterate
    run: str = "shared"  # which observations: "shared" attack run, "frozen" (own run), "clean" (floors)
    floor: str | None = None  # the protocol measuring this one's noise floor at eps = 0 (added with it)

    def __call__(self, obs: Observations) -> torch.Tensor | None:
        return self.compute(obs)


def _is_protocol(obj) -> None:
    if not isinstance(obj, Protocol):
        raise TypeError(f"a protocol must be made by @register_protocol, got {obj!r}")


PROTOCOLS = Registry("protocol", check=_is_protocol)
RUNS = ("shared", "frozen", "clean")


def register_protocol(
    name: str,
    *,
    label: str,
    legend: str,
    at_most: Sequence[str] = (),
    invariant: Callable[[Mapping[str, float]], str | None] | None = None,
    needs_path: bool = False,
    run: str = "shared",
    floor: str | None = None,
) -> Callable[[Callable[[Observations], torch.Tensor | None]], Protocol]:
    """Decorator: register `fn(obs) -> (B,) values` as protocol `name`; returns the Protocol.
    `needs_path`: fn reads `obs.path` (the benchmark then tracks correctness at every iterate).
    `run`: which observations fn gets (see `Observations`). `floor`: the name of the protocol
    that measures this one at eps = 0 with as many evaluations; it runs whenever this one does."""
    if run not in RUNS:
        raise ValueError(f"protocol '{name}': unknown run '{run}'; allowed: {', '.join(RUNS)}")

    def deco(fn: Callable[[Observations], torch.Tensor | None]) -> Protocol:
        proto = Protocol(name, fn, label, legend, tuple(at_most), invariant, needs_path, run, floor)
        PROTOCOLS.add(name, proto)
        return proto

    return deco


def protocol(name: str) -> Protocol:
    """The protocol registered as `name` (or imported from `module.path:name`)."""
    return PROTOCOLS.get(name)


def metric_name(defense: str, attack: str, protocol: str) -> str:
    """The one place metric names are made: `natural/<defense>[/<protocol>]` for clean accuracy,
    `robust/<defense>/<attack>/<protocol>` for an attack (W&B keys, Lightning metrics)."""
    if attack == NATURAL:
        return f"natural/{defense}" if protocol == "single" else f"natural/{defense}/{protocol}"
    return f"robust/{defense}/{attack}/{protocol}"


# --- the built-in protocols -------------------------------------------------------------------------
@register_protocol(
    "single",
    label="Robust (single)",
    legend="the final adversarial input classified once by the stochastic defense (the paper's protocol)",
)
def single(obs: Observations) -> torch.Tensor:
    """(B,) bool: the first fresh classification of the final input, obs.final (N, B) row 0."""
    return obs.final[0]


def _mean_invariant(v: Mapping[str, float]) -> str | None:
    mean, worst, single_ = v.get("mean_of_n"), v.get("worst_of_n"), v.get("single")
    if mean is not None and worst is not None and (mean == 1.0) != (worst == 1.0):
        return "mean_of_n == 1 must coincide with worst_of_n == 1"
    if mean == 0.0 and single_ is not None and single_ > 0.0:
        return "single correct but mean_of_n == 0"
    return None


@register_protocol(
    "worst_of_n",
    label="Worst-of-N",
    legend="classified N times with fresh randomness: robust only if correct every time",
    at_most=("single", "mean_of_n"),
    floor="worst_of_n_floor",
)
def worst_of_n(obs: Observations) -> torch.Tensor:
    """(B,) bool: correct in all N fresh classifications of the final input (obs.final (N, B))."""
    return obs.final.all(dim=0)


@register_protocol(
    "worst_of_n_floor",
    label="Worst-of-N floor",
    legend="worst-of-N at eps = 0 on the same images: what the defense's own randomness costs",
    run="clean",
)
def worst_of_n_floor(obs: Observations) -> torch.Tensor:
    """(B,) bool: correct in the first N fresh classifications of the clean input (obs.final (M, B))."""
    return obs.final[: obs.n].all(dim=0)


@register_protocol(
    "mean_of_n",
    label="Mean-of-N",
    legend="the fraction of the N fresh classifications that are correct (expected accuracy of one query)",
    invariant=_mean_invariant,
)
def mean_of_n(obs: Observations) -> torch.Tensor:
    """(B,) float in [0, 1]: the fraction of the N fresh classifications that are correct."""
    return obs.final.float().mean(dim=0)


def _majority_invariant(v: Mapping[str, float]) -> str | None:
    major, mean, worst = v.get("majority_of_n"), v.get("mean_of_n"), v.get("worst_of_n")
    if major is not None and mean is not None and (major == 1.0) != (mean > 0.5):
        return "majority_of_n == 1 must coincide with mean_of_n > 1/2"
    if major == 0.0 and worst == 1.0:
        return "worst_of_n == 1 but majority_of_n == 0"
    return None


@register_protocol(
    "majority_of_n",
    label="Majority-of-N",
    legend=(
        "classified N times with fresh randomness: robust if more than half are correct (the majority vote "
        "of N purifications, DiffBreak's MV)"
    ),
    invariant=_majority_invariant,
    floor="majority_of_n_floor",
)
def majority_of_n(obs: Observations) -> torch.Tensor:
    """(B,) bool: more than N/2 of the N fresh classifications of the final input (obs.final (N, B)) are
    correct. DiffBreak's MV.Rob takes the most frequent label of N purifications; a strict majority of
    correct draws always makes the true label the most frequent, so this is exact when at most two
    labels occur and otherwise a lower bound (the conservative side; a plurality of the true label
    with N/2 or fewer correct draws counts as broken here). N = 1: the single draw."""
    return obs.final.float().mean(dim=0) > 0.5


@register_protocol(
    "majority_of_n_floor",
    label="Majority-of-N floor",
    legend="majority-of-N at eps = 0 on the same images: what the defense's own randomness costs",
    run="clean",
)
def majority_of_n_floor(obs: Observations) -> torch.Tensor:
    """(B,) bool: more than half of the first N fresh classifications of the clean input are correct."""
    return obs.final[: obs.n].float().mean(dim=0) > 0.5


@register_protocol(
    "ever_broken",
    label="Ever broken",
    legend="robust only if the defense was correct at every attack iterate (Hill et al. 2021)",
    at_most=("single",),
    needs_path=True,
    floor="ever_broken_floor",
)
def ever_broken(obs: Observations) -> torch.Tensor | None:
    """(B,) bool: correct at all I iterates (obs.path (I, B)) and at the final input; None without a path."""
    if obs.path is None:
        return None
    return obs.path.all(dim=0) & obs.final[0]


@register_protocol(
    "ever_broken_floor",
    label="Ever-broken floor",
    legend="ever broken at eps = 0: correct in as many fresh evaluations of the clean input as the attack made",
    run="clean",
)
def ever_broken_floor(obs: Observations) -> torch.Tensor:
    """(B,) bool: correct in I + 1 fresh classifications of the clean input (as many as ever_broken makes)."""
    return obs.final[: obs.path_len + 1].all(dim=0)


@register_protocol(
    "dwbox",
    label="DW-box",
    legend=(
        "deterministic white-box (Liu et al. 2025): the defense's noise is drawn once per image and "
        "shared by every gradient of the attack and the final evaluation"
    ),
    run="frozen",
)
def dwbox(obs: Observations) -> torch.Tensor:
    """(B,) bool: the frozen defense's verdict on the input attacked through that frozen defense."""
    return obs.final[0]


def with_floors(names: Sequence[str]) -> list[str]:
    """`names` plus the floors of the protocols among them, in registration order."""
    wanted = set(names) | {protocol(n).floor for n in names if protocol(n).floor}
    return [p for p in PROTOCOLS.names() if p in wanted] + [n for n in names if n not in PROTOCOLS]


# --- from observations to records -----------------------------------------------------------------
def protocol_records(
    final_correct: torch.Tensor,
    path_correct: torch.Tensor | None = None,
    protocols: Sequence[str] | None = None,
    *,
    frozen: torch.Tensor | None = None,
    clean: Observations | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample outcome of every protocol in `protocols` (default: all registered), each (B,).

    final_correct: bool (N, B), the N fresh classifications of the final adversarial input; row 0
    is the single draw. path_correct: optional bool (I, B), correctness at the iterates before the
    final one (iterate 0 = the starting point); protocols that need it are omitted without it.
    frozen: bool (1, B), the frozen defense's verdict of its own attack run (`run="frozen"`);
    clean: the clean observations of the noise floors (`run="clean"`). Protocols whose
    observations are not given are omitted. Raises ValueError for malformed inputs or an unknown
    protocol.
    """
    if final_correct.dtype != torch.bool or final_correct.dim() != 2 or final_correct.shape[0] < 1:
        raise ValueError(
            f"final_correct must be a bool tensor (N>=1, B), got {final_correct.dtype} {tuple(final_correct.shape)}"
        )
    if path_correct is not None and (
        path_correct.dtype != torch.bool
        or path_correct.dim() != 2
        or path_correct.shape[1] != final_correct.shape[1]
    ):
        raise ValueError(
            f"path_correct must be a bool tensor (I, B={final_correct.shape[1]}), "
            f"got {path_correct.dtype} {tuple(path_correct.shape)}"
        )
    by_run = {
        "shared": Observations(final_correct, path_correct),
        "frozen": Observations(frozen) if frozen is not None else None,
        "clean": clean,
    }
    out = {}
    for name in protocols if protocols is not None else PROTOCOLS.names():
        p = protocol(name)
        obs = by_run[p.run]
        value = p(obs) if obs is not None else None
        if value is not None:
            out[p.name] = value
    return out


def records_for(
    defense: str,
    attack: str,
    idx: torch.Tensor | Sequence[int],
    per_merge: Mapping[str, Mapping[str, torch.Tensor]],
) -> list[Record]:
    """Flatten `{merge: protocol_records(...)}` of one batch into `Record`s for `write_batch`."""
    idx_list = [int(i) for i in (idx.tolist() if isinstance(idx, torch.Tensor) else idx)]
    out: list[Record] = []
    for merge, values_by_protocol in per_merge.items():
        if merge not in MERGE_RULES:
            raise ValueError(f"unknown merge {merge!r}; allowed: {', '.join(MERGE_RULES)}")
        for name, values in values_by_protocol.items():
            if name not in PROTOCOLS:
                raise ValueError(f"unknown protocol {name!r}; allowed: {', '.join(PROTOCOLS.names())}")
            vals = values.detach().float().cpu().reshape(-1).tolist()
            if len(vals) != len(idx_list):
                raise ValueError(f"{merge}/{name}: {len(vals)} values for {len(idx_list)} indices")
            out.extend(Record(defense, attack, name, merge, i, v) for i, v in zip(idx_list, vals))
    return out


def check_consistency(records: Iterable[Sequence]) -> int:
    """Verify the per-sample relations the protocols declare; returns the number of samples checked.

    Raises ValueError naming the first violating (defense, attack, merge, idx) in sorted order.
    Checked: values in [0, 1]; every `at_most` relation (e.g. worst_of_n <= single); every
    protocol's `invariant` (e.g. mean_of_n == 1 exactly when worst_of_n == 1).
    """
    samples: dict[tuple, dict[str, float]] = {}
    for defense, attack, name, merge, idx, value in records:
        samples.setdefault((defense, attack, merge, int(idx)), {})[name] = float(value)
    for key in sorted(samples):
        problem = _violation(samples[key])
        if problem:
            defense, attack, merge, idx = key
            raise ValueError(
                f"inconsistent protocols for defense={defense} attack={attack} merge={merge} idx={idx}: "
                f"{problem} (values {samples[key]})"
            )
    return len(samples)


def _violation(v: dict[str, float]) -> str | None:
    for name, value in v.items():
        if not 0.0 <= value <= 1.0:
            return f"{name}={value} outside [0, 1]"
    for name, value in v.items():
        if name not in PROTOCOLS:
            continue  # a user protocol whose module is not imported here: nothing declared
        p = protocol(name)
        for other in p.at_most:
            if other in v and value > v[other]:
                return f"{name} > {other}"
        if p.invariant is not None and (problem := p.invariant(v)):
            return problem
    return None


__all__ = [
    "PROTOCOLS",
    "Observations",
    "Protocol",
    "check_consistency",
    "metric_name",
    "protocol",
    "protocol_records",
    "records_for",
    "register_protocol",
    "with_floors",
]
