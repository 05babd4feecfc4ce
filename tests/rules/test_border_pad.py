"""fold_border_pad_into_conv: a bias-valued border after a 1x1 conv moves into the conv."""

import numpy as np
import onnx
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


# --- the border as Concats of constant slabs (paddle2onnx's spelling of DBB's BN-and-pad) ---

C, H, W = 5, 6, 7
COMPOSE = ["fold_border_pad_into_conv", "compose_sequential_convs"]


def _biased_1x1(b, v):
    """conv1x1 of x whose bias is the border value v (what BN folded into it leaves)."""
    return b.node("Conv", [b.x, b.const(b.rand(C, 4, 1, 1)), b.const(v.astype(np.float32))])


def _static_slab(b, v, shape):
    return b.const(np.broadcast_to(v.reshape(1, C, 1, 1), shape).astype(np.float32).copy())


def _static_border(b, y, v, p=(1, 1, 1, 1), slab=_static_slab):
    top, left, bottom, right = p
    y = b.node("Concat", [slab(b, v, (1, C, top, W)), y, slab(b, v, (1, C, bottom, W))], axis=2)
    hh = H + top + bottom
    return b.node("Concat", [slab(b, v, (1, C, hh, left)), y, slab(b, v, (1, C, hh, right))], axis=3)


def _expanded_slab(b, v, y, axis, extent, other, batch_of=None):
    """Expand(v[1,C,1,1], Max([1,C,1,1], Concat(Shape(y)[0], -1, ...))) as paddle2onnx writes it."""
    n = b.node("Slice", [b.node("Shape", [batch_of or y]), b.const(np.array([0])), b.const(np.array([1]))])
    rest = [-1, extent, other] if axis == 2 else [-1, other, extent]
    shape = b.node("Concat", [n, b.const(np.array(rest))], axis=0)
    shape = b.node("Max", [b.const(np.array([1, C, 1, 1])), shape])
    return b.node("Expand", [b.const(v.reshape(1, C, 1, 1).astype(np.float32)), shape])


def _expanded_border(b, y, v, batch_of=None):
    s = _expanded_slab(b, v, y, 2, 1, W, batch_of)
    y = b.node("Concat", [s, y, s], axis=2)
    s = _expanded_slab(b, v, y, 3, 1, H + 2, batch_of)
    return b.node("Concat", [s, y, s], axis=3)


def _dbb(batch=1, border=_static_border, **kw):
    b = GraphBuilder([batch, 4, H, W])
    v = b.rand(C) + 1.0
    y = border(b, _biased_1x1(b, v), v, **kw)
    return b.build(b.conv(y, C, 3, k=3, pad=0))


@pytest.mark.parametrize("pads", [(1, 1, 1, 1), (2, 1, 0, 3)])
def test_concat_of_constant_slabs_moves_into_the_1x1(pads):
    model = _dbb(p=pads)
    out, report = onnxrep.optimize(model, only=COMPOSE)
    assert ops(out) == {"Conv": 1}
    assert report.rules_applied() == {"fold_border_pad_into_conv": 1, "compose_sequential_convs": 1}
    assert_same_outputs(model, out)


def test_expanded_slabs_under_a_dynamic_batch_move_into_the_1x1():
    model = _dbb(batch="N", border=_expanded_border)
    out, report = onnxrep.optimize(model, only=COMPOSE)
    assert ops(out) == {"Conv": 1}  # the Shape / Max / Expand chains die with the border
    assert report.rules_applied() == {"fold_border_pad_into_conv": 1, "compose_sequential_convs": 1}
    assert_same_outputs(model, out, batch=3)


def _uneven_slab(b, v, shape):
    value = np.broadcast_to(v.reshape(1, C, 1, 1), shape).astype(np.float32).copy()
    value[0, 2, 0, 0] += 0.25  # one pixel of one channel differs
    return b.const(value)


def _dynamic_width_border(b, y, v):
    # a slab of a fixed width next to an activation whose width is dynamic
    y = b.node("Concat", [_static_slab(b, v, (1, C, 1, W)), y, _static_slab(b, v, (1, C, 1, W))], axis=2)
    return y


def _foreign_batch_border(b, y, v):
    b.inputs.append(onnx.helper.make_tensor_value_info("s", onnx.TensorProto.FLOAT, ["M", 3]))
    return _expanded_border(b, y, v, batch_of="s")


def _channel_concat(b, y, v):
    return b.node("Concat", [_static_slab(b, v, (1, C, H, W)), y], axis=1)


def _other_value_border(b, y, v):
    return _static_border(b, y, v + 0.5)


@pytest.mark.parametrize("case, batch, reason", [
    ("uneven", 1, "not constant per channel"),
    ("dynamic_width", 1, "does not span the activation"),
    ("foreign_batch", "N", "takes its batch from 's'"),
    ("channel_axis", 1, None),
    ("other_value", 1, "is not the bias"),
])
def test_border_concats_that_are_not_the_bias_border_stay(case, batch, reason):
    borders = {"uneven": lambda b, y, v: _static_border(b, y, v, slab=_uneven_slab),
               "dynamic_width": _dynamic_width_border, "foreign_batch": _foreign_batch_border,
               "channel_axis": _channel_concat, "other_value": _other_value_border}
    b = GraphBuilder([batch, 4, H, "W" if case == "dynamic_width" else W])
    v = b.rand(C) + 1.0
    y = borders[case](b, _biased_1x1(b, v), v)
    cin = 2 * C if case == "channel_axis" else C
    model = b.build(b.conv(y, cin, 3, k=3, pad=0))
    shapes = {"x": [1, 4, H, W]} if case == "dynamic_width" else None
    out, report = onnxrep.optimize(model, only=COMPOSE, input_shapes=shapes)
    assert ops(out) == ops(model)
    if reason:
        assert any(reason in d.reason for d in report.declines), report.declines
