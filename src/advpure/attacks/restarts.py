"""Attacks made of several runs on the images still robust: restarts and ensembles.

`run_on_unbroken` runs a sequence of attacks ("runs") on one batch. Run r attacks only the images
that no earlier run broke, then one defended evaluation judges its adversarial inputs (S replicas
merged by the defense's `merge` rule, on the run's own stream `<judge>`, never the benchmark's
evaluation stream); the images it broke are not attacked again. This is AutoAttack's scheme
(Croce & Hein 2020: each attack, and each restart, runs on the points not yet broken), and what
two users of it need:

* `with_restarts` — k runs of one attack from independent random starts (restart r on its own
  child stream `restart<r>` of the attack's rng; restart 0 on the rng itself, so it equals the
  single run with `random_start=True`). Per sample the result is the first restart that broke
  it, or, when none did, the restart with the highest attack objective at its x_adv
  (`AttackResult.adv_loss`). `losses` are the kept restart's (iters + 1, B).
* the `standard_rand` ensemble (`advpure.attacks.ensemble`): stages APGD-CE, APGD-T-DLR, ...
  whose objectives cannot be compared; an image no stage broke keeps the stage whose adversarial
  input the judging evaluation found closest to broken (lowest margin of the merged scores).

Shared bookkeeping, for both:

* `path_correct` ("ever broken", Hill et al.) concatenates every run's path, run-major:
  (sum of the runs' iterations, B). An image not attacked in a run (already broken) counts as
  correct there: the run adds no evidence. An image is thus ever broken if ANY run broke it at
  ANY iterate, the conservative reading for the defense.
* `progress(i)` is called once per iteration of every run, i = 0 .. total - 1 in order, also for
  the iterations a run skipped because every image was already broken (so a progress bar of
  `Attack.total_iters` completes).
* `observer(j, x)` sees the iterates of every run as they happen (not only the kept ones), j
  counting all observer calls from 0; x holds only the rows that run attacked (fewer than B in
  later runs).
* Randomness: runs are keyed per image (SampleRNG streams restricted to the attacked rows), so a
  result does not depend on which other images share the batch.

Cost: each judged run adds one defended prediction (S purification chains) per attacked image;
the defense's counters (score evals) include it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from advpure.attacks.base import AttackResult, Trace
from advpure.core.rng import RNG
from advpure.purify.merge import MERGE_RULES, merge_predict, merge_scores

StillRobust = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
"""rule(verdicts (N, R) bool, path (I, R) bool or None) -> (R,) bool: which of the R judged images
to attack again; verdicts are N fresh defended predictions of the run's x_adv (row 0 the judging
draw), path the correctness at every iterate of the runs so far (None when not tracked)."""

RunFn = Callable[[torch.Tensor, torch.Tensor, RNG, Trace, torch.Tensor], AttackResult]
"""fn(x_rows, y_rows, rng_rows, trace_rows, rows) -> the AttackResult on those rows; `rows` (R,)
int64 are the batch positions attacked (for per-sample inputs such as target classes)."""

KEEP = ("loss", "margin")


@dataclass
class Run:
    """One run of `run_on_unbroken`."""

    judge: str  # name of the run's judging stream: rng.child(judge)
    fn: RunFn
    iters: int  # the iterations it runs (all its own restarts): progress calls and path rows
    stream: str | None = None  # the run's stream rng.child(stream); None: the attack's rng itself
    curve: int | None = None  # its `losses` have curve + 1 rows (None: iters; less with restarts)


@dataclass
class Outcome:
    """What `run_on_unbroken` found, per sample and per run."""

    x_adv: torch.Tensor  # (B, C, H, W) the kept run's adversarial input
    chosen: torch.Tensor  # (B,) int64: index of the kept run
    broken: torch.Tensor  # (B,) bool: judged broken by some run (False where never judged)
    results: list[AttackResult | None]  # per run, over its rows (None: skipped, nothing left)
    rows: list[torch.Tensor]  # per run, the batch positions it attacked, ascending
    path: dict[str, torch.Tensor] | None  # {rule: (sum of runs' iters, B) bool}, see the module doc

    def positions(self, r: int) -> torch.Tensor:
        """(B,) position of each batch row within run r's rows (-1 where run r did not attack it)."""
        pos = torch.full_like(self.chosen, -1)
        pos[self.rows[r]] = torch.arange(self.rows[r].numel(), device=pos.device)
        return pos


class _Hooks:
    """Re-numbers the hooks of the caller's `Trace` over several runs (see the module doc)."""

    def __init__(self, trace: Trace):
        self.trace, self.done, self.seen = trace, 0, 0

    def _progress(self, i: int) -> None:
        self.trace.progress(self.done)
        self.done += 1

    def _observe(self, i: int, x: torch.Tensor) -> None:
        self.trace.observer(self.seen, x)
        self.seen += 1

    def skip(self, iters: int) -> None:
        if self.trace.progress is not None:
            for _ in range(iters):
                self._progress(0)

    def trace_for(self, defense, y: torch.Tensor, rng: RNG) -> Trace:
        t = self.trace
        return Trace(
            defense,
            y,
            rng,
            track_path=t.track_path,
            progress=self._progress if t.progress is not None else None,
            observer=self._observe if t.observer is not None else None,
        )


def judge(defense, x: torch.Tensor, y: torch.Tensor, rng: RNG) -> tuple[torch.Tensor, torch.Tensor]:
    """One defended prediction at x (B, C, H, W): S chains from `rng` merged by `defense.merge`
    (the same draws and verdict as `defense.evaluate(x, y, rng, n=1)[defense.merge]`). Returns
    correct (B,) bool and margin (B,) float: the merged score of y minus the best other class's
    (probabilities, mean logits or vote shares; < 0 when misclassified, lower = closer to broken)."""
    with torch.no_grad():
        chains, _ = defense.chain_logits(x.detach(), rng, defense.replicas)
    correct = merge_predict(chains, defense.merge) == y
    scores = merge_scores(chains, defense.merge)
    own = scores.gather(-1, y[:, None]).squeeze(-1)
    other = scores.scatter(-1, y[:, None], float("-inf")).max(-1).values
    return correct, own - other


def run_on_unbroken(
    defense,
    x: torch.Tensor,
    y: torch.Tensor,
    rng: RNG,
    trace: Trace,
    runs: Sequence[Run],
    *,
    keep: str,
    draws: int = 1,
    still_robust: StillRobust | None = None,
) -> Outcome:
    """Run `runs` in order on x (B, C, H, W) in [0, 1], labels y (B,), each on the images no earlier
    run broke, judged by `judge` on stream rng.child(run.judge). Per sample the kept run is the
    first that broke it; for an image no run broke, `keep="loss"` keeps the run with the highest
    `adv_loss` (for runs of one objective: restarts), `keep="margin"` the run whose judged margin
    was lowest (objectives that cannot be compared: the ensemble's stages); ties keep the earlier
    run. `trace` carries the caller's hooks (track_path, progress, observer); each run gets its own
    Trace.

    "Broke" is decided by `still_robust` when given: each run's x_adv is judged by `draws` fresh
    defended predictions (draw 0 the judging draw above, draws 1 .. N-1 on rng.child(run.judge)
    .child("draws")), and the images `still_robust(verdicts, path)` keeps are attacked by the next
    run; the kept run of an image is then the one whose fraction of correct draws was lowest (ties:
    the loss / margin rule above), which with draws = 1 is the rule above. Default: draw 0 alone.
    Raises ValueError for an unknown `keep`, no runs or draws < 1."""
    if keep not in KEEP:
        raise ValueError(f"unknown keep rule '{keep}'; allowed: {', '.join(KEEP)}")
    if not runs:
        raise ValueError("run_on_unbroken needs at least one run")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    b, dev = x.shape[0], x.device
    todo = torch.arange(b, device=dev)
    chosen = torch.zeros(b, dtype=torch.long, device=dev)
    best: torch.Tensor | None = None  # (B,) the kept run's adv_loss or -margin so far
    best_frac = torch.full((b,), math.inf, device=dev)  # the kept run's fraction of correct draws
    broken = torch.zeros(b, dtype=torch.bool, device=dev)
    x_adv = x.clone()
    hooks = _Hooks(trace)
    results: list[AttackResult | None] = []
    rows_of: list[torch.Tensor] = []
    paths: list[dict[str, torch.Tensor]] = []  # per run, over the whole batch
    for r, run in enumerate(runs):
        rows = todo
        rows_of.append(rows)
        if rows.numel() == 0:
            hooks.skip(run.iters)
            results.append(None)
            paths.append(_scatter_path(None, rows, b, run.iters))
            continue
        whole = rows.numel() == b
        base = rng if run.stream is None else rng.child(run.stream)
        sub_rng = base if whole else base.subset(rows.cpu())
        x_r, y_r = (x, y) if whole else (x[rows], y[rows])
        res = run.fn(x_r, y_r, sub_rng, hooks.trace_for(defense, y_r, sub_rng), rows)
        results.append(res)
        paths.append(_scatter_path(res.path_correct, rows, b, run.iters))
        judge_rng = rng.child(run.judge)
        correct, margin = judge(defense, res.x_adv, y_r, judge_rng if whole else judge_rng.subset(rows.cpu()))
        verdicts = correct[None]
        if draws > 1:
            more = judge_rng.child("draws")
            more = more if whole else more.subset(rows.cpu())
            verdicts = torch.cat(
                [verdicts, defense.evaluate(res.x_adv, y_r, more, n=draws - 1)[defense.merge]]
            )
        frac = verdicts.float().mean(0)
        value = res.adv_loss() if keep == "loss" else -margin  # higher = more adversarial
        if best is None:
            best = value.new_full((b,), -math.inf)
        take = (frac < best_frac[rows]) | ((frac == best_frac[rows]) & (value > best[rows]))
        best[rows] = torch.where(take, value, best[rows])
        best_frac[rows] = torch.where(take, frac, best_frac[rows])
        chosen[rows[take]], x_adv[rows[take]] = r, res.x_adv[take]
        broken[rows[~correct]] = True
        if still_robust is None:
            again = correct
        else:
            path_rows = None
            if trace.track_path:
                path_rows = torch.cat([p[defense.merge] for p in paths])[:, rows]
            again = still_robust(verdicts, path_rows).to(torch.bool)
        todo = rows[again]
    path = {rule: torch.cat([p[rule] for p in paths]) for rule in MERGE_RULES} if trace.track_path else None
    return Outcome(x_adv.detach(), chosen, broken, results, rows_of, path)


def _scatter_path(
    path: dict[str, torch.Tensor] | None, rows: torch.Tensor, b: int, iters: int
) -> dict[str, torch.Tensor]:
    """{rule: (iters, R)} over run rows -> {rule: (iters, B)}, True (no evidence) elsewhere."""
    out = {}
    for rule in MERGE_RULES:
        full = torch.ones(iters, b, dtype=torch.bool, device=rows.device)
        if path is not None:
            full[:, rows] = path[rule].to(rows.device)
        out[rule] = full
    return out


def kept_losses(out: Outcome) -> torch.Tensor:
    """(iters + 1, B): per sample the `losses` curve of its kept run (runs of equal length)."""
    first = next(r for r in out.results if r is not None)
    losses = torch.full(
        (first.losses.shape[0], out.chosen.shape[0]),
        math.nan,
        dtype=first.losses.dtype,
        device=first.losses.device,
    )
    for r, res in enumerate(out.results):
        if res is None:
            continue
        sel = out.chosen == r
        losses[:, sel] = res.losses[:, out.positions(r)[sel]]
    return losses


def kept_adv_loss(out: Outcome) -> torch.Tensor:
    """(B,): per sample the kept run's objective at its x_adv."""
    first = next(r for r in out.results if r is not None)
    value = first.adv_loss().new_full((out.chosen.shape[0],), math.nan)
    for r, res in enumerate(out.results):
        if res is None:
            continue
        sel = out.chosen == r
        value[sel] = res.adv_loss()[out.positions(r)[sel]]
    return value


def concatenated_losses(out: Outcome, runs: Sequence[Run]) -> torch.Tensor:
    """(1 + sum of the runs' curves, B): run 0's curve x_0 .. x_iters, then each later run's
    iterates x_1 .. x_iters (its x_0 restarts at the clean input or a random start and is dropped,
    so rows count iterations). An image a run did not attack (or a skipped run: `runs` gives its
    length) carries its last value forward."""
    chunks: list[torch.Tensor] = []
    last = None
    for r, res in enumerate(out.results):
        if res is None:
            steps = runs[r].curve if runs[r].curve is not None else runs[r].iters
            chunks.append(last.expand(steps, -1).clone())
            continue
        pos = out.positions(r)
        sel = pos >= 0
        curve = res.losses if not chunks else res.losses[1:]
        block = (
            torch.full(
                (curve.shape[0], out.chosen.shape[0]), math.nan, dtype=curve.dtype, device=curve.device
            )
            if last is None
            else last.expand(curve.shape[0], -1).clone()
        )
        block[:, sel] = curve[:, pos[sel]]
        chunks.append(block)
        last = block[-1:]
    return torch.cat(chunks)


def with_restarts(
    attack_fn: Callable[..., AttackResult],
    defense,
    x: torch.Tensor,
    y: torch.Tensor,
    rng: RNG,
    trace: Trace,
    *,
    restarts: int,
    iters: int,
    random_start: bool,
) -> AttackResult:
    """`restarts` runs of one attack, `attack_fn(x, y, rng, trace, rows, random_start=...)`
    (a `RunFn` with the random-start flag), kept per sample as in the module doc.

    restarts = 1 is the plain attack: attack_fn(x, y, rng, trace, all rows, random_start) itself,
    bit for bit. restarts = k > 1: every restart starts at random (whatever `random_start` says);
    restart r runs on rng.child(f"restart{r}") (r = 0: rng) and is judged on
    rng.child(f"restart{r}_judge"). Returns an AttackResult with x_adv (B, C, H, W), losses
    (iters + 1, B) of the kept restart, loss_adv (B,) and path_correct {rule: (k * iters, B)}
    (restart-major; see the module doc). Raises ValueError for restarts < 1."""
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    if restarts == 1:
        return attack_fn(
            x, y, rng, trace, torch.arange(x.shape[0], device=x.device), random_start=random_start
        )

    def start_at_random(x_r, y_r, rng_r, trace_r, rows):
        return attack_fn(x_r, y_r, rng_r, trace_r, rows, random_start=True)

    runs = [
        Run(f"restart{r}_judge", start_at_random, iters, None if r == 0 else f"restart{r}")
        for r in range(restarts)
    ]
    out = run_on_unbroken(defense, x, y, rng, trace, runs, keep="loss")
    first = out.results[0]  # restart 0 attacks every image: its start gradient is the check's
    zero = first.zero_grad if first is not None else None
    return AttackResult(out.x_adv, kept_losses(out), out.path, kept_adv_loss(out), zero)


__all__ = [
    "KEEP",
    "Outcome",
    "Run",
    "RunFn",
    "concatenated_losses",
    "judge",
    "kept_adv_loss",
    "kept_losses",
    "StillRobust",
    "run_on_unbroken",
    "with_restarts",
]
