"""Peak memory of a function, on CUDA (the caching allocator's counters) and on CPU.

PyTorch has no CPU peak-memory counter. On Linux/glibc we read the heap's in-use bytes
(`mallinfo2`: small blocks + mmapped large blocks) after every aten op, via a dispatch mode, and
keep the maximum. That counts tensors, saved activations and temporaries alike, which is what
"memory grows with T" is about; it ignores nothing the process really holds on the heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc()
_MALLINFO2 = getattr(_LIBC, "mallinfo2", None)  # glibc >= 2.33
if _MALLINFO2 is not None:
    _MALLINFO2.restype = _MallInfo2


def heap_in_use() -> int:
    """Bytes in use on the C heap (glibc), or -1 where unavailable."""
    if _MALLINFO2 is None:
        return -1
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd)


def clean_heap() -> None:
    """Collect reference cycles and return free heap memory to the OS (glibc `malloc_trim`), so
    that one measurement's garbage does not slow or inflate the next (`peak_memory` reads the heap)."""
    gc.collect()
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


class _PeakHeap(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.peak = heap_in_use()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        now = heap_in_use()
        if now > self.peak:
            self.peak = now
        return out


def cpu_peak_supported() -> bool:
    """Whether `peak_memory` can measure on CPU here (Linux with glibc's `mallinfo2`)."""
    return heap_in_use() >= 0


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes above the starting level while running `fn()` (allocations it made).

    CUDA: `torch.cuda.max_memory_allocated` minus the allocated bytes at the start. CPU: the glibc
    heap in use, read after every aten op, minus its level at the start. Raises RuntimeError on a
    CPU without `mallinfo2` (check `cpu_peak_supported()` first)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - start)
    if not cpu_peak_supported():
        raise RuntimeError("CPU peak memory needs glibc's mallinfo2 (Linux)")
    start = heap_in_use()
    with _PeakHeap() as mode:
        fn()
    return int(mode.peak - start)
