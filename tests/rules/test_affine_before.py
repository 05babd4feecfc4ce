"""fold_affine_into_next_layer: BN / per-channel affine BEFORE a Conv, Gemm or MatMul, and what
must stay (a shift before a zero-padded conv, a reader that is not such a layer, scalars)."""

import numpy as np
import pytest

import onnxrep
from helpers import GraphBuilder, assert_equal_per_channel, ops

RULE = ["fold_affine_into_next_layer"]


def feeds(shape, seed=0):
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


@pytest.mark.parametrize("k, stride, group", [(1, 1, 1), (3, 2, 1), (3, 1, 2), (1, 1, 4)])
def test_bn_before_unpadded_conv_folds(k, stride, group):
    b = GraphBuilder(["N", 4, "H", "W"])
    y = b.conv(b.bn(b.x, 4), 4, 6 if group != 4 else 4, k=k, stride=stride, pad=0, group=group)
    model = b.build(y)
    out, report = onnxrep.optimize(model, only=RULE, input_shapes={"x": [1, 4, 9, 8]})
    assert ops(out) == {"Conv": 1}
    assert report.rules_applied() == {"fold_affine_into_next_layer": 1}
    for shape in ([1, 4, 9, 8], [2, 4, 5, 11]):
        assert_equal_per_channel(model, out, feeds(shape))


def test_scale_before_padded_conv_folds_but_a_shift_does_not():
    b = GraphBuilder([1, 4, 6, 6])
    scaled = b.conv(b.node("Mul", [b.x, b.const(b.rand(1, 4, 1, 1))]), 4, 4, k=3)
    shifted = b.conv(b.node("Add", [b.x, b.const(b.rand(1, 4, 1, 1))]), 4, 4, k=3)
    model = b.build(b.node("Concat", [scaled, shifted], axis=1))
    out, report = onnxrep.optimize(model, only=RULE)
    assert ops(out) == {"Conv": 2, "Add": 1, "Concat": 1}
    assert any("border" in d.reason for d in report.declines), report.declines
    assert_equal_per_channel(model, out, feeds([1, 4, 6, 6]))


def test_bn_read_by_two_convs_folds_into_both():
    b = GraphBuilder([1, 4, 6, 6])
    t = b.bn(b.x, 4)
    model = b.build(b.node("Concat", [b.conv(t, 4, 3, k=1, pad=0), b.conv(t, 4, 5, k=1, pad=0, group=1)], axis=1))
    out, report = onnxrep.optimize(model, only=RULE)
    assert ops(out) == {"Conv": 2, "Concat": 1}
    assert report.rules_applied() == {"fold_affine_into_next_layer": 1}
    assert_equal_per_channel(model, out, feeds([1, 4, 6, 6]))


def test_bn_also_read_by_another_op_stays():
    b = GraphBuilder([1, 4, 6, 6])
    t = b.bn(b.x, 4)
    model = b.build(b.add(b.conv(t, 4, 4, k=1, pad=0), b.node("Relu", [t])))
    out, _ = onnxrep.optimize(model, only=RULE)
    assert ops(out) == ops(model)


def test_bn1d_before_linear_folds_into_one_gemm():
    b = GraphBuilder(["N", 6])
    t = b.bn(b.x, 6)
    y = b.node("Gemm", [t, b.const(b.rand(3, 6)), b.const(b.rand(3))], transB=1, alpha=0.5, beta=2.0)
    model = b.build(y)
    out, report = onnxrep.optimize(model, only=RULE)
    assert ops(out) == {"Gemm": 1}
    assert_equal_per_channel(model, out, feeds([5, 6]))


def test_bn_before_matmul_of_rank_3_stays():
    b = GraphBuilder([1, 4, 6])
    model = b.build(b.node("MatMul", [b.bn(b.x, 4), b.const(b.rand(6, 3))]))
    out, report = onnxrep.optimize(model, only=RULE)
    assert ops(out) == ops(model)
    assert any("not 2-D" in d.reason for d in report.declines), report.declines


def test_scalar_mul_before_a_conv_is_left_for_the_runtime():
    b = GraphBuilder([1, 4, 6, 6])
    model = b.build(b.conv(b.node("Mul", [b.x, b.const(np.float32(0.5))]), 4, 4, k=1, pad=0))
    out, report = onnxrep.optimize(model, only=RULE)
    assert ops(out) == ops(model) and report.rewrites == []


def test_whole_pipeline_prefers_folding_into_the_conv_before():
    b = GraphBuilder([1, 4, 6, 6])
    model = b.build(b.conv(b.bn(b.conv(b.x, 4, 4, k=3), 4), 4, 4, k=1, pad=0))
    out, report = onnxrep.optimize(model)
    assert report.rules_applied().get("fold_bn_into_conv") == 1
    assert ops(out)["BatchNormalization"] == 0
    assert_equal_per_channel(model, out, feeds([1, 4, 6, 6]))


def test_bn_read_inside_an_if_body_stays():
    import onnx
    from onnx import helper

    b = GraphBuilder([1, 4, 6, 6])
    t = b.bn(b.x, 4)
    body = lambda name: helper.make_graph(  # noqa: E731
        [helper.make_node("Neg", [t], [f"{name}_y"])], name, [], [helper.make_tensor_value_info(f"{name}_y", 1, None)])
    b.inputs.append(helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []))
    branch = b.node("If", ["cond"], then_branch=body("then"), else_branch=body("else"))
    model = b.build(b.add(b.conv(t, 4, 4, k=1, pad=0), branch), output_shape=[1, 4, 6, 6])
    out, report = onnxrep.optimize(model, only=RULE)
    assert ops(out)["BatchNormalization"] == 1 and report.rewrites == []
    for cond in (True, False):
        assert_equal_per_channel(model, out, {**feeds([1, 4, 6, 6]), "cond": np.array(cond)})
