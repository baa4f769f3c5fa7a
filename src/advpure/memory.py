"""Peak memory of a function, on CUDA (the caching allocator's counters) and on CPU.

PyTorch has no CPU peak-memory counter. On Linux/glibc we read the heap's in-use bytes
(`mallinfo2`: small blocks + mmapped large blocks) after every aten op, via a dispatch mode, and
keep the maximum. That counts tensors, saved activations and temporaries alike, which is what
"memory grows with T" is about; it ignores nothing the process really holds on the heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
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
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        lib.mallinfo2.restype = _MallInfo2
        return lib
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def heap_in_use() -> int:
    """Bytes in use on the C heap (glibc), or -1 where unavailable."""
    if _LIBC is None:
        return -1
    info = _LIBC.mallinfo2()
    return int(info.uordblks + info.hblkhd)


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
    return heap_in_use() >= 0


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes above the starting level while running `fn()` (allocations it made)."""
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
