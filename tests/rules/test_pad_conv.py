"""fold_pad_into_conv: zero Pad on H/W moves into Conv pads; other pads stay."""

import numpy as np
import pytest

import onnxrep
from helpers import GraphBuilder, assert_same_outputs, ops

RULE = ["fold_pad_into_conv"]


def _padded_conv(pads, value=None, mode=None, opset=17, consumers=1):
    b = GraphBuilder([1, 4, 6, 7])
    if opset < 11:
        attrs = {"pads": pads}
        if value is not None:
            attrs["value"] = value
        if mode:
            attrs["mode"] = mode
        p = b.node("Pad", [b.x], **attrs)
    else:
        ins = [b.x, b.const(np.array(pads, np.int64))]
        if value is not None:
            ins.append(b.const(np.array(value, np.float32)))
        p = b.node("Pad", ins, **({"mode": mode} if mode else {}))
    outs = [b.conv(p, 4, 5, k=3, pad=(0, 1, 1, 0)) for _ in range(consumers)]
    return b.build(b.add(*outs) if consumers > 1 else outs[0], opset=opset)


@pytest.mark.parametrize("opset", [9, 13, 18])
def test_zero_pad_moves_into_conv(opset):
    model = _padded_conv([0, 0, 1, 2, 0, 0, 2, 0], opset=opset)
    out, report = onnxrep.optimize(model, only=RULE)
    assert ops(out) == {"Conv": 1}
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    pads = next(a.ints for a in conv.attribute if a.name == "pads")
    assert list(pads) == [1, 3, 3, 0]
    assert_same_outputs(model, out)


def test_pad_feeding_two_convs_moves_into_both():
    model = _padded_conv([0, 0, 1, 1, 0, 0, 1, 1], consumers=2)
    out, _ = onnxrep.optimize(model, only=RULE)
    assert ops(out) == {"Conv": 2, "Add": 1}
    assert_same_outputs(model, out)


@pytest.mark.parametrize(
    "pads, value, mode, why",
    [
        ([0, 0, 1, 1, 0, 0, 1, 1], 0.5, None, "pads with 0.5"),
        ([0, 0, 1, 1, 0, 0, 1, 1], None, "reflect", "mode 'reflect'"),
        ([1, 0, 1, 1, 0, 0, 1, 1], None, None, "batch or channel"),
        ([0, 0, -1, 1, 0, 0, 1, 1], None, None, "crops"),
    ],
)
def test_pad_that_is_not_zero_padding_stays(pads, value, mode, why):
    model = _padded_conv(pads, value=value, mode=mode)
    out, report = onnxrep.optimize(model, only=RULE)
    assert ops(out) == ops(model)
    assert any(why in d.reason for d in report.declines), report.declines


def _zero_slab_border(b, y, c, h, w, value=0.0):
    """Concats of constant slabs around y on H, then W (paddle2onnx's spelling of a pad)."""
    slab = lambda shape: b.const(np.full(shape, value, np.float32))
    y = b.node("Concat", [slab((1, c, 1, w)), y, slab((1, c, 2, w))], axis=2)
    return b.node("Concat", [slab((1, c, h + 3, 2)), y, slab((1, c, h + 3, 1))], axis=3)


@pytest.mark.parametrize("value", [0.0, 0.5])
def test_zero_border_written_as_concats_becomes_conv_pads(value):
    b = GraphBuilder([1, 4, 6, 5])
    y = _zero_slab_border(b, b.node("Relu", [b.x]), 4, 6, 5, value)
    model = b.build(b.conv(y, 4, 3, k=3, pad=0))
    out, report = onnxrep.optimize(model, only=["fold_pad_into_conv"])
    if value:
        assert ops(out) == ops(model)
        assert any("not 0" in d.reason for d in report.declines), report.declines
    else:
        assert ops(out) == {"Relu": 1, "Conv": 1}
        conv = next(n for n in out.graph.node if n.op_type == "Conv")
        assert list(next(a.ints for a in conv.attribute if a.name == "pads")) == [1, 2, 2, 1]
    assert_same_outputs(model, out)
