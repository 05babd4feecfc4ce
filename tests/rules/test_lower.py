"""lower_channel_affine_conv: a 1x1 Conv that only scales and shifts each channel -> Mul/Add,
after every other rule (a final rule)."""

import numpy as np
import pytest

import onnxrep
from helpers import GraphBuilder, assert_equal_per_channel, assert_same_outputs, ops

RULE = ["lower_channel_affine_conv"]


def dw1x1(shape=(1, 6, 7, 5), bias=True, weight=None, **conv):
    b = GraphBuilder(list(shape))
    c = shape[1]
    n = len(shape) - 2
    w = b.rand(c, 1, *(1,) * n) if weight is None else weight
    inputs = [b.node("Relu", [b.x]), b.const(w, "w")] + ([b.const(b.rand(c), "b")] if bias else [])
    y = b.node("Conv", inputs, kernel_shape=[1] * n, group=c, **conv)
    return b.build(b.node("Relu", [y]))


@pytest.mark.parametrize("shape", [(1, 6, 9), (2, 6, 7, 5), (1, 6, 3, 4, 5)])
def test_depthwise_1x1_becomes_mul_and_add(shape):
    model = dw1x1(shape)
    out, report = onnxrep.optimize(model, only=RULE)
    assert ops(out) == {"Relu": 2, "Mul": 1, "Add": 1}
    assert [r.rule for r in report.rewrites] == RULE
    assert_same_outputs(model, out, batch=shape[0])


def test_no_bias_is_a_mul_and_unit_weights_an_add():
    out, _ = onnxrep.optimize(dw1x1(bias=False), only=RULE)
    assert ops(out) == {"Relu": 2, "Mul": 1}
    model = dw1x1(weight=np.ones((6, 1, 1, 1), np.float32))
    out, _ = onnxrep.optimize(model, only=RULE)
    assert ops(out) == {"Relu": 2, "Add": 1}
    assert_same_outputs(model, out)


def test_a_dense_diagonal_1x1_conv_is_lowered_too():
    b = GraphBuilder([1, 4, 5, 5])
    w = np.diag(b.rand(4)).reshape(4, 4, 1, 1).astype(np.float32)
    model = b.build(b.conv(b.node("Relu", [b.x]), 4, 4, k=1, weight=w))
    out, _ = onnxrep.optimize(model, only=RULE)
    assert ops(out) == {"Relu": 1, "Mul": 1, "Add": 1}
    assert_same_outputs(model, out)


def test_float16_keeps_its_dtype():
    b = GraphBuilder([1, 6, 5, 5], dtype=np.float16)
    y = b.node("Conv", [b.x, b.const(b.rand(6, 1, 1, 1)), b.const(b.rand(6))], kernel_shape=[1, 1], group=6)
    model = b.build(y)
    out, _ = onnxrep.optimize(model, only=RULE)
    assert ops(out) == {"Mul": 1, "Add": 1}
    assert {i.data_type for i in out.graph.initializer} == {10}  # FLOAT16
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 6, 5, 5)).astype(np.float16)}
    assert_equal_per_channel(model, out, feeds, rtol=1e-2)


@pytest.mark.parametrize("conv", [dict(strides=[2, 2]), dict(pads=[1, 1, 1, 1])])
def test_strided_or_padded_1x1_stays(conv):
    model = dw1x1(**conv)
    out, _ = onnxrep.optimize(model, only=RULE)
    assert ops(out) == ops(model)


def test_convs_that_mix_pixels_or_channels_stay():
    b = GraphBuilder([1, 4, 6, 6])
    x = b.node("Relu", [b.x])
    y = b.add(b.conv(x, 4, 4, k=3, group=4), b.conv(x, 4, 4, k=1))  # depthwise 3x3, dense 1x1
    model = b.build(y)
    out, _ = onnxrep.optimize(model, only=RULE)
    assert ops(out) == ops(model)


def test_riformer_mixer_ends_as_mul_add_with_every_rule():
    """RIFormer's token mixer after the norm's affine: ls * (dw1x1(t) - t), t = n * g + b; the
    branch algebra and the affine folds make it one depthwise 1x1 conv, lowered last."""
    b = GraphBuilder([1, 6, 8, 8])
    n = b.node("InstanceNormalization", [b.x, b.const(np.ones(6, np.float32)), b.const(np.zeros(6, np.float32))])
    t = b.node("Add", [b.node("Mul", [n, b.const(b.rand(6, 1, 1))]), b.const(b.rand(6, 1, 1))])
    mixed = b.node("Sub", [b.conv(t, 6, 6, k=1, group=6), t])
    y = b.node("Add", [b.x, b.node("Mul", [mixed, b.const(b.rand(6, 1, 1))])])
    model = b.build(y)
    out, report = onnxrep.optimize(model)
    assert ops(out) == {"InstanceNormalization": 1, "Mul": 1, "Add": 2}
    assert report.rewrites[-1].rule == "lower_channel_affine_conv"
    assert_same_outputs(model, out)


def test_nothing_folds_the_lowered_affine_back():
    # without the rules that compose convs, the dw 1x1 before an unpadded conv is left to the
    # final rule; the affine folds must not run after it (they would undo it: a loop)
    b = GraphBuilder([1, 4, 6, 6])
    x = b.node("Relu", [b.x])
    model = b.build(b.conv(b.conv(x, 4, 4, k=1, group=4), 4, 5, k=3, pad=0))
    out, report = onnxrep.optimize(model, skip=["compose_sequential_convs", "collapse_affine_region"])
    assert ops(out) == {"Relu": 1, "Mul": 1, "Add": 1, "Conv": 1}
    assert [r.rule for r in report.rewrites] == RULE
    assert_same_outputs(model, out)
