"""How a stochastic defense counts as robust on one sample, and checks that the counts agree.

A randomised defense answers differently each time it is asked, so "robust accuracy" needs a
protocol. All four are computed from the same observations of one attack run:

* `single`      — the final adversarial input classified once (draw 0 of the N fresh draws);
* `worst_of_n`  — robust only if all N fresh classifications are correct;
* `mean_of_n`   — the fraction of the N draws that are correct (expected accuracy of one query);
* `ever_broken` — robust only if the defense was correct at every attack iterate and at the end
  (Hill et al. 2021: an attacker who checks along the way keeps any iterate that fooled it).

Because the single draw is draw 0 and the final check of the path, the protocols are ordered per
sample (worst_of_n <= single, ever_broken <= single, worst_of_n <= mean_of_n); `check_consistency`
verifies this on stored records, which catches mis-wired callers and mixed-up stores.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from advpure.results.store import MERGES, PROTOCOLS, Record


def protocol_records(
    final_correct: torch.Tensor, path_correct: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Per-sample outcome of every protocol, each a (B,) tensor.

    final_correct: bool (N, B), the N fresh classifications of the final adversarial input; row 0
    is the single draw. path_correct: optional bool (I, B), correctness at the iterates before the
    final one (iterate 0 = the starting point); without it `ever_broken` is omitted.
    Returns bool tensors, except `mean_of_n` (float in [0, 1]).
    """
    if final_correct.dtype != torch.bool or final_correct.dim() != 2 or final_correct.shape[0] < 1:
        raise ValueError(
            f"final_correct must be a bool tensor (N>=1, B), got {final_correct.dtype} {tuple(final_correct.shape)}"
        )
    out = {
        "single": final_correct[0],
        "worst_of_n": final_correct.all(dim=0),
        "mean_of_n": final_correct.float().mean(dim=0),
    }
    if path_correct is not None:
        if (
            path_correct.dtype != torch.bool
            or path_correct.dim() != 2
            or path_correct.shape[1] != final_correct.shape[1]
        ):
            raise ValueError(
                f"path_correct must be a bool tensor (I, B={final_correct.shape[1]}), "
                f"got {path_correct.dtype} {tuple(path_correct.shape)}"
            )
        out["ever_broken"] = path_correct.all(dim=0) & final_correct[0]
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
    for merge, protocols in per_merge.items():
        if merge not in MERGES:
            raise ValueError(f"unknown merge {merge!r}; allowed: {', '.join(MERGES)}")
        for protocol, values in protocols.items():
            if protocol not in PROTOCOLS:
                raise ValueError(f"unknown protocol {protocol!r}; allowed: {', '.join(PROTOCOLS)}")
            vals = values.detach().float().cpu().reshape(-1).tolist()
            if len(vals) != len(idx_list):
                raise ValueError(f"{merge}/{protocol}: {len(vals)} values for {len(idx_list)} indices")
            out.extend(Record(defense, attack, protocol, merge, i, v) for i, v in zip(idx_list, vals))
    return out


def check_consistency(records: Iterable[Sequence]) -> int:
    """Verify the per-sample order of the protocols; returns the number of samples checked.

    Raises ValueError naming the first violating (defense, attack, merge, idx) in sorted order.
    Checked: values in [0, 1]; worst_of_n <= single; ever_broken <= single;
    worst_of_n <= mean_of_n; and, since all draws are the same N draws, mean_of_n == 1 exactly
    when worst_of_n == 1, and mean_of_n == 0 implies single == 0.
    """
    samples: dict[tuple, dict[str, float]] = {}
    for defense, attack, protocol, merge, idx, value in records:
        samples.setdefault((defense, attack, merge, int(idx)), {})[protocol] = float(value)
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
    for protocol, value in v.items():
        if not 0.0 <= value <= 1.0:
            return f"{protocol}={value} outside [0, 1]"
    single, worst, mean, ever = (v.get(p) for p in ("single", "worst_of_n", "mean_of_n", "ever_broken"))
    if worst is not None and single is not None and worst > single:
        return "worst_of_n > single"
    if ever is not None and single is not None and ever > single:
        return "ever_broken > single"
    if worst is not None and mean is not None:
        if worst > mean:
            return "worst_of_n > mean_of_n"
        if (mean == 1.0) != (worst == 1.0):
            return "mean_of_n == 1 must coincide with worst_of_n == 1"
    if mean == 0.0 and single is not None and single > 0.0:
        return "single correct but mean_of_n == 0"
    return None
