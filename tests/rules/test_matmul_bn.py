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


def linear_bn_runtime_rows(tail_computed: bool = False):
    """dynamo optimize=False's LinearBatchNorm: the rows of the Reshape target are computed at run
    time from the batch (Concat(Reshape(Mul(N, 5)), [6])); only the last entry is a constant."""
    b = GraphBuilder(["N", 5, 4])
    z = b.node("MatMul", [b.x, b.const(b.rand(4, 6))])
    batch = b.node("Squeeze", [b.node("Shape", [b.x], start=0, end=1), b.const(np.array([0], np.int64))])
    rows = b.node("Reshape", [b.node("Mul", [batch, b.const(np.array(5, np.int64))]), b.const(np.array([1], np.int64))])
    tail = b.const(np.array([6], np.int64))
    if tail_computed:  # max(batch, 6): 6 at the batches tried, but computed at run time
        tail = b.node("Max", [b.node("Shape", [b.x], start=0, end=1), b.const(np.array([6], np.int64))])
    target = b.node("Concat", [rows, tail], axis=0)
    y = b.bn(b.node("Reshape", [z, target], allowzero=0), 6)
    back = b.node("Concat", [b.node("Shape", [b.x], start=0, end=1), b.const(np.array([5, 6], np.int64))], axis=0)
    return b.build(b.node("Reshape", [y, back]), output_shape=["N", 5, 6])


def test_reshape_with_rows_computed_at_run_time_folds():
    model = linear_bn_runtime_rows()
    out, report = onnxrep.optimize(model, only=RULE)
    assert "BatchNormalization" not in ops(out)
    assert ops(out)["MatMul"] == 1 and ops(out)["Add"] == 1
    for batch in (1, 3):
        feeds = {"x": np.random.default_rng(batch).standard_normal((batch, 5, 4)).astype(np.float32)}
        assert_equal_per_channel(model, out, feeds)


def test_reshape_whose_last_entry_is_not_a_literal_stays():
    # the same target with its last entry read from a shape: nothing says it equals the features
    model = linear_bn_runtime_rows(tail_computed=True)
    out, report = onnxrep.optimize(model, only=RULE)
    assert ops(out)["BatchNormalization"] == 1


def test_reshape_to_other_features_at_run_time_stays():
    # rows computed at run time, last entry 3: [N*5, 6] -> [N*10, 3] moves the feature axis
    b = GraphBuilder(["N", 5, 4])
    z = b.node("MatMul", [b.x, b.const(b.rand(4, 6))])
    batch = b.node("Squeeze", [b.node("Shape", [b.x], start=0, end=1), b.const(np.array([0], np.int64))])
    rows = b.node("Reshape", [b.node("Mul", [batch, b.const(np.array(10, np.int64))]), b.const(np.array([1], np.int64))])
    y = b.bn(b.node("Reshape", [z, b.node("Concat", [rows, b.const(np.array([3], np.int64))], axis=0)]), 3)
    model = b.build(b.node("Relu", [y]), output_shape=["M", 3])
    out, report = onnxrep.optimize(model, only=RULE)
    assert ops(out)["BatchNormalization"] == 1
