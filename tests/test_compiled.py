"""The torch.compile gate: a compiled score net is used only after it agreed with the eager one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advpure.core.errors import CompileError
from advpure.nets import build_score_net
from advpure.nets.compiled import AGREE_RTOL, compile_net, has_cpp_compiler, warm_up


class FakeCompiled(nn.Module):
    """Stands in for torch.compile's wrapper (which keeps the eager module as `_orig_mod`)."""

    def __init__(self, net: nn.Module, value_error: float = 0.0, grad_error: float = 0.0):
        super().__init__()
        self._orig_mod = net
        self.value_error, self.grad_error = value_error, grad_error

    def forward(self, x):
        y = self._orig_mod(x) * (1 + self.value_error)
        # adds grad_error * x to the input gradient of sum(y^2)/... without changing the value
        return y + self.grad_error * (x - x.detach())


def tiny_score_net():
    torch.manual_seed(0)
    return build_score_net("ncsnv2", in_channels=1, image_size=28, ngf=4).eval().requires_grad_(False)


def test_warm_up_accepts_an_agreeing_net_and_times_it():
    net = tiny_score_net()
    seconds = warm_up(FakeCompiled(net), torch.rand(2, 1, 28, 28))
    assert seconds > 0


@pytest.mark.parametrize(
    "kind, what", [("value_error", "on the score"), ("grad_error", "on the input gradient")]
)
def test_warm_up_refuses_a_disagreeing_net(kind, what):
    net = tiny_score_net()
    with pytest.raises(CompileError, match=what):
        warm_up(FakeCompiled(net, **{kind: 0.05}), torch.rand(2, 1, 28, 28))


def test_warm_up_needs_a_compiled_module():
    with pytest.raises(ValueError, match="compile"):
        warm_up(tiny_score_net(), torch.rand(2, 1, 28, 28))


@pytest.mark.slow
@pytest.mark.skipif(not has_cpp_compiler(), reason="inductor needs a C++ compiler")
def test_real_compile_is_used_exactly_when_it_agrees_with_eager():
    """On the real compiler the gate's verdict matches an independent comparison. (torch 2.13.0's
    inductor CPU backend gets this net's input gradient wrong; the gate must then refuse.)"""
    net = tiny_score_net()
    compiled = compile_net(net)
    x = torch.rand(4, 1, 28, 28)
    xr = x.clone().requires_grad_(True)
    (g_c,) = torch.autograd.grad(compiled(xr).square().sum(), xr)
    xr = x.clone().requires_grad_(True)
    (g_e,) = torch.autograd.grad(net(xr).square().sum(), xr)
    agrees = (g_c - g_e).abs().max() <= AGREE_RTOL * g_e.abs().max()
    if agrees:
        assert warm_up(compiled, x) > 0
    else:
        with pytest.raises(CompileError, match="input gradient"):
            warm_up(compiled, x)


def test_warm_up_works_under_no_grad():
    with torch.no_grad():
        assert warm_up(FakeCompiled(tiny_score_net()), torch.rand(2, 1, 28, 28)) > 0
