"""Keyed Gaussian noise for randomized smoothing: the draws of an image never depend on the batch.

The `num` noise samples of test image `idx` in a named stream ("select" for CERTIFY's n0
selection draws, "estimate" for its n estimation draws, "predict" for PREDICT) are cut into
blocks of a FIXED size `block` (default `BLOCK` = 1000 rows; the last block may be shorter).
Block `k` holds samples [k * block, min((k + 1) * block, num)) and is drawn by one
`torch.randn` call from a generator seeded with `advpure.core.rng.mix(seed, idx, stream_id(stream), k)`.
So the noise an image sees is a function of (seed, idx, stream, k, block, num) only: the same for
any images-per-batch, any rows-per-forward (`max_batch`), any DDP sharding and after a resume.
`block` is part of the key: changing it changes every draw (record it with the results).

Draws are made on the device of the images (`torch.Generator(device)`), so nothing crosses the
host-device link. CUDA and CPU generators implement different algorithms (Philox vs Mersenne
Twister): the same key gives different, equally valid N(0, I) streams on the two; results are
reproducible per device type. The same keys are used for every sigma and every base classifier
(common random numbers: comparisons between them are paired); each certificate is valid alone.
"""

from __future__ import annotations

import torch

from advpure.core.rng import mix, stream_id

BLOCK = 1000  # rows per keyed block: n = 100,000 is 100 blocks, n0 = 100 one (shorter) block

STREAMS = ("select", "estimate", "predict", "attack")


def block_key(seed: int, idx: int, stream: str, k: int) -> int:
    """The 63-bit generator seed of block `k` of image `idx` in `stream`."""
    return mix(seed, idx, stream_id(stream), k)


def num_blocks(num: int, block: int = BLOCK) -> int:
    """Number of blocks holding `num` samples."""
    return -(-int(num) // int(block))


def block_rows(num: int, k: int, block: int = BLOCK) -> int:
    """Rows of block `k` of `num` samples: `block`, except the last one."""
    return min(int(block), int(num) - k * int(block))


class KeyedNormal:
    """Standard-normal blocks keyed by (seed, image index, stream, block) on one device.

    One generator is reseeded per block (cheap on CPU and CUDA), so a block costs one
    `torch.randn` of (rows, *shape) float32 values.
    """

    def __init__(self, seed: int, device: torch.device | str = "cpu", block: int = BLOCK):
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        self.seed, self.block = int(seed), int(block)
        self.device = torch.device(device)
        self._gen = torch.Generator(device=self.device)

    def draw(self, idx: int, stream: str, k: int, num: int, shape: tuple[int, ...]) -> torch.Tensor:
        """Block `k` of the `num` samples of image `idx`: a (rows, *shape) float32 N(0, 1) tensor on
        `self.device`, rows = `block_rows(num, k, block)`."""
        rows = block_rows(num, k, self.block)
        if rows < 1:
            raise ValueError(f"block {k} is past the end of {num} samples (block size {self.block})")
        self._gen.manual_seed(block_key(self.seed, idx, stream, k))
        return torch.randn((rows, *shape), generator=self._gen, device=self.device, dtype=torch.float32)

    def samples(self, idx: int, stream: str, num: int, shape: tuple[int, ...]) -> torch.Tensor:
        """All `num` samples of image `idx` in `stream`, (num, *shape) (blocks concatenated)."""
        return torch.cat([self.draw(idx, stream, k, num, shape) for k in range(num_blocks(num, self.block))])
