"""DiffPure's 224 -> 256 -> 224 bilinear resizing around a purifier (advpure.purify.resize)."""

from __future__ import annotations

import pytest
import torch

from advpure.purify.base import PurifyResult
from advpure.purify.resize import purify_resized, resize_images


def test_identity_when_the_sizes_match():
    x = torch.rand(2, 3, 32, 32)
    assert resize_images(x, 32) is x and resize_images(x, (32, 32)) is x
    seen = []

    def purify(z):
        seen.append(z)
        return z * 2

    assert torch.equal(purify_resized(purify, x, None), x * 2) and seen[-1] is x
    assert torch.equal(purify_resized(purify, x, 32), x * 2) and seen[-1] is x


def test_bilinear_half_pixel_weights_by_hand():
    # align_corners=False: output pixel d samples input coordinate (d + 0.5) * in / out - 0.5,
    # clamped at the borders: a row [0, 1] upsampled to 4 is [0, 0.25, 0.75, 1]
    x = torch.tensor([[0.0, 1.0], [0.0, 1.0]]).view(1, 1, 2, 2)
    want = torch.tensor([0.0, 0.25, 0.75, 1.0]).expand(4, 4)
    torch.testing.assert_close(resize_images(x, 4)[0, 0], want)
    # down by two: every output pixel is the mean of a 2x2 input block (coordinate 2d + 0.5)
    y = torch.arange(16.0).view(1, 1, 4, 4)
    torch.testing.assert_close(resize_images(y, 2)[0, 0], torch.tensor([[2.5, 4.5], [10.5, 12.5]]))


def test_shapes_and_result_fields_224_256_224():
    x = torch.rand(2, 3, 224, 224)
    draws = 3

    def purify(z):
        assert z.shape == (2, 3, 256, 256)
        rows = z.repeat(draws, 1, 1, 1)
        n = torch.full((rows.shape[0],), 100, dtype=torch.long)
        return PurifyResult(x=rows.clamp(0.1, 0.9), steps=n, score_evals=n + 1)

    out = purify_resized(purify, x, 256)
    assert isinstance(out, PurifyResult) and out.x.shape == (6, 3, 224, 224)
    assert out.steps.tolist() == [100] * 6 and out.score_evals.tolist() == [101] * 6
    # a constant image survives both resizes; the affine map to diffusion space commutes with them
    c = torch.full((1, 3, 224, 224), 0.3)
    torch.testing.assert_close(purify_resized(lambda z: z, c, 256), c)
    z = torch.rand(1, 3, 224, 224, dtype=torch.float64)
    torch.testing.assert_close(resize_images(2 * z - 1, 256), 2 * resize_images(z, 256) - 1)
    with pytest.raises(ValueError, match="positive int"):
        resize_images(x, 0)
    with pytest.raises(ValueError, match="expected images"):
        resize_images(x[0], 256)


def test_differentiable_exact_gradient():
    w = torch.rand(1, 2, 8, 8, dtype=torch.float64)

    def purify(z):  # a nonlinear purifier at the net's size
        return torch.tanh(z * w) + z**2

    x = torch.rand(2, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: purify_resized(purify, v, 8), (x,))
    g = torch.autograd.grad(purify_resized(purify, x, 8).sum(), x)[0]
    assert g.shape == x.shape and g.abs().sum() > 0
