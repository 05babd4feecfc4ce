"""fold_border_pad_into_conv: a bias-valued border after a 1x1 conv moves into the conv."""

import numpy as np
import pytest

import onnxrep
from helpers import GraphBuilder, assert_same_outputs, ops

RULES = ["fold_affine_into_conv", "fold_border_pad_into_conv", "compose_sequential_convs"]


def _pads(b, p=1):
    return b.const(np.array([0, 0, p, p, 0, 0, p, p], np.int64))


def test_pad_with_the_bias_value_moves_into_the_1x1_when_the_next_conv_composes():
    b = GraphBuilder([1, 4, 6, 6])
    w = b.rand(5, 4, 1, 1)
    c = b.node("Conv", [b.x, b.const(w), b.const(np.full(5, 0.75, np.float32))])
    y = b.node("Pad", [c, _pads(b), b.const(np.array(0.75, np.float32))])
    model = b.build(b.conv(y, 5, 5, k=3, pad=0))
    out, report = onnxrep.optimize(model, only=["fold_border_pad_into_conv", "compose_sequential_convs"])
    assert ops(out) == {"Conv": 1}
    assert report.rules_applied() == {"fold_border_pad_into_conv": 1, "compose_sequential_convs": 1}
    assert_same_outputs(model, out)


def test_border_with_nothing_to_compose_stays():
    # Moving the border into the 1x1 alone would only make it run on the larger canvas.
    b = GraphBuilder([1, 4, 6, 6])
    c = b.node("Conv", [b.x, b.const(b.rand(5, 4, 1, 1)), b.const(np.full(5, 0.75, np.float32))])
    y = b.node("Pad", [c, _pads(b), b.const(np.array(0.75, np.float32))])
    model = b.build(b.node("Relu", [y]))
    out, report = onnxrep.optimize(model, only=["fold_border_pad_into_conv"])
    assert ops(out) == ops(model)
    assert any("does not lead straight to a conv" in d.reason for d in report.declines)


def test_dbb_pad_sub_add_spelling_composes_into_one_kxk():
    # conv1x1(x) with bias v, written as pad(y - v) + v, then an unpadded 3x3: one 3x3 conv
    b = GraphBuilder([1, 4, 7, 7])
    v = b.rand(1, 6, 1, 1)
    c = b.node("Conv", [b.x, b.const(b.rand(6, 4, 1, 1)), b.const(v.reshape(6))])
    y = b.node("Add", [b.node("Pad", [b.node("Sub", [c, b.const(v)]), _pads(b)]), b.const(v)])
    y = b.conv(y, 6, 5, k=3, pad=0)
    model = b.build(y)
    out, report = onnxrep.optimize(model, only=RULES)
    assert ops(out) == {"Conv": 1}
    assert "fold_border_pad_into_conv" in report.rules_applied()
    assert_same_outputs(model, out)


@pytest.mark.parametrize("case", ["other_value", "3x3_conv", "strided"])
def test_border_that_is_not_the_bias_stays(case):
    b = GraphBuilder([1, 4, 6, 6])
    k, stride = (3, 1) if case == "3x3_conv" else (1, 2 if case == "strided" else 1)
    c = b.conv(b.x, 4, 5, k=k, stride=stride, pad=k // 2, bias=False)
    value = 0.5 if case == "other_value" else 0.0
    y = b.node("Pad", [c, _pads(b), b.const(np.array(value, np.float32))])
    model = b.build(y)
    out, report = onnxrep.optimize(model, only=["fold_border_pad_into_conv"])
    assert ops(out) == {"Conv": 1, "Pad": 1}
    if case == "other_value":
        assert any("is not the bias" in d.reason for d in report.declines)
