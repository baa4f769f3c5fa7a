"""CertifyModule: the test loop of `advpure certify`. Lightning only wires the plain-torch pieces
(`advpure.certify.SmoothedClassifier` and the base classifiers of `advpure.certify.build_base`).

test_step (per batch of test images, for every (base, sigma) unit): CERTIFY and PREDICT
(Cohen, Rosenfeld & Kolter 2019) of the images of the batch that this run directory does not hold
yet, then ONE store transaction with their per-image certificates. A killed run therefore loses at
most the unit in progress; a rerun skips every stored (base, sigma, image) and, because the noise
is keyed by (seed, image index, stream, block), recomputes exactly what is missing: the records do
not depend on the batch size, the number of ranks or how often the run was resumed.

Images are sharded by `ImageDataModule` (fixed batches, rank b % world takes batch b, no padding).
Nothing is reduced across processes here: the report is recomputed from the stored records.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import lightning as L
import torch
from torch import nn

from advpure.certify import SmoothedClassifier
from advpure.core.progress import progress
from advpure.results.rundir import load_certificates
from advpure.results.store import RecordStore

Unit = tuple[str, float]  # (base name, sigma)


def unit_key(base: str, sigma: float) -> str:
    """The name of a (base, sigma) unit in manifests, metadata and W&B keys: `<base>/s<sigma>`."""
    return f"{base}/s{float(sigma):g}"


def certificate_row(record: Mapping, seconds: float) -> dict:
    """A `CertifyResult.as_record()` as a row of the store's `certificates` table: `guess` is not
    stored (it is argmax of counts0, ties to the lowest class), `seconds` is this image's share of
    its unit's wall time."""
    row = {k: v for k, v in record.items() if k != "guess"}
    row["abstained"] = int(bool(row["abstained"]))
    row["seconds"] = float(seconds)
    return row


class TimedBase(nn.Module):
    """The base classifier with the time of its forwards counted: the physical limit of certification
    measured inside the run, on exactly the rows CERTIFY evaluates, in its `max_batch` chunks.

    On CPU each forward is timed with `time.perf_counter` (forwards are synchronous there); on CUDA
    with a pair of CUDA events per forward, read only after CERTIFY's own device -> host copy, so the
    timing adds no synchronisation. `take()` returns (rows, seconds) since the last call."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.name = getattr(base, "name", type(base).__name__)
        self._rows, self._seconds, self._events = 0, 0.0, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._rows += x.shape[0]
        if x.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.base(x)
            end.record()
            self._events.append((start, end))
            return out
        t0 = time.perf_counter()
        out = self.base(x)
        self._seconds += time.perf_counter() - t0
        return out

    def take(self) -> tuple[int, float]:
        if self._events:
            self._events[-1][1].synchronize()
            self._seconds += sum(s.elapsed_time(e) for s, e in self._events) / 1000.0
        out = (self._rows, self._seconds)
        self._rows, self._seconds, self._events = 0, 0.0, []
        return out


class CertifyModule(L.LightningModule):
    """Certifies every test batch for every (base, sigma) in `bases` and stores per-image records.

    bases: {(base name, sigma): base classifier module (noisy rows (R, C, H, W) -> logits (R, K))};
    run_dir: the run's directory (records in `records/rank<r>.sqlite`); n0 / n / alpha: CERTIFY's
    selection draws, estimation draws and failure probability; max_batch: rows per forward;
    block: rows per keyed noise block; measure_limit: count the time of the base's own forwards
    (`TimedBase`), summed per unit in the rank's metadata as `limit/<base>/s<sigma>` =
    {'rows', 'seconds', 'rows_per_s'}; progress: a tqdm bar over images x units on rank 0
    (a line with rate and ETA every 30 s when stderr is not a TTY, `advpure.core.progress`).
    """

    # evaluation batches are never padded, so with few batches a rank may get none
    allow_zero_length_dataloader_with_multiple_devices = True

    def __init__(
        self,
        bases: dict[Unit, nn.Module],
        *,
        run_dir: str,
        seed: int,
        num_classes: int,
        n0: int,
        n: int,
        alpha: float,
        max_batch: int,
        block: int,
        measure_limit: bool = True,
        progress: bool = True,
    ):
        super().__init__()
        self.units = [(str(b), float(s)) for b, s in bases]
        self.bases = nn.ModuleList(TimedBase(m) if measure_limit else m for m in bases.values())
        self.run_dir, self.seed, self.num_classes = run_dir, int(seed), int(num_classes)
        self.n0, self.n, self.alpha = int(n0), int(n), float(alpha)
        self.max_batch, self.block = int(max_batch), int(block)
        self.measure_limit, self.progress = measure_limit, progress
        self.store: RecordStore | None = None
        self.done: set[tuple[str, float, int]] = set()
        self.limits: dict[str, dict] = {}
        self.computed = 0  # (image, unit) certificates computed by this process in this run
        self._bar = None

    # --- setup -------------------------------------------------------------------------------------
    def on_test_start(self) -> None:
        # every rank file: after a resume with another world size, an image may be stored by another rank
        self.done = {(r["base"], float(r["sigma"]), int(r["idx"])) for r in load_certificates(self.run_dir)}
        self.store = RecordStore.for_rank(self.run_dir, self.global_rank)
        for key in (unit_key(*u) for u in self.units):
            stored = self.store.get_meta(f"limit/{key}")
            if stored is not None:
                self.limits[key] = stored
        if self.progress and self.global_rank == 0:
            loaders = self.trainer.test_dataloaders
            loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
            images = sum(len(b) for dl in loaders if dl is not None for b in dl.sampler)
            world = f" (rank 0 of {self.trainer.world_size})" if self.trainer.world_size > 1 else ""
            # a bar in a terminal, a line with rate and ETA every 30 s in a log file
            self._bar = progress(images * len(self.units), f"certify{world}", unit="img x unit")

    def on_test_epoch_end(self) -> None:
        if self._bar is not None:  # before the report callback prints the table
            self._bar.close()
            self._bar = None

    def on_test_end(self) -> None:
        if self.store is not None:
            self.store.close()

    # --- the loop ----------------------------------------------------------------------------------
    def smoothed(self, unit: Unit, base: nn.Module) -> SmoothedClassifier:
        name, sigma = unit
        return SmoothedClassifier(
            base,
            sigma,
            self.num_classes,
            seed=self.seed,
            max_batch=self.max_batch,
            block=self.block,
            name=name,
        )

    def test_step(self, batch, batch_idx):
        x, y, idx = batch
        keys = idx.tolist()
        for unit, base in zip(self.units, self.bases):
            todo = [i for i, k in enumerate(keys) if (unit[0], unit[1], k) not in self.done]
            if todo:
                self.certify_unit(unit, base, x[todo], y[todo], [keys[i] for i in todo])
            if self._bar is not None:
                self._bar.update(len(keys))

    def certify_unit(self, unit: Unit, base: nn.Module, x, y, keys: list[int]) -> None:
        """CERTIFY the images x (B, C, H, W) in [0, 1] with labels y (B,) and dataset indices `keys`
        under one (base, sigma), then store their certificates in one transaction."""
        t0 = time.perf_counter()
        results = self.smoothed(unit, base).certify(x, keys, n0=self.n0, n=self.n, alpha=self.alpha, labels=y)
        seconds = (time.perf_counter() - t0) / len(keys)  # certify() ends with a device -> host copy
        self.store.write_certificates([certificate_row(r.as_record(), seconds) for r in results])
        self.done.update((unit[0], unit[1], k) for k in keys)
        self.computed += len(keys)
        if isinstance(base, TimedBase):
            key = unit_key(*unit)
            rows, fwd = base.take()
            old = self.limits.get(key, {"rows": 0, "seconds": 0.0})
            total = {"rows": old["rows"] + rows, "seconds": old["seconds"] + fwd}
            total["rows_per_s"] = total["rows"] / total["seconds"] if total["seconds"] > 0 else None
            self.limits[key] = total
            self.store.set_meta(f"limit/{key}", total)  # timing only: outside the certificates' transaction
