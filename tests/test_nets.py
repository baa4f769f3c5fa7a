"""Classifiers and the NCSNv2 score network: shapes, sizes, normalization, InstanceNorm++, errors, gradients."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advpure.core.errors import ConfigError
from advpure.nets import (
    InstanceNormPlusPlus2d,
    NCSNv2,
    Normalize,
    ResNet18,
    SmallCNN,
    WideResNet,
    build_classifier,
    build_score_net,
    count_parameters,
)
from advpure.nets.ncsnv2 import max_pool_5x5

META = torch.device("meta")


def _cl(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


# --- classifiers --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arch,channels,size,classes",
    [("small_cnn", 1, 28, 10), ("wrn28_10", 3, 32, 10), ("resnet18", 3, 32, 100)],
)
def test_classifier_output_shape_and_channels_last(arch, channels, size, classes):
    torch.manual_seed(0)
    if arch == "wrn28_10":  # a narrow WRN of the same code keeps the test fast
        model = nn.Sequential(
            Normalize([0.5] * channels, [0.25] * channels),
            WideResNet(depth=10, widen=2, dropout=0.3, num_classes=classes, in_channels=channels),
        )
    else:
        model = build_classifier(
            arch,
            in_channels=channels,
            image_size=size,
            num_classes=classes,
            mean=[0.5] * channels,
            std=[0.25] * channels,
        )
    model.eval()
    x = torch.rand(2, channels, size, size)
    out = model(x)
    assert out.shape == (2, classes)
    assert torch.isfinite(out).all()
    out_cl = model(_cl(x))
    assert out_cl.shape == (2, classes)
    torch.testing.assert_close(out_cl, out, rtol=1e-4, atol=1e-4)


def test_build_classifier_structure():
    m = build_classifier(
        "wrn28_10",
        in_channels=3,
        image_size=32,
        num_classes=10,
        mean=[0.1, 0.2, 0.3],
        std=[0.4, 0.5, 0.6],
        dropout=0.3,
    )
    assert isinstance(m.normalize, Normalize) and isinstance(m.net, WideResNet)
    assert any(isinstance(x, nn.Dropout) and x.p == 0.3 for x in m.net.modules())
    assert set(m.state_dict()) >= {"normalize.mean", "normalize.std"}
    assert isinstance(
        build_classifier(
            "resnet18", in_channels=3, image_size=32, num_classes=10, mean=[0] * 3, std=[1] * 3
        ).net,
        ResNet18,
    )


def test_parameter_counts_classifiers():
    with META:
        wrn = WideResNet(28, 10, num_classes=10, in_channels=3)
        r18 = ResNet18(num_classes=10, in_channels=3)
        cnn = SmallCNN(in_channels=1, num_classes=10)
    assert abs(count_parameters(wrn) - 36.48e6) <= 0.01 * 36.48e6
    assert abs(count_parameters(r18) - 11.17e6) <= 0.01 * 11.17e6
    by_hand = (32 * 1 * 25 + 32) + (64 * 32 * 25 + 64) + (3136 * 1024 + 1024) + (1024 * 10 + 10)
    assert count_parameters(cnn) == by_hand == 3_274_634
    # the built classifier adds only buffers (mean/std), no parameters
    built = build_classifier("small_cnn", in_channels=1, image_size=28, num_classes=10, mean=[0.5], std=[0.5])
    assert count_parameters(built) == by_hand


def test_normalize_inside_classifier():
    torch.manual_seed(1)
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    model = build_classifier(
        "resnet18", in_channels=3, image_size=32, num_classes=10, mean=mean, std=std
    ).eval()
    x = torch.rand(2, 3, 32, 32)
    m = torch.tensor(mean).reshape(1, 3, 1, 1)
    s = torch.tensor(std).reshape(1, 3, 1, 1)
    torch.testing.assert_close(model(x), model.net((x - m) / s), rtol=1e-5, atol=1e-5)
    # and it is not the identity: skipping the normalization changes the logits
    assert not torch.allclose(model(x), model.net(x), atol=1e-3)
    torch.testing.assert_close(Normalize(mean, std)(_cl(x)), (x - m) / s)


@pytest.mark.parametrize(
    "arch,size,expect",
    [("small_cnn", 32, "28"), ("wrn28_10", 28, "32"), ("resnet18", 28, "32")],
)
def test_classifier_wrong_size(arch, size, expect):
    with pytest.raises(ConfigError, match=f"{arch}.*{expect}x{expect}") as e:
        build_classifier(arch, in_channels=1, image_size=size, num_classes=10, mean=[0.5], std=[0.5])
    assert "\n" not in str(e.value)


def test_classifier_unknown_arch_and_bad_stats():
    with pytest.raises(ConfigError, match="small_cnn, wrn28_10, resnet18"):
        build_classifier("vgg16", in_channels=3, image_size=32, num_classes=10, mean=[0.5] * 3, std=[0.5] * 3)
    with pytest.raises(ConfigError, match="in_channels=3"):
        build_classifier("resnet18", in_channels=3, image_size=32, num_classes=10, mean=[0.5], std=[0.5])
    with pytest.raises(ConfigError, match="std"):
        Normalize([0.5], [0.0])


# --- InstanceNorm++ -----------------------------------------------------------------------------
def _set_norm(norm: InstanceNormPlusPlus2d, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    c = norm.channels
    with torch.no_grad():
        norm.gamma.copy_(torch.randn(c, generator=g) * 2)
        norm.alpha.copy_(torch.randn(c, generator=g))
        norm.beta.copy_(torch.randn(c, generator=g))


def test_instance_norm_plus_plus_statistics():
    torch.manual_seed(0)
    c, eps = 6, 1e-5
    norm = InstanceNormPlusPlus2d(c)
    assert list(dict(norm.named_parameters())) == ["alpha", "gamma", "beta"]  # the reference's order
    _set_norm(norm)
    # channels with different means and scales
    x = (
        torch.randn(3, c, 16, 16, dtype=torch.float64) * torch.rand(1, c, 1, 1) * 3
        + torch.randn(3, c, 1, 1) * 5
    )
    norm = norm.double()
    y = norm(x)
    mu = x.mean((2, 3))
    m = mu.mean(1, keepdim=True)
    v = mu.var(1, keepdim=True)  # unbiased (C - 1), as the reference's torch.var
    shift = (mu - m) / torch.sqrt(v + eps)
    # the reference code: gamma * (IN(x) + alpha * shift) + beta (gamma scales the alpha term too)
    expected_mean = norm.beta + norm.gamma * norm.alpha * shift
    torch.testing.assert_close(y.mean((2, 3)), expected_mean)
    # per-channel std is |gamma| (up to the eps in the denominator)
    var = x.var((2, 3), correction=0)
    std = y.std((2, 3), correction=0)
    torch.testing.assert_close(std, norm.gamma.abs() * torch.sqrt(var / (var + eps)))
    torch.testing.assert_close(std, norm.gamma.abs().expand(3, c), rtol=5e-3, atol=0)
    # it differs from plain (affine) instance norm exactly by the re-injected means
    plain = F.instance_norm(x, weight=norm.gamma, bias=norm.beta, eps=eps)
    torch.testing.assert_close(y - plain, (norm.gamma * norm.alpha * shift)[:, :, None, None].expand_as(y))
    # the population variance (the NCSN paper's v) would give another result: the test can tell them apart
    v0 = mu.var(1, keepdim=True, correction=0)
    assert not torch.allclose(
        y - plain, (norm.gamma * norm.alpha * (mu - m) / torch.sqrt(v0 + eps))[:, :, None, None]
    )
    # channels-last input, same result
    torch.testing.assert_close(norm(_cl(x)), y)


def test_instance_norm_plus_plus_no_bias_and_single_channel():
    norm = InstanceNormPlusPlus2d(4, bias=False)
    assert norm.beta is None and count_parameters(norm) == 8
    y = InstanceNormPlusPlus2d(1)(torch.randn(2, 1, 5, 5))
    assert torch.isfinite(y).all()  # var over one channel mean is 0: the shift term is 0, not NaN


def test_max_pool_5x5_matches_torch():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 9)
    x[0, 0, 3, 4] = 5.0
    torch.testing.assert_close(max_pool_5x5(x), F.max_pool2d(x, 5, stride=1, padding=2), rtol=0, atol=0)
    torch.testing.assert_close(max_pool_5x5(_cl(x)), F.max_pool2d(x, 5, stride=1, padding=2), rtol=0, atol=0)


# --- NCSNv2 score network ------------------------------------------------------------------------
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_score_net_shape_channels_last(channels, size):
    torch.manual_seed(0)
    net = build_score_net("ncsnv2", in_channels=channels, image_size=size, ngf=8).eval()
    x = torch.rand(2, channels, size, size)
    with torch.no_grad():
        out = net(x)
        out_cl = net(_cl(x))
    assert out.shape == x.shape and out_cl.shape == x.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out_cl, out, rtol=1e-4, atol=1e-5)
    # outputs of different samples differ (the net is not a constant map)
    assert not torch.allclose(out[0], out[1])


def test_score_net_maps_input_to_minus_one_one():
    net = NCSNv2(1, 4, 28)
    seen = {}
    net.begin_conv.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    x = torch.rand(2, 1, 28, 28)
    net(x)
    torch.testing.assert_close(seen["x"], 2 * x - 1)


def test_score_net_parameter_counts():
    with META:
        big = build_score_net("ncsnv2", in_channels=3, image_size=32, ngf=128)
    # the reference NCSNv2 with the CIFAR-10 config (ngf 128, 3 channels), without its sigmas buffer
    n = count_parameters(big)
    assert n == 29_694_083
    assert len(list(big.parameters())) == len(big.state_dict()) == 153  # no buffers
    small = NCSNv2(1, 16, 28)
    assert count_parameters(small) == 240_177  # the 28x28 layout (a departure), unchanged
    # channel width scales the net: ngf=16 on 32x32 is far smaller than ngf=128
    with META:
        assert count_parameters(NCSNv2(3, 16, 32)) < n / 50


# key -> shape facts of the published NCSNv2 CIFAR-10 state dict (ermongroup/ncsnv2, ngf 128, after
# DataParallel's "module." is removed); the characteristic ones: the normalizer's name, ConvMeanPool's
# ".conv", the dilated 3x3 shortcuts (with bias) of the first blocks of stages 3 and 4, RCU names
OFFICIAL_KEYS = {
    "begin_conv.weight": (128, 3, 3, 3),
    "normalizer.alpha": (128,),
    "normalizer.gamma": (128,),
    "normalizer.beta": (128,),
    "end_conv.weight": (3, 128, 3, 3),
    "res1.1.normalize1.alpha": (128,),
    "res2.0.conv1.weight": (128, 128, 3, 3),
    "res2.0.normalize2.gamma": (128,),
    "res2.0.conv2.conv.weight": (256, 128, 3, 3),
    "res2.0.shortcut.conv.weight": (256, 128, 1, 1),
    "res2.0.shortcut.conv.bias": (256,),
    "res3.0.shortcut.weight": (256, 256, 3, 3),
    "res3.0.shortcut.bias": (256,),
    "res4.0.shortcut.weight": (256, 256, 3, 3),
    "res4.0.shortcut.bias": (256,),
    "res4.1.conv2.weight": (256, 256, 3, 3),
    "refine1.adapt_convs.0.2_2_conv.weight": (256, 256, 3, 3),
    "refine1.output_convs.1_2_conv.weight": (256, 256, 3, 3),
    "refine1.crp.convs.1.weight": (256, 256, 3, 3),
    "refine2.msf.convs.1.bias": (256,),
    "refine3.msf.convs.0.weight": (128, 256, 3, 3),
    "refine4.adapt_convs.1.2_2_conv.weight": (128, 128, 3, 3),
    "refine4.output_convs.3_2_conv.weight": (128, 128, 3, 3),
}
ABSENT_KEYS = ("refine1.msf.convs.0.weight", "res1.0.shortcut.weight", "res3.1.shortcut.weight", "norm.alpha")


def test_score_net_32_has_the_official_state_dict_layout():
    from helpers.reference_nets import ncsnv2_shapes

    for ngf, channels in ((128, 3), (8, 3), (4, 1)):
        with META:
            sd = NCSNv2(channels, ngf, 32).state_dict()
        got = [(k, tuple(v.shape)) for k, v in sd.items()]
        assert got == list(ncsnv2_shapes(ngf, channels).items())  # names, shapes and order
        if ngf == 128:
            assert {k: v for k, v in got if k in OFFICIAL_KEYS} == OFFICIAL_KEYS
            assert not set(ABSENT_KEYS) & set(sd)
            rcu_crp = [k for k in sd if re.search(r"\.\d+_\d+_conv\.|\.crp\.", k)]
            assert rcu_crp and not any(k.endswith("bias") for k in rcu_crp)  # RCU and CRP convs: no bias


def test_score_net_32_block_outputs_follow_the_official_stages():
    c = 4
    net = NCSNv2(3, c, 32)
    shapes = {}

    def record(name):
        def hook(mod, args, out):
            shapes[name] = tuple(out.shape[1:])

        return hook

    for name, mod in net.named_modules():
        if (name.startswith("res") and name.count(".") == 1) or (
            name.startswith("refine") and "." not in name
        ):
            mod.register_forward_hook(record(name))
    net(torch.rand(2, 3, 32, 32))
    full, half = (32, 32), (16, 16)  # only res2 downsamples; the dilated stages 3 and 4 keep 16x16
    assert shapes == {
        "res1.0": (c, *full),
        "res1.1": (c, *full),
        "res2.0": (2 * c, *half),
        "res2.1": (2 * c, *half),
        "res3.0": (2 * c, *half),
        "res3.1": (2 * c, *half),
        "res4.0": (2 * c, *half),
        "res4.1": (2 * c, *half),
        "refine1": (2 * c, *half),
        "refine2": (2 * c, *half),
        "refine3": (c, *half),
        "refine4": (c, *full),
    }


@pytest.mark.parametrize("channels", [3, 1])
def test_score_net_32_forward_and_gradient_equal_the_reference(channels):
    from helpers.reference_nets import ncsnv2_forward, ncsnv2_shapes, random_state

    sd = random_state(ncsnv2_shapes(8, channels), seed=7, dtype=torch.float64)
    net = NCSNv2(channels, 8, 32).double()
    net.load_state_dict(sd)
    x = torch.rand(2, channels, 32, 32, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, channels, 32, 32, dtype=torch.float64)
    ref = ncsnv2_forward(sd, x)
    out = net(x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), x)
    (g,) = torch.autograd.grad((out * w).sum(), x)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("size,stage_sizes", [(28, [28, 14, 7, 7]), (32, [32, 16, 16, 16])])
def test_score_net_stages_dilation_and_resolution(size, stage_sizes):
    net = NCSNv2(1, 4, size)

    def dilations(stage: nn.Module) -> set[int]:
        return {
            m.dilation[0] for m in stage.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
        }

    assert dilations(net.res1) == {1}
    assert dilations(net.res2) == {1}
    assert dilations(net.res3) == {2}
    assert dilations(net.res4) == {4}
    for stage in (net.res3, net.res4):  # padding = dilation keeps the size
        convs3 = [m for m in stage.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
        assert convs3 and all(m.padding[0] == m.dilation[0] for m in convs3)
    sizes = {}

    def record(name):
        def hook(mod, args, out):
            sizes[name] = tuple(out.shape)

        return hook

    for name in ("res1", "res2", "res3", "res4"):
        getattr(net, name).register_forward_hook(record(name))
    net(torch.rand(1, 1, size, size))
    assert [sizes[k][-1] for k in ("res1", "res2", "res3", "res4")] == stage_sizes
    assert [sizes[k][1] for k in ("res1", "res2", "res3", "res4")] == [4, 8, 8, 8]


@pytest.mark.parametrize("size", [16, 27, 64])
def test_score_net_bad_size(size):
    with pytest.raises(ConfigError, match=r"28.*32") as e:
        NCSNv2(1, 8, size)
    assert str(size) in str(e.value) and "\n" not in str(e.value)


def test_score_net_unknown_arch():
    with pytest.raises(ConfigError, match="ncsnv2"):
        build_score_net("unet", in_channels=1, image_size=28, ngf=8)
    with pytest.raises(ConfigError, match="ngf"):
        build_score_net("ncsnv2", in_channels=1, image_size=28, ngf=0)


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_score_net_input_gradient(channels, size):
    torch.manual_seed(0)
    net = NCSNv2(channels, 4, size)
    x = torch.rand(2, channels, size, size, requires_grad=True)
    w = torch.randn(2, channels, size, size)
    (net(x) * w).sum().backward()  # also checks the in-place ops are autograd-safe
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert (x.grad.flatten(1).abs().sum(1) > 0).all()  # every sample gets a gradient
    assert all(p.grad is not None for p in net.parameters())


def test_score_net_float64_matches_float32_and_finite_differences():
    torch.manual_seed(0)
    net = NCSNv2(1, 4, 28)
    net64 = copy.deepcopy(net).double()
    x64 = torch.rand(1, 1, 28, 28, dtype=torch.float64, requires_grad=True)
    out = net64(x64)
    assert out.dtype == torch.float64 and all(p.dtype == torch.float64 for p in net64.parameters())
    with torch.no_grad():
        torch.testing.assert_close(out.float(), net(x64.float()), rtol=1e-4, atol=1e-4)
    # autograd matches a central finite difference along a random direction (float64)
    w = torch.randn(1, 1, 28, 28, dtype=torch.float64)
    (g,) = torch.autograd.grad((net64(x64) * w).sum(), x64)
    v = torch.randn_like(x64)
    h = 1e-6
    with torch.no_grad():
        fd = ((net64(x64 + h * v) * w).sum() - (net64(x64 - h * v) * w).sum()) / (2 * h)
    torch.testing.assert_close((g * v).sum(), fd, rtol=1e-5, atol=1e-7)
