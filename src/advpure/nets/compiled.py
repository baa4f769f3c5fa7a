"""`torch.compile` for the score network, as an opt-in (`benchmark.compile=true`).

A compiled net is only used after `warm_up` has (a) paid the compile cost once, timed, for both
graphs the benchmark needs (no-grad purification and input gradients for the full-gradient and
joint attacks) and (b) checked both against the eager net on the same batch. Robust accuracy
computed with wrong gradients would look like robustness, so a mismatch is an error, not a warning.
(It happens: torch 2.13.0's inductor CPU backend returns wrong input gradients for the 28x28 NCSNv2
net unless fusion is disabled; see experiments/perf/README.md.)
"""

from __future__ import annotations

import shutil
import time

import torch
from torch import nn

from advpure.core.errors import CompileError

# relative to the largest |value| of the eager result; fp32 reorderings stay far below this
AGREE_RTOL = 1e-3


def has_cpp_compiler() -> bool:
    """Inductor generates C++ for CPU (and host code for CUDA)."""
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def compile_net(net: nn.Module) -> nn.Module:
    """`torch.compile(net, dynamic=True)`: chunks and last batches have other sizes; one graph for all."""
    if not has_cpp_compiler():
        raise CompileError("benchmark.compile=true needs a C++ compiler (g++ or clang++) for torch.compile")
    return torch.compile(net, dynamic=True)


def eager_of(net: nn.Module) -> nn.Module:
    return getattr(net, "_orig_mod", net)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _value_and_input_grad(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        y = net(x)
    with torch.enable_grad():  # callers may run under no_grad (Lightning's test loop)
        xr = x.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(net(xr).square().sum(), xr)
    return y, g


def check_agrees(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float = AGREE_RTOL) -> None:
    diff = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    if not diff <= rtol * max(scale, 1e-12):  # `not <=` also catches NaN
        raise CompileError(
            f"torch.compile'd score net disagrees with eager on {name}: max |diff| {diff:.3g} vs scale {scale:.3g} "
            "(a compiler bug on this machine); run without benchmark.compile"
        )


def warm_up(net: nn.Module, x: torch.Tensor) -> float:
    """Run the compiled `net` once per graph on `x`, check it against its eager module, return the
    seconds the first calls took (compile time plus one evaluation)."""
    eager = eager_of(net)
    if eager is net:
        raise ValueError("warm_up expects a torch.compile'd module")
    _sync(x.device)
    t0 = time.perf_counter()
    y, g = _value_and_input_grad(net, x)
    _sync(x.device)
    seconds = time.perf_counter() - t0
    y_ref, g_ref = _value_and_input_grad(eager, x)
    check_agrees("the score", y, y_ref)
    check_agrees("the input gradient", g, g_ref)
    return seconds
