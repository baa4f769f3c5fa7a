"""advpure.perf.peak: FLOP counting (torch.utils.flop_counter's formulas), the conv mix, rates."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from advpure.nets import build_score_net
from advpure.perf.peak import Peaks, Rate, conv_calls, count_flops, rate
from advpure.perf.report import Report


def test_count_flops_matmul_and_conv_forward_backward():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert count_flops(lambda: a @ b)[0] == 2 * 8 * 16 * 4
    x, w = torch.randn(2, 3, 8, 8, requires_grad=True), torch.randn(5, 3, 3, 3)
    fwd = count_flops(lambda: F.conv2d(x, w, padding=1))[0]
    assert fwd == 2 * 2 * 5 * 8 * 8 * 3 * 9

    def with_grad():  # autograd.grad w.r.t. a leaf: what FlopCounterMode's module tracker breaks
        return torch.autograd.grad(F.conv2d(x, w, padding=1).sum(), x)[0]

    total, g = count_flops(with_grad)
    assert g.shape == x.shape and total == 2 * fwd  # + the input-gradient convolution only


def test_conv_calls_of_ncsnv2_and_rates():
    torch.manual_seed(0)
    net = build_score_net("ncsnv2", in_channels=1, image_size=28, ngf=4).eval().requires_grad_(False)
    x = torch.rand(2, 1, 28, 28)
    calls = conv_calls(net, x)
    n_modules = sum(isinstance(m, torch.nn.Conv2d) for m in net.modules())
    assert sum(calls.values()) == n_modules  # every conv runs once per forward here
    assert 1 < len(calls) < n_modules  # some shapes repeat
    assert all(c.channels_last for c in calls)  # the net runs channels-last
    peaks = Peaks(torch.device("cpu"), repeats=1, matmul_n=64)
    r = rate(peaks, 2e9, 1.0, "fp32", (net, x, "tiny"))
    assert isinstance(r, Rate) and r.gflops == 2.0
    assert r.pct_matmul == 100 * 2.0 / peaks.matmul["fp32"] and r.pct_conv > 0
    assert "GFLOP/s" in r.text() and "conv peak" in r.text()
    rep = Report()
    rep.add("x.y", 1.5, "x", rate=r)
    assert rep.figures["x.y"]["rate"]["gflops"] == 2.0 and "%conv" in rep.table()
