"""Readers for the standard dataset files: IDX (MNIST, Fashion-MNIST) and CIFAR "python" batches.

Both readers validate everything they read and raise a one-line `DataError` naming the file and
the problem. A corrupt or truncated download must never turn into a silently shorter dataset:
accuracy numbers on a partial test set look plausible and are wrong.

CIFAR batches are pickles. Unpickling can run arbitrary code, so they are read with a restricted
unpickler that resolves only the few numpy functions needed to rebuild arrays and refuses any
other global before it can be called.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import zlib
from pathlib import Path

import numpy as np
import torch

from advpure.core.errors import DataError

# --- IDX ----------------------------------------------------------------------------------------
IDX_UINT8 = 0x08  # the only element type the datasets use; others are refused rather than guessed


GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    """The file's content, decompressed when it is gzip (told by its first two bytes, not its
    name: mirrors and browsers ship both, under either name); gzip errors become DataErrors
    naming the file."""
    try:
        with open(path, "rb") as f:
            compressed = f.read(2) == GZIP_MAGIC
        if compressed:
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except EOFError:
        raise DataError(f"{path}: truncated gzip file (compressed stream ended early)") from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: corrupt gzip file ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def read_idx(path: str | Path) -> torch.Tensor:
    """Read an IDX file (raw or gzip-compressed) of unsigned bytes into a uint8 tensor of its stored shape.

    The header is magic `00 00 <dtype> <ndim>` followed by `ndim` big-endian uint32 sizes; the
    payload must hold exactly prod(sizes) bytes (no shorter, no trailing data).
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"{path}: not an IDX file (only {len(data)} bytes)")
    if data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic {data[:4].hex()}, expected 0000xxxx)")
    dtype, ndim = data[2], data[3]
    if dtype != IDX_UINT8:
        raise DataError(f"{path}: IDX element type 0x{dtype:02x} is not supported (expected 0x08, uint8)")
    if ndim == 0:
        raise DataError(f"{path}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes, expected {header})")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = math.prod(dims)
    got = len(data) - header
    if got != expected:
        what = "short" if got < expected else "long"
        raise DataError(
            f"{path}: IDX payload too {what}: {got} bytes, expected {expected} for shape {tuple(dims)}"
        )
    # bytearray: a writable buffer, so the tensor owns ordinary memory (no read-only warning).
    buf = bytearray(memoryview(data)[header:])
    if expected == 0:
        return torch.zeros(dims, dtype=torch.uint8)
    return torch.frombuffer(buf, dtype=torch.uint8).reshape(dims)


# --- CIFAR python batches -----------------------------------------------------------------------
def _numpy_globals() -> dict[tuple[str, str], object]:
    """The globals a pickled numpy array may reference, by the module names numpy 1.x and 2.x use.

    Resolved here to the objects of the installed numpy, so a numpy-1 pickle (`numpy.core...`)
    loads without importing the deprecated alias module.
    """
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    import _codecs

    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # protocol 2 written by Python 3 stores bytes as _codecs.encode(str, 'latin1')
        ("_codecs", "encode"): _codecs.encode,
    }
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5
    return allowed


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays, lists, dicts, strings and numbers, and nothing else."""

    _allowed = _numpy_globals()

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")  # the CIFAR files were written by Python 2
        self.path = path

    def find_class(self, module: str, name: str):
        obj = self._allowed.get((module, name))
        if obj is None:
            raise DataError(
                f"{self.path}: pickle references {module}.{name}, which is not allowed "
                "(only numpy array data is unpickled)"
            )
        return obj

    def persistent_load(self, pid):
        raise DataError(f"{self.path}: pickle uses persistent ids, which are not allowed")


def _restricted_load(path: Path) -> object:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    try:
        return _ArrayOnlyUnpickler(io.BytesIO(raw), path).load()
    except DataError:
        raise
    except Exception as e:  # truncated / garbled pickles raise many different types
        raise DataError(f"{path}: not a readable CIFAR batch ({type(e).__name__}: {e})") from None


def _key(d: dict, name: str):
    """Look a key up as bytes (Python 2 files) or str (files re-written by Python 3)."""
    if name.encode() in d:
        return d[name.encode()]
    return d.get(name)


def read_cifar_batch(path: str | Path, num_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one CIFAR-10 (`labels`) or CIFAR-100 (`fine_labels`) batch file.

    Returns uint8 images (N, 3, 32, 32) and int64 labels (N,). `num_classes` defaults to 100 for
    files with fine labels and to 10 otherwise; labels outside [0, num_classes) are an error.
    """
    path = Path(path)
    obj = _restricted_load(path)
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    data = _key(obj, "data")
    if data is None:
        raise DataError(f"{path}: no 'data' entry")
    fine = _key(obj, "fine_labels")
    labels = fine if fine is not None else _key(obj, "labels")
    if labels is None:
        raise DataError(f"{path}: no 'labels' or 'fine_labels' entry")
    if num_classes is None:
        num_classes = 100 if fine is not None else 10

    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        kind = f"array of {data.dtype}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be a uint8 array, got {kind}")
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' has shape {data.shape}, expected (N, 3072)")
    try:
        labels_arr = np.asarray(labels)
    except Exception:
        raise DataError(f"{path}: labels are not a list of integers") from None
    if labels_arr.ndim != 1 or not np.issubdtype(labels_arr.dtype, np.integer):
        raise DataError(
            f"{path}: labels must be a flat list of integers, got {labels_arr.dtype} {labels_arr.shape}"
        )
    if len(labels_arr) != len(data):
        raise DataError(f"{path}: {len(labels_arr)} labels for {len(data)} images")
    if len(labels_arr) and (labels_arr.min() < 0 or labels_arr.max() >= num_classes):
        raise DataError(
            f"{path}: labels range [{labels_arr.min()}, {labels_arr.max()}] outside [0, {num_classes})"
        )
    # Rows are 1024 red, 1024 green, 1024 blue values, each a row-major 32x32 plane.
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels_arr.astype(np.int64))
