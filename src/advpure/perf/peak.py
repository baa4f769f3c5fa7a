"""The machine's own peak for the op mix, measured in the same run, and achieved FLOP/s against it.

Every timed figure of the suite can carry a rate: FLOPs counted with `torch.utils.flop_counter`'s
formulas (`FlopCount`: 2 per multiply-accumulate of matmuls and convolutions,
forward and backward; elementwise ops count 0) of the measured call, divided by its median time,
in GFLOP/s (1e9 FLOP per second), and two percentages:

  % of matmul peak   the best of repeats of a dense (n x n) @ (n x n) matmul in that dtype
                     (2 n^3 FLOP; n = 2048 on CPU, 8192 on CUDA): the arithmetic roof.
  % of conv peak     the net's own convolutions, each distinct one (input shape, weight shape,
                     stride, padding, dilation, groups, memory format) timed alone at its batch
                     shape, best of repeats; the peak is sum_i n_i FLOP_i / sum_i n_i t_i over the
                     n_i calls of each in one forward: what the conv library reaches on exactly
                     these shapes (fp32 without TF32 on CUDA, as purification runs). The gap between it and the net's forward is everything else
                     (normalisation, ELU, pooling, copies, Python).

Both are measured per dtype (fp32; bf16 under `torch.autocast`). The conv peak is that of the
forward; gradient figures (attacks, training) are rated against it too (their backward
convolutions are other kernels: a % above 100 is possible there, it is a reference, not a bound).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from advpure.nets.precision import Precision
from advpure.perf.flopcount import FlopCount, count_flops  # noqa: F401 (re-exported)
from advpure.perf.timing import timed

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def autocast(device: torch.device, dtype: str):
    """torch.autocast in `dtype` ("bf16"), or a null context for "fp32"."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def best_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """The fastest of `repeats` timed calls (seconds), after one warm-up call."""
    fn()
    return min(timed(fn, device)[0] for _ in range(max(1, repeats)))


def matmul_gflops(device: torch.device, dtype: str, n: int | None = None, repeats: int = 5) -> float:
    """GFLOP/s of a dense n x n matmul in `dtype` (inputs in that dtype; fp32 without TF32)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=g).to(DTYPES[dtype])
    b = torch.randn(n, n, device=device, generator=g).to(DTYPES[dtype])
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        t = best_time(lambda: torch.mm(a, b), device, repeats)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return 2.0 * n**3 / t / 1e9


@dataclass(frozen=True)
class ConvCall:
    """One distinct conv2d call of a forward: its input shape and layout and the module's settings."""

    shape: tuple[int, ...]
    channels_last: bool
    module: nn.Conv2d = field(compare=False, hash=False)
    key: tuple = ()


def conv_calls(net: nn.Module, x: torch.Tensor) -> dict[ConvCall, int]:
    """The distinct conv2d calls of one forward of `net` on `x` and how often each occurs."""
    calls: dict[ConvCall, int] = {}

    def hook(mod, args):
        inp = args[0]
        cl = inp.dim() == 4 and inp.is_contiguous(memory_format=torch.channels_last)
        key = (
            tuple(inp.shape),
            cl,
            tuple(mod.weight.shape),
            mod.stride,
            mod.padding,
            mod.dilation,
            mod.groups,
            mod.bias is not None,
        )
        c = ConvCall(tuple(inp.shape), cl, mod, key)
        calls[c] = calls.get(c, 0) + 1

    handles = [m.register_forward_pre_hook(hook) for m in net.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in handles:
            h.remove()
    return calls


def conv_peak_gflops(
    net: nn.Module, x: torch.Tensor, dtype: str, repeats: int = 3
) -> tuple[float, list[dict]]:
    """The net's convolutions alone (see the module docstring): (GFLOP/s of the mix, per-conv
    records {shape, weight, calls, gflop, best_s, gflops})."""
    dev = x.device
    total_flop, total_t, recs = 0.0, 0.0, []
    for c, n in conv_calls(net, x).items():
        m = c.module
        fmt = torch.channels_last if c.channels_last else torch.contiguous_format
        inp = torch.rand(c.shape, device=dev).contiguous(memory_format=fmt)

        def one(m=m, inp=inp):
            # fp32 without TF32 on CUDA, as purification runs (`advpure.nets.precision.Precision`)
            with (
                torch.no_grad(),
                autocast(dev, dtype),
                Precision("fp32", dev) if dtype == "fp32" else contextlib.nullcontext(),
            ):
                return F.conv2d(inp, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)

        flop, _ = count_flops(one)
        t = best_time(one, dev, repeats)
        total_flop += n * flop
        total_t += n * t
        recs.append(
            {
                "shape": list(c.shape),
                "weight": list(m.weight.shape),
                "calls": n,
                "gflop": flop / 1e9,
                "best_s": t,
                "gflops": flop / t / 1e9,
            }
        )
    return (total_flop / total_t / 1e9 if total_t > 0 else float("nan")), recs


class Peaks:
    """The peaks of one run: the dense matmul per dtype (measured once) and the conv mix per
    (net, input shape, dtype) (measured when first asked for, then cached)."""

    def __init__(self, device: torch.device, repeats: int = 3, matmul_n: int | None = None):
        self.device, self.repeats, self.matmul_n = device, repeats, matmul_n
        self.matmul: dict[str, float] = {}
        self.conv: dict[tuple, float] = {}
        self.records: dict[str, list[dict]] = {}

    def matmul_peak(self, dtype: str) -> float:
        if dtype not in self.matmul:
            # best of 10: on a shared machine a few repeats can all land in someone else's burst
            self.matmul[dtype] = matmul_gflops(self.device, dtype, self.matmul_n, max(10, self.repeats))
        return self.matmul[dtype]

    def conv_peak(self, net: nn.Module, x: torch.Tensor, dtype: str, label: str) -> float:
        key = (label, tuple(x.shape), dtype)
        if key not in self.conv:
            self.conv[key], recs = conv_peak_gflops(net, x, dtype, self.repeats)
            self.records[f"{label}{list(x.shape)}.{dtype}"] = recs
        return self.conv[key]


@dataclass
class Rate:
    """Achieved GFLOP/s of a figure's measurement and its % of the run's peaks (None: unknown)."""

    gflops: float
    pct_matmul: float | None = None
    pct_conv: float | None = None
    dtype: str = "fp32"

    def text(self) -> str:
        parts = [f"{self.gflops:.3g} GFLOP/s"]
        if self.pct_matmul is not None:
            parts.append(f"{self.pct_matmul:.3g}% of {self.dtype} matmul peak")
        if self.pct_conv is not None:
            parts.append(f"{self.pct_conv:.3g}% of conv peak")
        return ", ".join(parts)

    def as_dict(self) -> dict:
        return {
            "gflops": self.gflops,
            "pct_matmul_peak": self.pct_matmul,
            "pct_conv_peak": self.pct_conv,
            "dtype": self.dtype,
        }


def rate(
    peaks: Peaks | None,
    flops: float,
    seconds: float,
    dtype: str = "fp32",
    conv: tuple[nn.Module, torch.Tensor, str] | None = None,
) -> Rate:
    """Rate of `flops` FLOPs in `seconds` against `peaks` (the matmul peak of `dtype`, and the conv
    mix of `conv` = (net, input, label) when given)."""
    gf = flops / seconds / 1e9 if seconds > 0 else float("nan")
    if peaks is None:
        return Rate(gf, dtype=dtype)
    pm = 100.0 * gf / peaks.matmul_peak(dtype)
    pc = None
    if conv is not None:
        pc = 100.0 * gf / peaks.conv_peak(conv[0], conv[1], dtype, conv[2])
    return Rate(gf, pm, pc, dtype)


__all__ = [
    "DTYPES",
    "ConvCall",
    "FlopCount",
    "Peaks",
    "Rate",
    "autocast",
    "best_time",
    "conv_calls",
    "conv_peak_gflops",
    "count_flops",
    "matmul_gflops",
    "rate",
]
