"""fold_affine_into_conv: per-channel Mul/Div/Add/Sub after Conv, and what must stay."""

import numpy as np
import pytest

import onnxrep
from helpers import GraphBuilder, assert_same_outputs, ops

RULE = ["fold_affine_into_conv"]


@pytest.mark.parametrize(
    "op, const_first, shape",
    [
        ("Mul", True, (1, 6, 1, 1)),
        ("Mul", False, (6, 1, 1)),
        ("Add", False, (1, 6, 1, 1)),
        ("Add", True, ()),
        ("Sub", False, (1, 6, 1, 1)),
        ("Sub", True, (1, 6, 1, 1)),
        ("Div", False, (1, 6, 1, 1)),
    ],
)
def test_per_channel_constant_folds(op, const_first, shape):
    b = GraphBuilder([1, 4, 7, 7])
    c = b.conv(b.x, 4, 6, stride=2)
    k = b.const(b.rng.uniform(0.5, 2.0, shape).astype(np.float32))
    y = b.node(op, [k, c] if const_first else [c, k])
    model = b.build(y)
    out, report = onnxrep.optimize(model, only=RULE)
    assert ops(out) == {"Conv": 1}
    assert report.rules_applied() == {"fold_affine_into_conv": 1}
    assert_same_outputs(model, out)


@pytest.mark.parametrize(
    "op, const_first, shape",
    [
        ("Mul", False, (1, 6, 7, 1)),  # varies over H
        ("Add", False, (7,)),  # lines up with W, not channels
        ("Div", True, (1, 6, 1, 1)),  # c / conv is not affine
    ],
)
def test_non_per_channel_constant_stays(op, const_first, shape):
    b = GraphBuilder([1, 4, 7, 7])
    c = b.conv(b.x, 4, 6)
    k = b.const(b.rng.uniform(0.5, 2.0, shape).astype(np.float32))
    y = b.node(op, [k, c] if const_first else [c, k])
    model = b.build(y)
    out, report = onnxrep.optimize(model, only=RULE)
    assert ops(out) == ops(model)
    assert report.rewrites == []


def test_chain_of_scale_and_shift_folds_to_one_conv():
    b = GraphBuilder([1, 3, 8, 8])
    c = b.conv(b.x, 3, 5, bias=False)
    y = b.node("Mul", [c, b.const(b.rand(1, 5, 1, 1))])
    y = b.node("Add", [y, b.const(b.rand(1, 5, 1, 1))])
    y = b.node("Div", [y, b.const(b.rng.uniform(1, 2, (1, 5, 1, 1)).astype(np.float32))])
    model = b.build(y)
    out, report = onnxrep.optimize(model, only=RULE)
    assert ops(out) == {"Conv": 1}
    assert len(report.rewrites) == 3
    assert_same_outputs(model, out)
