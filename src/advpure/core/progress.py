"""Progress that reads well in a terminal and in a log file.

In a terminal a redrawn tqdm bar is right; written to a file (a SLURM log, `make benchmark > log`)
every redraw is kept, and the file holds one `\\r`-joined line per iteration. So when the stream is
not a TTY, progress is a plain line every `every_s` seconds (and one at the end) with the count,
the rate and the ETA:

    [advpure] benchmark adp pgd batch 3: 120/400 (30%), 2.41 it/s, elapsed 0:00:50, ETA 0:01:56

* `progress(total, desc, ...)` — a tqdm bar on a TTY, else a `LineProgress` (same `update(n)`,
  `close()`, context manager), for loops of our own (attacks, certification);
* `progress_bar_callback(...)` — the Lightning callback: `TQDMProgressBar` on a TTY, else
  `LineProgressBar`, which prints such lines for the train / validation / test loops.

The interval defaults to 30 s (`ADVPURE_PROGRESS_EVERY_S` overrides it; 0 prints every update).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from typing import IO, Any

DEFAULT_EVERY_S = 30.0
ENV_EVERY_S = "ADVPURE_PROGRESS_EVERY_S"


def every_seconds(every_s: float | None = None) -> float:
    """The interval between two progress lines, s: `every_s`, else $ADVPURE_PROGRESS_EVERY_S, else
    30. Raises ValueError for a negative or non-finite value."""
    if every_s is None:
        text = os.environ.get(ENV_EVERY_S)
        every_s = float(text) if text not in (None, "") else DEFAULT_EVERY_S
    every_s = float(every_s)
    if not math.isfinite(every_s) or every_s < 0:
        raise ValueError(f"progress interval must be a finite number of seconds >= 0, got {every_s}")
    return every_s


def is_tty(stream: IO | None) -> bool:
    """Whether `stream` is an interactive terminal (False for files, pipes and closed streams)."""
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):
        return False


def hms(seconds: float) -> str:
    """`H:MM:SS` for a duration in seconds ("?" when unknown)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def progress_line(desc: str, n: float, total: float | None, elapsed: float, unit: str = "it") -> str:
    """One progress line: count / total (percent), rate (`unit`/s), elapsed time and ETA."""
    rate = n / elapsed if elapsed > 0 else math.nan
    rate_text = f"{rate:.3g} {unit}/s" if math.isfinite(rate) else f"? {unit}/s"
    if total:
        eta = (total - n) / rate if rate > 0 else math.nan
        count = f"{n:g}/{total:g} ({100.0 * n / total:.0f}%)"
        return f"[advpure] {desc}: {count}, {rate_text}, elapsed {hms(elapsed)}, ETA {hms(eta)}"
    return f"[advpure] {desc}: {n:g}, {rate_text}, elapsed {hms(elapsed)}"


class LineProgress:
    """A progress counter that prints `progress_line` to `stream` at most every `every_s` seconds,
    and once more at `close()` (plain lines, no `\\r`). Mirrors the part of tqdm's API we use:
    `update(n)`, `close()`, `n`, `total`, context manager."""

    def __init__(
        self,
        total: float | None,
        desc: str = "",
        *,
        unit: str = "it",
        stream: IO | None = None,
        every_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = every_seconds(every_s)
        self.clock = clock
        self.n = 0
        self.start = self.last = clock()
        self.closed = False

    def _print(self) -> None:
        line = progress_line(self.desc, self.n, self.total, self.clock() - self.start, self.unit)
        try:
            print(line, file=self.stream, flush=True)
        except (OSError, ValueError):  # a closed or full log must not end the run
            pass

    def update(self, n: float = 1) -> None:
        """Count `n` more; print a line when `every_s` seconds passed since the last one."""
        self.n += n
        now = self.clock()
        if now - self.last >= self.every_s:
            self.last = now
            self._print()

    def close(self) -> None:
        """Print the final line (once)."""
        if not self.closed:
            self.closed = True
            self._print()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(
    total: float | None,
    desc: str = "",
    *,
    unit: str = "it",
    stream: IO | None = None,
    every_s: float | None = None,
    **tqdm_kwargs: Any,
):
    """A tqdm bar on `stream` (default stderr) when it is a TTY, else a `LineProgress` printing a
    line every `every_s` seconds (module doc). `tqdm_kwargs` (leave, position, dynamic_ncols...)
    go to tqdm only."""
    stream = stream if stream is not None else sys.stderr
    if is_tty(stream):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=stream, **tqdm_kwargs)
    return LineProgress(total, desc, unit=unit, stream=stream, every_s=every_s)


def _line_progress_bar_class():
    from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

    class LineProgressBar(ProgressBar):
        """Lightning's progress for logs: a `progress_line` per loop every `every_s` seconds and at
        each loop's end (train epochs, validation, test), no `\\r` redraws. Rank 0 only."""

        def __init__(self, every_s: float | None = None, stream: IO | None = None, clock=time.monotonic):
            super().__init__()
            self._enabled = True
            self.every_s, self.stream, self.clock = every_seconds(every_s), stream, clock
            self._bars: dict[str, LineProgress] = {}

        def disable(self) -> None:
            self._enabled = False

        def enable(self) -> None:
            self._enabled = True

        @property
        def is_enabled(self) -> bool:
            return self._enabled and self.trainer.is_global_zero

        def _start(self, key: str, desc: str, total: float) -> None:
            if not self.is_enabled:
                return
            total = None if total in (None, math.inf) else total
            self._bars[key] = LineProgress(
                total,
                desc,
                unit="batch",
                stream=self.stream or sys.stdout,
                every_s=self.every_s,
                clock=self.clock,
            )

        def _step(self, key: str) -> None:
            bar = self._bars.get(key)
            if bar is not None:
                bar.update(1)

        def _end(self, key: str) -> None:
            bar = self._bars.pop(key, None)
            if bar is not None:
                bar.close()

        # training
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self._start(
                "train", f"{self.train_description} epoch {trainer.current_epoch}", self.total_train_batches
            )

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self._step("train")

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self._end("train")

        # validation (also inside fit)
        def on_validation_epoch_start(self, trainer, pl_module) -> None:
            if not trainer.sanity_checking:
                self._start("val", self.validation_description, self.total_val_batches)

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            self._step("val")

        def on_validation_epoch_end(self, trainer, pl_module) -> None:
            self._end("val")

        # test
        def on_test_epoch_start(self, trainer, pl_module) -> None:
            total = sum(trainer.num_test_batches) if trainer.num_test_batches else None
            self._start("test", self.test_description, total)

        def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            self._step("test")

        def on_test_epoch_end(self, trainer, pl_module) -> None:
            self._end("test")

    return LineProgressBar


_LINE_PROGRESS_BAR: type | None = None


def line_progress_bar_class() -> type:
    """`LineProgressBar`, built on first use (importing this module does not import Lightning)."""
    global _LINE_PROGRESS_BAR
    if _LINE_PROGRESS_BAR is None:
        _LINE_PROGRESS_BAR = _line_progress_bar_class()
    return _LINE_PROGRESS_BAR


def __getattr__(name: str):
    if name == "LineProgressBar":
        return line_progress_bar_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def progress_bar_callback(every_s: float | None = None, stream: IO | None = None):
    """The Lightning progress callback for this run: `TQDMProgressBar` when `stream` (default
    stdout, where Lightning's bars write) is a TTY, else `LineProgressBar(every_s)` writing lines to
    it (module doc). Pass it in the Trainer's callbacks (with enable_progress_bar=True)."""
    stream = stream if stream is not None else sys.stdout
    if is_tty(stream):
        from lightning.pytorch.callbacks import TQDMProgressBar

        return TQDMProgressBar()
    return line_progress_bar_class()(every_s=every_s, stream=stream)


__all__ = [
    "DEFAULT_EVERY_S",
    "ENV_EVERY_S",
    "LineProgress",
    "every_seconds",
    "hms",
    "is_tty",
    "line_progress_bar_class",
    "progress",
    "progress_bar_callback",
    "progress_line",
]
