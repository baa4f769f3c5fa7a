"""Random streams for the stochastic defense and the attacks.

`SampleRNG` keys every random number drawn for test image `i` by (seed, stream, call, i, draw):
the noise an image sees does not depend on which other images share its batch, on chunking,
on the number of DDP ranks, or on a resume after preemption. This is what makes a 2-rank
benchmark equal the 1-rank one sample by sample.

`GeneratorRNG` wraps a plain `torch.Generator` (one stream for the whole batch) for users who
call a purifier directly.

Both expose the same methods; each call returns `(draws, *like.shape)` and advances the stream.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix(*values: int) -> int:
    """Hash integers into one 63-bit seed (stable across processes and platforms)."""
    h = 0x6A09E667F3BCC909
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h & ((1 << 63) - 1)


def stream_id(name: str) -> int:
    return zlib.crc32(name.encode())


class SampleRNG:
    """Per-sample keyed random numbers. `index` are the dataset indices of the batch rows."""

    def __init__(self, seed: int, index: torch.Tensor | Sequence[int], stream: int | str = 0):
        self.seed = int(seed)
        self.index = [int(i) for i in (index.tolist() if torch.is_tensor(index) else index)]
        self.stream = stream_id(stream) if isinstance(stream, str) else int(stream)
        self.calls = 0

    def child(self, name: str) -> SampleRNG:
        """An independent stream for a named consumer (an attack, a protocol)."""
        return SampleRNG(mix(self.seed, stream_id(name)), self.index, self.stream)

    def subset(self, rows: torch.Tensor) -> SampleRNG:
        """The same stream restricted to some rows; shares the call counter position."""
        out = SampleRNG(self.seed, [self.index[i] for i in rows.tolist()], self.stream)
        out.calls = self.calls
        return out

    def tile(self, copies: int) -> SampleRNG:
        """An RNG for `copies` stacked copies of the batch (copy-major rows). All copies of an
        image get the same numbers: common random numbers across queries of one image, which
        keeps finite differences (SPSA) from drowning in the defense's own noise."""
        key = mix(self.seed, self.stream, self.calls)
        self.calls += 1
        return SampleRNG(key, self.index * copies, self.stream)

    def _draw(self, d: int) -> int:
        """Which draw's numbers draw `d` uses (all its own here; FrozenRNG repeats a period)."""
        return d

    def _fill(self, draws: int, like: torch.Tensor, sample) -> torch.Tensor:
        """(draws, B, *like.shape[1:]) numbers: row r of draw d from a generator seeded by
        (this call's key, index[r], self._draw(d)). Raises ValueError when B != len(index)."""
        if like.shape[0] != len(self.index):
            raise ValueError(f"batch has {like.shape[0]} rows but the RNG has {len(self.index)} indices")
        key = mix(self.seed, self.stream, self.calls)
        self.calls += 1
        shape = tuple(like.shape[1:])
        bank = {}  # rows with the same (index, draw) get the same numbers: drawn once
        out = torch.empty((draws, len(self.index), *shape), dtype=torch.float32)
        gen = torch.Generator()
        for d in range(draws):
            dd = self._draw(d)
            for r, i in enumerate(self.index):
                if (i, dd) not in bank:
                    gen.manual_seed(mix(key, i, dd))
                    bank[(i, dd)] = sample(shape, gen)
                out[d, r] = bank[(i, dd)]
        return out.to(device=like.device, dtype=like.dtype)

    def normal(self, draws: int, like: torch.Tensor) -> torch.Tensor:
        return self._fill(draws, like, lambda s, g: torch.randn(s, generator=g))

    def rademacher(self, draws: int, like: torch.Tensor) -> torch.Tensor:
        return self._fill(draws, like, lambda s, g: torch.randint(0, 2, s, generator=g).float() * 2 - 1)

    def uniform(self, draws: int, like: torch.Tensor) -> torch.Tensor:
        """Uniform on [-1, 1)."""
        return self._fill(draws, like, lambda s, g: torch.rand(s, generator=g) * 2 - 1)


class FrozenRNG(SampleRNG):
    """The defense's randomness drawn once per image: the deterministic white-box (DW-box)
    protocol of Liu et al. (ICLR 2025, arXiv 2404.14309).

    Every purification call replays the same noise sequence for image i (its call counter starts
    at 0 each time a `Defense` purifies), and draw d uses the noise of replica d mod `period`: with
    period = S, any number of EOT draws averages exactly the S frozen replicas the final
    evaluation uses, so the attacker knows the defense it faces.
    """

    def __init__(self, seed: int, index, period: int, stream: int | str = "dwbox"):
        super().__init__(seed, index, stream)
        if period < 1:
            raise ValueError(f"period must be >= 1, got {period}")
        self.period = int(period)

    def _draw(self, d: int) -> int:
        return d % self.period


class GeneratorRNG:
    """One `torch.Generator` stream for the whole batch (draw-major order)."""

    def __init__(self, generator: torch.Generator | None = None, seed: int | None = None):
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(0 if seed is None else seed)
        self.generator = generator

    def child(self, name: str) -> GeneratorRNG:
        return self

    def subset(self, rows: torch.Tensor) -> GeneratorRNG:
        return self

    def tile(self, copies: int) -> GeneratorRNG:
        return self

    def _shape(self, draws: int, like: torch.Tensor) -> tuple[int, ...]:
        return (draws, *like.shape)

    def normal(self, draws: int, like: torch.Tensor) -> torch.Tensor:
        out = torch.randn(self._shape(draws, like), generator=self.generator, device=self.generator.device)
        return out.to(device=like.device, dtype=like.dtype)

    def rademacher(self, draws: int, like: torch.Tensor) -> torch.Tensor:
        bits = torch.randint(
            0, 2, self._shape(draws, like), generator=self.generator, device=self.generator.device
        )
        return (bits.to(like.dtype) * 2 - 1).to(like.device)

    def uniform(self, draws: int, like: torch.Tensor) -> torch.Tensor:
        out = torch.rand(self._shape(draws, like), generator=self.generator, device=self.generator.device)
        return (out * 2 - 1).to(device=like.device, dtype=like.dtype)


RNG = SampleRNG | GeneratorRNG
