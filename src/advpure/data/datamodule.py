"""`ImageDataModule`: the in-memory datasets, their splits, and batch loaders that shard themselves.

Design:
  * The whole dataset is held as uint8 tensors (at most 50000 x 3 x 32 x 32 = 150 MB); the ImageNet
    validation set is the exception: its images are decoded as they are asked for
    (`advpure.data.imagenet.ValImages`, indexed like a tensor), and it has no training split. Loaders
    yield whole batches by indexing those tensors with a tensor of indices, which is much faster
    than per-sample `__getitem__` + collate.
  * Batches are `(x_uint8, y_int64, idx_int64)`; `idx` are dataset indices (train-set indices for
    the train and validation splits, test-set indices for the test split). The per-sample random
    streams of the defense (`advpure.core.rng.SampleRNG`) are keyed by them.
  * Conversion to float [0, 1] and augmentation happen after the transfer, on the device
    (`on_after_batch_transfer`). Per-dataset normalization is the classifier's job, because
    attacks and the purifier work in [0, 1] pixel space.
  * Sharding across DDP ranks is done here, not by Lightning: the Trainer MUST be built with
    `use_distributed_sampler=False` (checked when a loader is built on more than one rank).
    Training batches come from one permutation per epoch shared by all ranks, each rank taking
    the same number of equal-size batches. Evaluation batches have a fixed composition
    (batch b = indices [b*B, (b+1)*B) of the split) and rank r takes the batches with
    b % world_size == r: every index is evaluated exactly once, in the same batch as on one
    process, so results do not depend on the number of ranks. Ranks may then have different
    numbers of evaluation batches (at most one apart): do not run collectives per eval step.
    A rank left without any evaluation batch (more ranks than batches) gets one empty batch
    (0 images) instead, so Lightning still runs its loop and every epoch-end hook (and their
    collectives: metric sync, barriers) on every rank; steps must treat an empty batch as no work
    (`is_empty_batch`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from advpure.core.errors import DataError
from advpure.core.rng import mix
from advpure.data.augment import random_crop, random_hflip, to_unit
from advpure.data.sources import get_spec, load_arrays, resolve

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class BatchDataset(Dataset):
    """`dataset[idx]` with a LongTensor of indices returns the whole batch `(x[idx], y[idx], idx)`."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        if len(x) != len(y):
            raise ValueError(f"{len(x)} images but {len(y)} labels")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, idx: torch.Tensor) -> Batch:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return self.x[idx], self.y[idx], idx


class TrainBatchSampler(Sampler):
    """Shuffled training batches of one rank: a fresh permutation per epoch (seeded by seed, epoch).

    All ranks draw the same permutation and cut it into equal batches; rank r takes batches
    r, r + world, r + 2*world, ... . Leftover images (fewer than a batch, or batches that would
    give some rank one more step than another) are dropped for this epoch, so every rank runs the
    same number of steps and DDP never waits on a missing one. When the set is too small for a
    full batch per rank, the batch size shrinks to `len(indices) // world_size`.
    """

    def __init__(
        self,
        indices: torch.Tensor,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epoch: int = 0,
    ):
        super().__init__()
        self.indices = torch.as_tensor(indices, dtype=torch.long)
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, epoch
        n = len(self.indices)
        self.batch_size = min(batch_size, n // world_size)
        if self.batch_size < 1:
            raise DataError(f"the training split has {n} images, fewer than the {world_size} ranks")
        self.batches_per_rank = (n // self.batch_size) // world_size
        self.skip = 0  # batches of the current epoch already trained (set when resuming mid-epoch)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch; selects that epoch's permutation."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.batches_per_rank

    def __iter__(self) -> Iterator[torch.Tensor]:
        g = torch.Generator().manual_seed(mix(self.seed, self.epoch))
        perm = self.indices[torch.randperm(len(self.indices), generator=g)]
        bs = self.batch_size
        start, self.skip = self.skip, 0  # a resumed epoch continues where the checkpoint stopped
        for k in range(start, self.batches_per_rank):
            b = k * self.world_size + self.rank
            yield perm[b * bs : (b + 1) * bs]


class EvalBatchSampler(Sampler):
    """Fixed-composition evaluation batches: batch b = indices[b*B : (b+1)*B], taken by rank b % world.

    No padding and no duplicates: over all ranks each index appears exactly once. With more ranks
    than batches (world_size > 1), a rank that owns no batch yields one empty index tensor
    (shape (0,)): Lightning skips the whole evaluation loop, epoch-end hooks included, on a rank
    whose loader is empty, and the other ranks would then wait forever in those hooks'
    collectives. Consumers check `is_empty_batch` and do nothing for it.
    """

    def __init__(self, indices: torch.Tensor, batch_size: int, rank: int = 0, world_size: int = 1):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.indices = torch.as_tensor(indices, dtype=torch.long)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_batches = -(-len(self.indices) // batch_size)
        self.batch_ids = range(rank, self.num_batches, world_size)
        # serves one empty batch (when no rank has a batch, Lightning skips the loop on all of them)
        self.idle = world_size > 1 and 0 < self.num_batches <= rank

    def __len__(self) -> int:
        return 1 if self.idle else len(self.batch_ids)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.idle:
            yield self.indices[:0]
            return
        bs = self.batch_size
        for b in self.batch_ids:
            yield self.indices[b * bs : (b + 1) * bs]


def is_empty_batch(batch: Batch | torch.Tensor) -> bool:
    """True for the placeholder batch (0 images) of a DDP rank without evaluation work.

    `batch` is a `(x, y, idx)` batch or its index tensor.
    """
    idx = batch[2] if isinstance(batch, (tuple, list)) else batch
    return idx.numel() == 0


def _as_is(batch: Batch) -> Batch:
    """Collate function for loaders whose dataset already returns whole batches."""
    return batch


class ImageDataModule(L.LightningDataModule):
    """Train / validation / test loaders of one dataset (see the module docstring).

    Build the Trainer with `use_distributed_sampler=False`: this module shards by rank itself.

    `batch_size`, `crop_padding` and `hflip` default to `data_cfg`'s; pass them to override (the
    score network trains with its own batch size and flip setting on the same data).
    """

    def __init__(
        self,
        data_cfg: Any,
        paths_cfg: Any,
        seed: int = 0,
        *,
        batch_size: int | None = None,
        crop_padding: int | None = None,
        hflip: bool | None = None,
    ):
        super().__init__()
        self.data_cfg = data_cfg
        self.paths_cfg = paths_cfg
        self.seed = int(seed)
        self.spec = get_spec(data_cfg.name)
        self.num_classes = self.spec.num_classes
        self.batch_size = int(data_cfg.batch_size if batch_size is None else batch_size)
        self.crop_padding = int(data_cfg.crop_padding if crop_padding is None else crop_padding)
        self.hflip = bool(data_cfg.hflip if hflip is None else hflip)
        # What `test_dataloader()` / `val_dataloader()` serve when Lightning calls them: the first
        # `test_n` test images / `val_n` validation images (None: all; val_n is capped at the split).
        self.test_n: int | None = None
        self.test_batch_size: int | None = None
        self.val_n: int | None = None
        self.test_stride: int = 1  # every k-th test image (randomized smoothing: every 20th)
        self.train_x: torch.Tensor | None = None
        self.train_y: torch.Tensor | None = None
        self.test_x: torch.Tensor | None = None
        self.test_y: torch.Tensor | None = None
        self.train_indices: torch.Tensor | None = None  # train-set indices used for training
        self.val_indices: torch.Tensor | None = None  # train-set indices held out for validation
        self._epoch = 0
        self._train_sampler: TrainBatchSampler | None = None

    # --- loading ---------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Find or download the files (Lightning runs this on one process per node)."""
        resolve(self.data_cfg.name, self.data_cfg.root, self.paths_cfg.data, bool(self.data_cfg.download))

    def setup(self, stage: str | None = None) -> None:
        """Load the arrays into memory (once) and make the validation split."""
        if self.train_x is not None:
            return
        cfg = self.data_cfg
        if self.spec.train_size == 0 and stage == "fit":
            raise DataError(
                f"{cfg.name}: only its evaluation images are read (the ILSVRC2012 validation set); advpure "
                "does not train on it: use published weights (benchmark.train_missing=false)"
            )
        tx, ty, sx, sy = load_arrays(cfg.name, cfg.root, self.paths_cfg.data, bool(cfg.download))
        self.train_x, self.train_y, self.test_x, self.test_y = tx, ty, sx, sy
        if self.spec.train_size == 0:  # evaluation only: no training or validation split
            self.train_indices = self.val_indices = torch.zeros(0, dtype=torch.long)
            self._decode_test_images()
        else:
            self.train_indices, self.val_indices = self.split_indices(len(tx))

    def _decode_test_images(self) -> None:
        """A lazily decoded test set (ImageNet's `ValImages`): decode the images `test_dataloader`
        will serve now (the first `test_n`, every `test_stride`-th), so a bad file fails at setup;
        nothing when `test_n` is unset (images are then decoded as batches ask for them)."""
        if self.test_n is None or not hasattr(self.test_x, "decode"):
            return
        n = min(int(self.test_n) * self.test_stride, len(self.test_x))
        self.test_x.decode(torch.arange(0, n, self.test_stride))

    def split_indices(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(train, val) train-set indices, both sorted; val is a `split_seed`-seeded random subset."""
        val_size = int(self.data_cfg.val_size)
        if val_size >= n:
            raise DataError(f"data.val_size={val_size} leaves no training images (the training set has {n})")
        g = torch.Generator().manual_seed(int(self.data_cfg.split_seed))
        perm = torch.randperm(n, generator=g)
        val = perm[:val_size].sort().values
        train = perm[val_size:].sort().values
        subset = self.data_cfg.train_subset
        if subset is not None:
            if subset < 1:
                raise DataError(f"data.train_subset must be >= 1, got {subset}")
            train = train[:subset]
        return train, val

    def _require_setup(self) -> None:
        if self.train_x is None:
            raise RuntimeError("ImageDataModule.setup() has not been called")

    # --- sharding --------------------------------------------------------------------------------
    def rank_world(self) -> tuple[int, int]:
        """(rank, world size): from the attached Trainer, else torch.distributed, else (0, 1)."""
        t = self.trainer
        if t is not None:
            return int(t.global_rank), int(t.world_size)
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _check_trainer_flags(self, world_size: int) -> None:
        conn = getattr(self.trainer, "_accelerator_connector", None)
        if world_size > 1 and getattr(conn, "use_distributed_sampler", False):
            raise RuntimeError(
                "ImageDataModule shards batches itself: build the Trainer with use_distributed_sampler=False"
            )

    def _shard(self, rank: int | None, world_size: int | None) -> tuple[int, int]:
        r, w = self.rank_world()
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of size {world_size}")
        self._check_trainer_flags(world_size)
        return rank, world_size

    # --- loaders ---------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the training permutation of `epoch` (Lightning also calls the sampler's own)."""
        self._epoch = int(epoch)
        if self._train_sampler is not None:
            self._train_sampler.set_epoch(epoch)

    def resume_mid_epoch(self, done_batches: int) -> None:
        """Make the next training iteration skip the `done_batches` this epoch already trained,
        so a run resumed from a step checkpoint sees exactly the batches an uninterrupted run would."""
        if self._train_sampler is not None and done_batches > 0:
            self._train_sampler.skip = int(done_batches)

    def train_dataloader(self, rank: int | None = None, world_size: int | None = None) -> DataLoader:
        self._require_setup()
        rank, world_size = self._shard(rank, world_size)
        epoch = self.trainer.current_epoch if self.trainer is not None else self._epoch
        self._train_sampler = TrainBatchSampler(
            self.train_indices, self.batch_size, self.seed, rank, world_size, epoch
        )
        return self._loader(self.train_x, self.train_y, self._train_sampler)

    def eval_loader(
        self,
        split: str,
        n: int | None = None,
        batch_size: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        stride: int = 1,
    ) -> DataLoader:
        """This rank's batches of the first `n` images of `split` ("test", "val" or "train").

        `stride` k > 1 takes every k-th image of the split first (indices 0, k, 2k, ...), then the
        first `n` of those. `batch_size` defaults to `data.eval_batch_size`. Rank and world size
        default to the attached Trainer's (or torch.distributed's).
        """
        self._require_setup()
        if split == "test":
            x, y, indices = self.test_x, self.test_y, torch.arange(len(self.test_x))
        elif split == "val":
            x, y, indices = self.train_x, self.train_y, self.val_indices
        elif split == "train":
            x, y, indices = self.train_x, self.train_y, self.train_indices
        else:
            raise ValueError(f"unknown split '{split}'; allowed: test, val, train")
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        if stride > 1:
            indices = indices[::stride]
        if n is not None:
            if not 0 <= n <= len(indices):
                every = f" (every {stride}th image)" if stride > 1 else ""
                raise DataError(
                    f"asked for the first {n} images of the {split} split{every}, which has {len(indices)}"
                )
            indices = indices[:n]
        rank, world_size = self._shard(rank, world_size)
        bs = int(self.data_cfg.eval_batch_size if batch_size is None else batch_size)
        return self._loader(x, y, EvalBatchSampler(indices, bs, rank, world_size))

    def val_dataloader(self) -> DataLoader:
        self._require_setup()
        n = None if self.val_n is None else min(int(self.val_n), len(self.val_indices))
        return self.eval_loader("val", n=n)

    def test_dataloader(self, n: int | None = None, batch_size: int | None = None) -> DataLoader:
        """The test split; `n` / `batch_size` default to the `test_n` / `test_batch_size` attributes."""
        n = self.test_n if n is None else n
        batch_size = self.test_batch_size if batch_size is None else batch_size
        return self.eval_loader("test", n=n, batch_size=batch_size, stride=self.test_stride)

    @staticmethod
    def _loader(x: torch.Tensor, y: torch.Tensor, sampler: Sampler) -> DataLoader:
        # batch_size=None: each sampler item is already a whole batch of indices; len() is the
        # number of batches this rank will see.
        return DataLoader(
            BatchDataset(x, y), batch_size=None, sampler=sampler, num_workers=0, collate_fn=_as_is
        )

    # --- on the device ---------------------------------------------------------------------------
    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        """uint8 -> float [0, 1] on the device; random crop / flip only while the trainer trains."""
        x, y, idx = batch
        x = to_unit(x)
        if self.trainer is not None and self.trainer.training and (self.crop_padding > 0 or self.hflip):
            # keyed by (seed, step, rank), not the global RNG: a resumed run augments identically
            gen = torch.Generator(device=x.device)
            step, rank = getattr(self.trainer, "global_step", 0), getattr(self.trainer, "global_rank", 0)
            gen.manual_seed(mix(self.seed, 0xA06, step, rank))
            x = self.augment(x, gen)
        return x, y, idx

    def augment(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The training augmentation of this dataset (crop with `crop_padding`, then `hflip`)."""
        if self.crop_padding > 0:
            x = random_crop(x, self.crop_padding, generator)
        if self.hflip:
            x = random_hflip(x, generator)
        return x
