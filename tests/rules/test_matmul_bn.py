"""fold_bn_through_reshape: LeViT's LinearBatchNorm, MatMul -> Flatten/Reshape -> BN."""

import numpy as np
import pytest

import onnxrep
from helpers import GraphBuilder, assert_equal_per_channel, ops

RULE = ["fold_bn_through_reshape"]


def linear_bn(spelling: str, features: int = 6, reshape_to=None, allowzero: int = 0):
    b = GraphBuilder([1, 5, 4])
    z = b.node("MatMul", [b.x, b.const(b.rand(4, features))])
    if spelling == "flatten":
        z = b.node("Flatten", [z], axis=2)
    else:
        z = b.node("Reshape", [z, b.const(np.array(reshape_to or [-1, features], np.int64))], allowzero=allowzero)
    y = b.bn(z, (reshape_to or [-1, features])[1])  # BN over the last axis of the reshaped tensor
    return b.build(b.node("Reshape", [y, b.const(np.array([1, 5, -1], np.int64))]))


@pytest.mark.parametrize("spelling, shape, allowzero", [("flatten", None, 0), ("reshape", [-1, 6], 0),
                                                       ("reshape", [5, 6], 0), ("reshape", [5, 6], 1)])
def test_linear_batchnorm_folds(spelling, shape, allowzero):
    """allowzero=1: the dynamo exporter's spelling of LeViT's flatten(0, 1)."""
    model = linear_bn(spelling, reshape_to=shape, allowzero=allowzero)
    out, report = onnxrep.optimize(model, only=RULE)
    assert "BatchNormalization" not in ops(out)
    assert ops(out)["MatMul"] == 1 and ops(out)["Add"] == 1
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 5, 4)).astype(np.float32)}
    assert_equal_per_channel(model, out, feeds)


@pytest.mark.parametrize("allowzero", [0, 1])
def test_reshape_that_moves_the_feature_axis_stays(allowzero):
    # [1, 5, 6] -> [10, 3]: BN's channels are no longer the MatMul's features
    model = linear_bn("reshape", reshape_to=[10, 3], allowzero=allowzero)
    out, report = onnxrep.optimize(model, only=RULE)
    assert ops(out) == ops(model)


def linear_bn_reshape_as(extra_reader: str = "Shape"):
    """TorchScript's LinearBatchNorm: bn(z.flatten(0, 1)).reshape_as(z), the shape read from z."""
    b = GraphBuilder(["N", 5, 4])
    z = b.node("MatMul", [b.x, b.const(b.rand(4, 6))])
    y = b.bn(b.node("Flatten", [z], axis=2), 6)
    out = b.node("Reshape", [y, b.node(extra_reader, [z]) if extra_reader == "Shape" else b.node("Shape", [z])])
    if extra_reader != "Shape":  # a reader of z's value as well
        out = b.node("Add", [out, b.node(extra_reader, [z])])
    return b.build(out)


def test_shape_readers_of_the_matmul_follow_it():
    model = linear_bn_reshape_as()
    out, report = onnxrep.optimize(model, only=RULE)
    assert "BatchNormalization" not in ops(out) and ops(out)["Shape"] == 1
    for batch in (1, 3):
        feeds = {"x": np.random.default_rng(batch).standard_normal((batch, 5, 4)).astype(np.float32)}
        assert_equal_per_channel(model, out, feeds)


def test_a_reader_of_the_matmul_value_keeps_the_bn():
    model = linear_bn_reshape_as(extra_reader="Relu")
    out, report = onnxrep.optimize(model, only=RULE)
    assert ops(out) == ops(model)
    assert any("also used by" in d.reason for d in report.declines)
