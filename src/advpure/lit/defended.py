"""DefendedClassifier: the benchmark's test loop. Lightning only wires the plain-torch pieces.

test_step (per batch, for every defense): natural accuracy of `worst_of_n` independent defended
predictions, every merge rule, written as per-sample records to this process's store. The
attack callbacks (`advpure.callbacks.attack`) then attack the same batch. Batches already in the
store (a resumed run) are not recomputed: their records re-feed the metrics.

Metrics are torchmetrics `MeanMetric`s, synchronised across processes at epoch end; every
process only evaluates its own batches (no padding), so nothing is counted twice.
"""

from __future__ import annotations

import time

import lightning as L
import torch
import torchmetrics
from torch import nn

from advpure.data.datamodule import is_empty_batch
from advpure.nets.compiled import eager_of, warm_up
from advpure.purify.defense import Defense
from advpure.results import NATURAL, RecordStore, protocol_records, records_for
from advpure.rng import SampleRNG


def metric_name(defense: str, attack: str, protocol: str) -> str:
    if attack == NATURAL:
        return f"natural/{defense}" if protocol == "single" else f"natural/{defense}/{protocol}"
    return f"robust/{defense}/{attack}/{protocol}"


class DefendedClassifier(L.LightningModule):
    def __init__(
        self,
        defenses: dict[str, Defense],
        *,
        run_dir: str,
        seed: int,
        batch_size: int,
        worst_of_n: int,
        metric_names: list[str],
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

    def batch_id(self, idx: torch.Tensor) -> int:
        return int(idx[0]) // self.batch_size

    def update_metrics(self, records) -> None:
        """Feed records of the configured merge rule to the matching metrics."""
        by_name: dict[str, list[float]] = {}
        for r in records:
            if r.merge == self.merge and r.protocol != "mean_of_n":
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
        self, defense, attack, idx, per_merge, *, score_evals, seconds, traces=None, examples=None
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
            rng = SampleRNG(self.seed, idx, stream=f"{name}/{NATURAL}")
            correct = defense.evaluate(x, y, rng, n=self.worst_of_n)
            per_merge = {m: protocol_records(c) for m, c in correct.items()}
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
