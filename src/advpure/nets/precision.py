"""Numeric precision of one net call, as a context: `Precision("fp32")` or `Precision("bf16")`.

Purification needs its own precision, independent of the classifier's autocast: ADP's secant
step-size probe compares f(x) with f(x + delta f(x)), which differ by ~delta/sigma (~4e-3 relative),
below bf16's resolution (8 bits of mantissa) and close to TF32's (10 bits). Within
`Precision("fp32")` autocast is off and, on CUDA, cuDNN convolutions and matmuls (attention layers)
run in full fp32 (no TF32); `Precision("bf16")` runs the block under bf16 autocast (valid with
ADP's jvp probe, which takes no difference of nearly equal evaluations).

Entered around each call of a net by `advpure.purify.defense.NetFn` (so the recomputation of a
checkpointed step in the backward pass runs at the same precision as the forward), and restored on
exit; it changes nothing outside the block.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16")


class Precision:
    """Context manager for the precision of the net calls inside it (see the module docstring).

    mode: "fp32" (autocast off, no TF32 on CUDA) or "bf16" (bf16 autocast); device: where the net
    runs (its type picks the autocast device). Raises ValueError for another mode."""

    def __init__(self, mode: str, device: torch.device | str):
        if mode not in PRECISIONS:
            raise ValueError(f"unknown precision '{mode}'; allowed: {', '.join(PRECISIONS)}")
        self.mode, self.device = mode, torch.device(device)
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> Precision:
        stack = contextlib.ExitStack()
        kind = self.device.type
        if self.mode == "bf16":
            stack.enter_context(torch.autocast(device_type=kind, dtype=torch.bfloat16))
        else:
            stack.enter_context(torch.autocast(device_type=kind, enabled=False))
            if kind == "cuda":
                stack.enter_context(_flag(torch.backends.cudnn, "allow_tf32", False))
                stack.enter_context(_flag(torch.backends.cuda.matmul, "allow_tf32", False))
        self._stack = stack
        return self

    def __exit__(self, *exc) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()


@contextlib.contextmanager
def _flag(owner, name: str, value):
    """`owner.name = value` within the block (torch's TF32 switches), restored after."""
    before = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, before)


__all__ = ["PRECISIONS", "Precision"]
