"""FLOPs of a call by `torch.utils.flop_counter`'s formulas (2 per multiply-accumulate of matmuls and
convolutions, forward and backward; elementwise ops count 0), without its module tracker."""

from __future__ import annotations

from collections.abc import Callable

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry


class FlopCount(TorchDispatchMode):
    """Total FLOPs of the ops run inside, by `torch.utils.flop_counter`'s formulas (those of
    `FlopCounterMode`). `FlopCounterMode` itself cannot be used around the attacks: its module
    tracker's backward hooks make `torch.autograd.grad` w.r.t. a leaf fail ("A leaf node was
    passed to _will_engine_execute_node ..."), so this mode applies the same formulas without it."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


def count_flops(fn: Callable[[], object]) -> tuple[int, object]:
    """(FLOPs of one call of `fn`, its output), by `FlopCount` (torch.utils.flop_counter's formulas)."""
    mode = FlopCount()
    with mode:
        out = fn()
    return mode.total, out


__all__ = ["FlopCount", "count_flops"]
