"""kernels.affine_before_conv / affine_before_matmul against a direct convolution and matmul."""

import numpy as np
import pytest

from helpers import conv2d_ref, conv_params_ref
from onnxrep.kernels import ConvParams, Decline, affine_before_conv, affine_before_matmul

rng = np.random.default_rng(7)


def _params(cout, cin, k, group=1, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1)):
    return ConvParams(weight=rng.standard_normal((cout, cin // group, k, k)), bias=rng.standard_normal(cout),
                      strides=strides, pads=pads, dilations=dilations, group=group)


@pytest.mark.parametrize("p", [
    _params(6, 4, 1),
    _params(6, 4, 3, strides=(2, 1)),
    _params(6, 4, 3, group=2, dilations=(2, 1)),
    _params(4, 4, 5, group=4),  # depthwise
    _params(8, 6, 3, group=2, strides=(2, 2)),
], ids=["1x1", "3x3s2", "grouped-dilated", "depthwise", "grouped-s2"])
def test_affine_before_unpadded_conv_is_exact(p):
    x = rng.standard_normal((2, p.in_channels, 9, 8))
    scale, shift = rng.uniform(0.2, 2.0, p.in_channels), rng.standard_normal(p.in_channels)
    want = conv_params_ref(x * scale[None, :, None, None] + shift[None, :, None, None], p)
    got = conv_params_ref(x, affine_before_conv(p, scale, shift))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_scale_before_padded_conv_is_exact():
    p = _params(6, 4, 3, pads=(1, 1, 1, 1), group=2)
    x = rng.standard_normal((1, 4, 7, 7))
    scale = rng.uniform(-2.0, 2.0, 4)
    want = conv_params_ref(x * scale[None, :, None, None], p)
    got = conv_params_ref(x, affine_before_conv(p, scale, np.zeros(4)))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_shift_before_padded_conv_declines():
    p = _params(6, 4, 3, pads=(1, 1, 1, 1))
    with pytest.raises(Decline, match="border"):
        affine_before_conv(p, np.ones(4), np.full(4, 0.5))
    # and the decline is right: the naive fold is wrong on the border only
    x = rng.standard_normal((1, 4, 6, 6))
    naive = replace_pads(affine_before_conv(replace_pads(p, (0, 0, 0, 0)), np.ones(4), np.full(4, 0.5)), p.pads)
    diff = np.abs(conv_params_ref(x, naive) - conv_params_ref(x + 0.5, p))[0]
    assert diff[:, 1:-1, 1:-1].max() < 1e-12 and diff.max() > 1e-3


def replace_pads(p, pads):
    from dataclasses import replace
    return replace(p, pads=pads)


@pytest.mark.parametrize("with_bias", [True, False])
def test_affine_before_matmul_is_exact(with_bias):
    w = rng.standard_normal((5, 3))
    bias = rng.standard_normal(3) if with_bias else None
    scale, shift = rng.uniform(0.2, 2.0, 5), rng.standard_normal(5)
    x = rng.standard_normal((4, 5))
    want = (x * scale + shift) @ w + (0 if bias is None else bias)
    w2, b2 = affine_before_matmul(w, bias, scale, shift)
    np.testing.assert_allclose(x @ w2 + b2, want, rtol=1e-12, atol=1e-12)


def test_reference_conv_sanity():
    # the direct reference itself: a 1x1 identity conv returns its input
    x = rng.standard_normal((1, 3, 4, 4))
    np.testing.assert_allclose(conv2d_ref(x, np.eye(3).reshape(3, 3, 1, 1)), x)
