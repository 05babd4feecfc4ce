"""merge_parallel_add: branches joined by Add -> one Conv, and the branches that must stay."""

import numpy as np
import onnx
import pytest

import onnxrep
from helpers import GraphBuilder, assert_equal_per_channel, assert_same_outputs, ops

RULES = ["fold_bn_into_conv", "fold_affine_into_conv", "merge_parallel_add"]


def optimize(model, **kw):
    return onnxrep.optimize(model, only=RULES, **kw)


def repvgg_block(b, x, cin, cout, stride=1, group=1, identity=True):
    branches = [
        b.bn(b.conv(x, cin, cout, k=3, stride=stride, group=group, bias=False), cout),
        b.bn(b.conv(x, cin, cout, k=1, stride=stride, group=group, bias=False), cout),
    ]
    if identity:
        branches.append(b.bn(x, cin))
    return b.node("Relu", [b.add(*branches)])


@pytest.mark.parametrize("group", [1, 2, 8])
def test_repvgg_block_with_identity_is_one_conv(group):
    b = GraphBuilder([1, 8, 7, 7])
    model = b.build(repvgg_block(b, b.x, 8, 8, group=group))
    out, report = optimize(model)
    assert ops(out) == {"Conv": 1, "Relu": 1}
    assert report.verification.ok
    assert_same_outputs(model, out)


def test_repvgg_stack_with_stride_and_dynamic_batch():
    b = GraphBuilder(["N", 3, 9, 9])
    y = repvgg_block(b, b.x, 3, 8, stride=2, identity=False)
    y = repvgg_block(b, y, 8, 8)
    model = b.build(y)
    out, _ = optimize(model)
    assert ops(out) == {"Conv": 2, "Relu": 2}
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert_same_outputs(model, out, batch=3)


@pytest.mark.parametrize("k, stride", [(3, 1), (3, 2), (5, 1), (5, 2)])
def test_acnet_block_is_one_conv(k, stride):
    b = GraphBuilder([1, 4, 11, 10])
    h = k // 2
    y = b.add(
        b.bn(b.conv(b.x, 4, 6, k=k, stride=stride, bias=False), 6),
        b.bn(b.conv(b.x, 4, 6, k=(1, k), stride=stride, pad=(0, h, 0, h), bias=False), 6),
        b.bn(b.conv(b.x, 4, 6, k=(k, 1), stride=stride, pad=(h, 0, h, 0), bias=False), 6),
    )
    model = b.build(y)
    out, _ = optimize(model)
    assert ops(out) == {"Conv": 1}
    w = next(i for i in out.graph.initializer if i.name.endswith("weight"))
    assert list(w.dims) == [6, 4, k, k]
    assert_same_outputs(model, out)


def test_dilated_depthwise_branches_merge_into_large_kernel():
    b = GraphBuilder([1, 8, 13, 13])
    branches = [b.bn(b.conv(b.x, 8, 8, k=7, group=8, bias=False), 8)]
    for k, d in [(5, 1), (3, 2), (3, 3)]:
        branches.append(b.bn(b.conv(b.x, 8, 8, k=k, dilation=d, group=8, bias=False), 8))
    model = b.build(b.add(*branches))
    out, _ = optimize(model)
    assert ops(out) == {"Conv": 1}
    w = next(i for i in out.graph.initializer if i.name.endswith("weight"))
    assert list(w.dims) == [8, 1, 7, 7]
    assert_same_outputs(model, out)


def test_balanced_add_tree_scale_branch_and_constant_leaf():
    b = GraphBuilder([1, 6, 8, 8])
    s = b.node("Mul", [b.conv(b.x, 6, 6, k=1, group=6, bias=False), b.const(b.rand(1, 6, 1, 1))])
    left = b.add(b.conv(b.x, 6, 6, k=3, group=6), s)
    right = b.add(b.bn(b.x, 6), b.const(b.rand(1, 6, 1, 1)))
    model = b.build(b.node("Add", [left, right]))
    out, _ = optimize(model)
    assert ops(out) == {"Conv": 1}
    assert_same_outputs(model, out)


def test_branch_with_relu_inside_stays():
    b = GraphBuilder([1, 4, 6, 6])
    y = b.add(b.conv(b.x, 4, 4, k=3), b.node("Relu", [b.conv(b.x, 4, 4, k=1)]), b.bn(b.x, 4))
    model = b.build(y)
    out, report = optimize(model)
    # conv3x3 and the BN identity merge; the Relu branch stays and is added back.
    assert ops(out) == {"Conv": 2, "Relu": 1, "Add": 1}
    assert_same_outputs(model, out)


def test_different_inputs_decline():
    b = GraphBuilder([1, 4, 6, 6])
    r = b.node("Relu", [b.x])
    model = b.build(b.add(b.conv(b.x, 4, 4, k=3), b.conv(r, 4, 4, k=1)))
    out, report = optimize(model)
    assert ops(out) == ops(model)
    assert any("no two branches share an input" in d.reason for d in report.declines)


def test_different_strides_decline():
    b = GraphBuilder([1, 4, 7, 7])
    y = b.add(b.conv(b.x, 4, 4, k=4, pad=0), b.conv(b.x, 4, 4, k=1, stride=2, pad=0))
    model = b.build(y)
    out, report = optimize(model)
    assert ops(out) == ops(model)
    assert any("different strides" in d.reason for d in report.declines)
    assert_same_outputs(model, out)


def test_misaligned_branches_need_allow_growth():
    b = GraphBuilder([1, 4, 8, 8])
    y = b.add(b.conv(b.x, 4, 4, k=3, pad=1), b.conv(b.x, 4, 4, k=3, pad=(0, 0, 2, 2)))
    model = b.build(y)
    out, report = optimize(model)
    assert ops(out) == ops(model)
    assert any("misaligned" in d.reason for d in report.declines)
    grown, _ = optimize(model, allow_growth=True)
    assert ops(grown) == {"Conv": 1}
    assert_same_outputs(model, grown)


def test_branch_that_is_a_graph_output_is_kept():
    b = GraphBuilder([1, 4, 6, 6])
    c1 = b.conv(b.x, 4, 4, k=1)
    y = b.add(b.conv(b.x, 4, 4, k=3), c1, b.bn(b.x, 4))
    b.mark_output(c1)
    model = b.build(y)
    out, _ = optimize(model)
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    assert ops(out) == {"Conv": 2, "Add": 1}
    assert_same_outputs(model, out)


def test_identity_without_conv_is_left_alone():
    b = GraphBuilder([1, 4, 6, 6])
    model = b.build(b.add(b.bn(b.x, 4), b.x))
    out, report = optimize(model)
    assert ops(out) == ops(model)
    assert report.rewrites == []


def test_float16_block_is_folded_in_float64_and_verified_with_the_fp16_tolerance():
    b = GraphBuilder([1, 8, 7, 7], dtype=np.float16)
    model = b.build(repvgg_block(b, b.x, 8, 8))
    out, report = optimize(model)
    assert ops(out) == {"Conv": 1, "Relu": 1}
    v = report.verification
    assert (v.dtype, v.rtol, v.floor_rel, v.atol) == ("float16", 1e-2, 1e-3, None)
    assert report.verification.ok
    w = next(i for i in out.graph.initializer if i.name.endswith("weight"))
    assert w.data_type == onnx.TensorProto.FLOAT16
    assert_same_outputs(model, out, rtol=1e-2, atol=1e-3)


# ---- signed joins: Sub and variadic Sum -------------------------------------------------------


def _signed_feeds(shape):
    return {"x": np.random.default_rng(1).standard_normal(shape).astype(np.float32)}


def test_sub_join_of_a_conv_and_its_input_is_one_conv():
    # RIFormer's mixer: conv_dw1x1(t) - t
    b = GraphBuilder([1, 4, 6, 6])
    y = b.node("Sub", [b.bn(b.conv(b.x, 4, 4, k=1, pad=0, group=4), 4), b.x])
    model = b.build(y)
    out, report = onnxrep.optimize(model, only=["fold_bn_into_conv", "merge_parallel_add"])
    assert ops(out) == {"Conv": 1}
    assert_equal_per_channel(model, out, _signed_feeds([1, 4, 6, 6]))


def test_variadic_sum_join_is_one_conv():
    # tf2onnx writes Keras' Add of three branches as one Sum
    b = GraphBuilder([1, 4, 6, 6])
    y = b.node("Sum", [b.bn(b.conv(b.x, 4, 4, k=3), 4), b.bn(b.conv(b.x, 4, 4, k=1, pad=0), 4), b.bn(b.x, 4)])
    model = b.build(y)
    out, report = onnxrep.optimize(model)
    assert ops(out) == {"Conv": 1}
    assert_equal_per_channel(model, out, _signed_feeds([1, 4, 6, 6]))


def test_mixed_signed_tree_keeps_the_subtracted_remainder():
    b = GraphBuilder([1, 4, 6, 6])
    merged = b.node("Sub", [b.conv(b.x, 4, 4, k=3), b.conv(b.x, 4, 4, k=1, pad=0)])
    y = b.node("Sub", [b.node("Add", [merged, b.x]), b.node("Relu", [b.x])])
    model = b.build(y)
    out, report = onnxrep.optimize(model, only=["merge_parallel_add"])
    assert ops(out) == {"Conv": 1, "Sub": 1, "Relu": 1}
    assert_equal_per_channel(model, out, _signed_feeds([1, 4, 6, 6]))


def test_subtracted_constant_joins_the_bias():
    b = GraphBuilder([1, 4, 6, 6])
    s = b.node("Add", [b.conv(b.x, 4, 4, k=3), b.conv(b.x, 4, 4, k=1, pad=0)])
    y = b.node("Sub", [s, b.const(b.rand(1, 4, 1, 1))])
    model = b.build(y)
    out, _ = onnxrep.optimize(model, only=["merge_parallel_add"])
    assert ops(out) == {"Conv": 1}
    assert_equal_per_channel(model, out, _signed_feeds([1, 4, 6, 6]))
