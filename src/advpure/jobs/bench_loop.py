"""The benchmark's test loop, in one module: `DefendedClassifier` (natural accuracy) and one
`AttackCallback` per (defense, attack) unit. Lightning only wires the plain-torch pieces.

The contract between the two (what a callback uses of the module): `defense(name)`, `seed`,
`batch_id(idx)`, `replay(defense, attack, batch)`, `natural_rng(name, idx)`, `dwbox_seed(name)`,
`clean_draws(name, x, y, idx, rows)` and `write(...)`.

test_step (per batch, for every defense): natural accuracy of `worst_of_n` independent defended
predictions (and, for the DW-box protocol, of the frozen defense), every merge rule, written as
per-sample records to this process's store. The attack callbacks then attack the same batch. Batches already in the store (a resumed run) are not recomputed:
their records re-feed the metrics.

AttackCallback runs one attack against one defense on every test batch, after test_step. For the batch's images (or the first `max_images` of the benchmark), it runs the attack, then
classifies the final adversarial input `worst_of_n` times with fresh randomness (draw 0 is the
single draw) and, with the attack's path, derives every protocol's per-sample record. Protocols
with their own observations get them here too: the DW-box protocol runs the attack a second time
against the frozen defense (`Defense.frozen`), the noise floors classify the clean batch as often
as the protocol they belong to did. Records, the loss along the attack's iterations, a few
example images and the cost (score-network evaluations, seconds) go to the store in one
transaction per batch.

The Trainer must run with `inference_mode=False`: attacks need gradients in the test loop.

Metrics are torchmetrics `MeanMetric`s, synchronised across processes at epoch end; every
process only evaluates its own batches (no padding), so nothing is counted twice.
"""

from __future__ import annotations

import time

import lightning as L
import torch
import torchmetrics
from lightning.pytorch.callbacks import Callback
from torch import nn

from advpure.attacks import attack_class, run_attack
from advpure.core.errors import NonFiniteError
from advpure.core.progress import progress
from advpure.core.rng import SampleRNG, mix, stream_id
from advpure.data.datamodule import is_empty_batch
from advpure.jobs.plan import Unit
from advpure.nets.compiled import eager_of, warm_up
from advpure.purify.defense import Defense
from advpure.results import (
    NATURAL,
    Observations,
    RecordStore,
    metric_name,
    protocol,
    protocol_records,
    records_for,
)
from advpure.results.store import EXAMPLE_LABEL, EXAMPLE_PREDICTION


def stage_error(e: NonFiniteError, stage: str, n: int) -> NonFiniteError:
    """The one-line error of a non-finite net output, with the stage and the batch size."""
    return NonFiniteError(f"{stage} ({n} images): {e}; nothing was recorded for this batch")


class DefendedClassifier(L.LightningModule):
    """The benchmark's test loop over the plan's defenses (see the module docstring): batches of
    (x (B, C, H, W) in [0, 1], y (B,), dataset indices (B,)); records go to this rank's store."""

    def __init__(
        self,
        defenses: dict[str, Defense],
        *,
        run_dir: str,
        seed: int,
        batch_size: int,
        worst_of_n: int,
        metric_names: list[str],
        protocols: list[str] | None = None,
        merge: str = "softmax",
        compiled_score: nn.Module | None = None,
    ):
        super().__init__()
        self.names = list(defenses)
        self.defenses = nn.ModuleList(defenses.values())
        self.run_dir, self.seed, self.batch_size, self.worst_of_n, self.merge = (
            run_dir,
            seed,
            batch_size,
            worst_of_n,
            merge,
        )
        self.protocols = list(protocols) if protocols is not None else None  # None: all registered
        self._clean: dict[tuple, dict[str, torch.Tensor]] = {}  # this batch's clean draws per defense
        self.metric_keys = {name: f"m{i}" for i, name in enumerate(metric_names)}
        self.metrics = nn.ModuleDict({k: torchmetrics.MeanMetric() for k in self.metric_keys.values()})
        self.store: RecordStore | None = None
        self.compiled_score = compiled_score  # torch.compile'd score net, warmed up and checked first
        self.compile_seconds: float | None = None

    def defense(self, name: str) -> Defense:
        return self.defenses[self.names.index(name)]

    # --- records and metrics ---------------------------------------------------------------------
    def on_test_start(self) -> None:
        self.store = RecordStore.for_rank(self.run_dir, self.global_rank)
        if self.compiled_score is not None and self.compile_seconds is None:
            net = eager_of(self.compiled_score)
            x = torch.rand(4, net.in_channels, net.image_size, net.image_size, device=self.device)
            self.compile_seconds = warm_up(self.compiled_score, x)
            self.print(
                f"torch.compile: first calls of the score net took {self.compile_seconds:.1f} s; agrees with eager"
            )
            for logger in self.loggers:
                logger.log_metrics({"perf/compile_seconds": self.compile_seconds})

    def on_test_end(self) -> None:
        if self.store is not None:
            self.store.close()

    def natural_rng(self, name: str, idx: torch.Tensor) -> SampleRNG:
        """The stream of the clean evaluation; the final adversarial inputs are judged with it too
        (common random numbers), and the noise floors reuse its first draws."""
        return SampleRNG(self.seed, idx, stream=f"{name}/{NATURAL}")

    def dwbox_seed(self, name: str) -> int:
        """The frozen noise of defense `name` under the DW-box protocol (the same for every attack)."""
        return mix(self.seed, stream_id(f"{name}/dwbox"))

    def clean_draws(self, name: str, x, y, idx, rows: int) -> dict[str, torch.Tensor]:
        """{merge: (>= rows, B) bool}: fresh defended classifications of the clean batch, the first
        ones equal to the natural evaluation's draws (same keyed stream). Computed once per batch
        and defense for the largest `rows` asked (the noise floors of every attack share them)."""
        key = (name, tuple(idx.tolist()))
        have = self._clean.get(key)
        if have is None or next(iter(have.values())).shape[0] < rows:
            self._clean = {key: self.defense(name).evaluate(x, y, self.natural_rng(name, idx), n=rows)}
        return self._clean[key]

    def batch_id(self, idx: torch.Tensor) -> int:
        return int(idx[0]) // self.batch_size

    def update_metrics(self, records) -> None:
        """Feed records of the configured merge rule to the matching metrics."""
        by_name: dict[str, list[float]] = {}
        for r in records:
            if r.merge == self.merge:
                by_name.setdefault(metric_name(r.defense, r.attack, r.protocol), []).append(r.value)
        for name, values in by_name.items():
            key = self.metric_keys.get(name)
            if key is not None:
                self.metrics[key].update(torch.tensor(values, dtype=torch.float32, device=self.device))

    def replay(self, defense: str, attack: str, batch: int) -> bool:
        """If this batch is already stored, feed its records to the metrics and report True."""
        if not self.store.is_done(defense, attack, batch):
            return False
        self.update_metrics(self.store.batch_records(defense, attack, batch))
        return True

    def write(
        self, defense, attack, idx, per_merge, *, score_evals, seconds, traces=None, examples=None, stats=None
    ) -> None:
        records = records_for(defense, attack, idx.tolist(), per_merge)
        self.store.write_batch(
            defense,
            attack,
            self.batch_id(idx),
            int(idx[0]),
            len(idx),
            records,
            score_evals=score_evals,
            seconds=seconds,
            traces=traces,
            examples=examples,
            stats=stats,
        )
        self.update_metrics(records)

    # --- the loop --------------------------------------------------------------------------------
    def test_step(self, batch, batch_idx):
        x, y, idx = batch
        if is_empty_batch(idx):  # a DDP rank without test batches: nothing to do
            return
        for name, defense in zip(self.names, self.defenses):
            b = self.batch_id(idx)
            if self.replay(name, NATURAL, b):
                continue
            t0, e0 = time.perf_counter(), defense.score_evals
            rng = self.natural_rng(name, idx)
            frozen = None
            try:
                correct = defense.evaluate(x, y, rng, n=self.worst_of_n)
                if any(protocol(p).run == "frozen" for p in self.protocols or ()):
                    with defense.frozen(self.dwbox_seed(name)):
                        frozen = defense.evaluate(x, y, rng, n=1)
            except NonFiniteError as e:
                raise stage_error(e, f"natural accuracy of {name}, batch {b}", len(idx)) from None
            per_merge = {
                m: protocol_records(c, protocols=self.protocols, frozen=frozen[m] if frozen else None)
                for m, c in correct.items()
            }
            self.write(
                name,
                NATURAL,
                idx,
                per_merge,
                score_evals=defense.score_evals - e0,
                seconds=time.perf_counter() - t0,
            )

    def on_test_epoch_end(self) -> None:
        for name, key in self.metric_keys.items():
            metric = self.metrics[key]
            self.log(name, metric.compute(), sync_dist=False, rank_zero_only=True)
            metric.reset()


class AttackCallback(Callback):
    """Attacks `unit.defense` with `unit.spec` on every test batch (see the module docstring)."""

    def __init__(
        self,
        unit: Unit,
        *,
        worst_of_n: int,
        protocols: list[str],
        image_grid: int,
        progress: bool = True,
    ):
        self.unit = unit
        self.worst_of_n, self.protocols, self.image_grid, self.progress = (
            worst_of_n,
            list(protocols),
            image_grid,
            progress,
        )
        self.track_path = any(protocol(p).needs_path for p in self.protocols)
        self.runs = {protocol(p).run for p in self.protocols}
        self.classes: int | None = None  # set from the first logits' width (the ensemble's stages)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        u = self.unit
        x, y, idx = batch
        if is_empty_batch(idx):  # a DDP rank without test batches
            return
        limit = u.spec.max_images
        if limit is not None:
            keep = idx < limit
            if not keep.any():
                return
            x, y, idx = x[keep], y[keep], idx[keep]
        b = pl_module.batch_id(idx)
        if pl_module.replay(u.defense, u.attack, b):
            return
        defense = pl_module.defense(u.defense)
        rng = SampleRNG(pl_module.seed, idx, stream=u.key)
        t0, e0 = time.perf_counter(), defense.score_evals
        spec = getattr(getattr(trainer, "datamodule", None), "spec", None)
        self.classes = spec.num_classes if spec is not None else None
        bar = self._bar(trainer, b)
        hooks = dict(progress=(lambda i: bar.update(1)) if bar else None)
        attack = dict(eps=u.eps, step=u.step, protocols=self.protocols, draws=self.worst_of_n, **hooks)
        frozen = clean = None
        try:
            with torch.enable_grad():
                result = run_attack(
                    u.spec, defense, x, y, rng.child("attack"), track_path=self.track_path, **attack
                )
            # Common random numbers: the final input is judged with the same defense noise as the
            # clean one in test_step (the attack never sees it), so eps = 0 reproduces natural
            # accuracy sample by sample and natural - robust is not blurred by evaluation noise.
            judge = pl_module.natural_rng(u.defense, idx)
            final = defense.evaluate(result.x_adv, y, judge, n=self.worst_of_n)
            if "frozen" in self.runs:  # DW-box: attack and judge the defense with its noise frozen
                with defense.frozen(pl_module.dwbox_seed(u.defense)), torch.enable_grad():
                    x_dw = run_attack(u.spec, defense, x, y, rng.child("dwbox"), **attack).x_adv
                    frozen = defense.evaluate(x_dw, y, judge, n=1)
            if "clean" in self.runs:  # noise floors: as many clean evaluations as the protocols made
                path = result.path_correct  # one row per iterate of every run (restarts, stages)
                iterates = next(iter(path.values())).shape[0] if path else result.losses.shape[0] - 1
                draws = pl_module.clean_draws(u.defense, x, y, idx, max(self.worst_of_n, iterates + 1))
                clean = {m: Observations(d, n=self.worst_of_n, path_len=iterates) for m, d in draws.items()}
        except NonFiniteError as e:
            raise stage_error(e, f"attack {u.attack} on {u.defense}, batch {b}", len(idx)) from None
        finally:
            if bar:
                bar.close()
        path = result.path_correct
        per_merge = {
            m: protocol_records(
                c,
                path[m] if path is not None else None,
                self.protocols,
                frozen=frozen[m] if frozen is not None else None,
                clean=clean[m] if clean is not None else None,
            )
            for m, c in final.items()
        }
        examples, classes = self._examples(defense, x, y, result.x_adv, idx, rng)
        traces = {int(i): result.losses[:, k].float().cpu().numpy() for k, i in enumerate(idx.tolist())}
        stats = dict(classes)
        if result.zero_grad is not None:
            stats["zero_grad"] = dict(zip(idx.tolist(), result.zero_grad.float().tolist()))
        pl_module.write(
            u.defense,
            u.attack,
            idx,
            per_merge,
            score_evals=defense.score_evals - e0,
            seconds=time.perf_counter() - t0,
            traces=traces,
            examples=examples,
            stats=stats or None,
        )

    def _examples(self, defense, x, y, x_adv, idx, rng):
        """Clean / adversarial / purified (one purification draw) for the first images of the run,
        and as per-sample stats their true class and the classifier's class of that purified image
        (`EXAMPLE_LABEL`, `EXAMPLE_PREDICTION`): ([(idx, clean, adv, purified)], {name: {idx: class}})."""
        sel = (idx < self.image_grid).nonzero().squeeze(1)
        if sel.numel() == 0 or self.unit.sweep or self.unit.check is not None:
            return None, {}
        with torch.no_grad():
            purified = defense.purify(x_adv[sel], rng.child("grid").subset(sel), draws=1).x
            predicted = defense.classify(purified).argmax(dim=-1)
        examples = [
            (
                int(idx[s]),
                x[s].float().cpu().numpy(),
                x_adv[s].float().cpu().numpy(),
                purified[k].float().cpu().numpy(),
            )
            for k, s in enumerate(sel.tolist())
        ]
        chosen = idx[sel].tolist()
        classes = {
            EXAMPLE_LABEL: dict(zip(chosen, y[sel].tolist())),
            EXAMPLE_PREDICTION: dict(zip(chosen, predicted.tolist())),
        }
        return examples, classes

    def _bar(self, trainer, b):
        if not self.progress or not trainer.is_global_zero or trainer.progress_bar_callback is None:
            return None
        u = self.unit
        return progress(
            total=attack_class(u.spec.kind).total_iters(u.spec, self.classes)
            * (2 if "frozen" in self.runs else 1),
            desc=f"{u.defense} {u.attack} batch {b}",
            leave=False,
            position=1,
            dynamic_ncols=True,
        )
