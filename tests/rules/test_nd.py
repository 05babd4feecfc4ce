"""The rules on 1-D and 3-D convolutions (Conv1d for audio and sequences, Conv3d for video).

The algebra holds per spatial axis, so Conv+BN, RepVGG / ACNet blocks, 1x1 -> KxK chains and Pad
folds must reach one Conv whatever the number of spatial axes; and geometry that is not exact on
one axis only (strides, dilations, pads of the last axis) must leave the graph as it was. Each
test asserts the op counts and onnxruntime outputs on fresh inputs.
"""

import numpy as np
import pytest
from onnx import helper, numpy_helper

import onnxrep
from helpers import GraphBuilder, assert_same_outputs, ops, run
from onnxrep.cost import conv_flops
from onnxrep.kernels import ConvParams

SHAPES = {1: [1, 4, 13], 3: [1, 4, 5, 6, 7]}  # odd and different sizes per axis
NDIMS = sorted(SHAPES)


def conv(b, x, cin, cout, kernel, strides=None, pads=None, dilations=None, group=1, bias=True, **attrs):
    """A Conv over len(kernel) spatial axes; pads default to 'same' (centred) per axis."""
    kernel = tuple(kernel)
    n = len(kernel)
    dilations = tuple(dilations or (1,) * n)
    if pads is None:
        half = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilations))
        pads = half + half
    inputs = [x, b.const(b.rand(cout, cin // group, *kernel), "w")]
    if bias:
        inputs.append(b.const(b.rand(cout), "b"))
    geometry = dict(kernel_shape=list(kernel), strides=list(strides or (1,) * n), dilations=list(dilations),
                    group=group)
    if "auto_pad" not in attrs:
        geometry["pads"] = list(pads)
    return b.node("Conv", inputs, **geometry, **attrs)


def conv_weights(model):
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return [inits[n.input[1]] for n in model.graph.node if n.op_type == "Conv"]


def conv_attrs(model):
    return [{a.name: helper.get_attribute_value(a) for a in n.attribute}
            for n in model.graph.node if n.op_type == "Conv"]


def reasons(report):
    return " | ".join(d.reason for d in report.declines)


# ---- fold_bn_into_conv, fold_affine_into_conv, fold_affine_into_next_layer ---------------------


@pytest.mark.parametrize("n", NDIMS)
def test_conv_then_bn_is_one_conv(n):
    b = GraphBuilder(SHAPES[n])
    model = b.build(b.bn(conv(b, b.x, 4, 6, (3,) * n, strides=(2,) * n), 6))
    out, report = onnxrep.optimize(model, only=["fold_bn_into_conv"])
    assert ops(model) == {"Conv": 1, "BatchNormalization": 1}
    assert ops(out) == {"Conv": 1}
    assert report.verification.ok
    assert_same_outputs(model, out)


@pytest.mark.parametrize("n", NDIMS)
def test_per_channel_ops_before_and_after_a_conv_fold(n):
    # BN1d/BN3d before an unpadded conv (a pre-norm block) and Mul, Add after it: one conv
    b = GraphBuilder(SHAPES[n])
    shape = [1, 6] + [1] * n
    y = conv(b, b.bn(b.x, 4), 4, 6, (3,) * n, pads=(0,) * (2 * n))
    y = b.node("Mul", [y, b.const(b.rand(*shape), "s")])
    model = b.build(b.node("Add", [y, b.const(b.rand(*shape), "t")]))
    out, report = onnxrep.optimize(model, only=["fold_affine_into_conv", "fold_affine_into_next_layer"])
    assert ops(out) == {"Conv": 1}
    assert report.rules_applied() == {"fold_affine_into_next_layer": 1, "fold_affine_into_conv": 2}
    assert_same_outputs(model, out)


@pytest.mark.parametrize("n", NDIMS)
def test_shift_before_a_conv_padded_on_one_axis_only_stays(n):
    # the border would read 0 where the original reads the shift
    b = GraphBuilder(SHAPES[n])
    y = b.node("Add", [b.x, b.const(b.rand(*([1, 4] + [1] * n)), "t")])
    model = b.build(conv(b, y, 4, 6, (3,) * n, pads=(0,) * (2 * n - 1) + (1,)))
    out, report = onnxrep.optimize(model, only=["fold_affine_into_next_layer"])
    assert ops(out) == ops(model)
    assert "border" in reasons(report)


@pytest.mark.parametrize("n", NDIMS)
def test_constant_varying_along_the_last_axis_is_not_per_channel(n):
    b = GraphBuilder(SHAPES[n])
    shape = [1, 6] + [1] * (n - 1) + [SHAPES[n][-1]]
    model = b.build(b.node("Mul", [conv(b, b.x, 4, 6, (3,) * n), b.const(b.rand(*shape), "s")]))
    out, _ = onnxrep.optimize(model, only=["fold_affine_into_conv"])
    assert ops(out) == ops(model)


# ---- merge_parallel_add ------------------------------------------------------------------------

ADD = ["fold_bn_into_conv", "fold_affine_into_conv", "merge_parallel_add"]


def repvgg_block(b, x, n, cin, cout, stride=1, group=1, identity=True):
    s = (stride,) * n
    branches = [b.bn(conv(b, x, cin, cout, (3,) * n, s, group=group, bias=False), cout),
                b.bn(conv(b, x, cin, cout, (1,) * n, s, group=group, bias=False), cout)]
    if identity:
        branches.append(b.bn(x, cin))
    return b.node("Relu", [b.add(*branches)])


@pytest.mark.parametrize("n", NDIMS)
@pytest.mark.parametrize("group", [1, 2, 4])
def test_repvgg_block_with_identity_is_one_conv(n, group):
    b = GraphBuilder(SHAPES[n])
    model = b.build(repvgg_block(b, b.x, n, 4, 4, group=group))
    out, report = onnxrep.optimize(model, only=ADD)
    assert ops(out) == {"Conv": 1, "Relu": 1}
    (w,) = conv_weights(out)
    assert w.shape == (4, 4 // group) + (3,) * n
    assert report.verification.ok
    assert_same_outputs(model, out)


@pytest.mark.parametrize("n", NDIMS)
def test_repvgg_stack_with_stride_and_dynamic_sizes(n):
    # every dim but the channels dynamic: the output sizes of the branches must agree for every
    # size (decided symbolically per axis), not only at the verified one
    shape = ["N", 3] + [f"D{i}" for i in range(n)]
    b = GraphBuilder(shape)
    y = repvgg_block(b, b.x, n, 3, 8, stride=2, identity=False)
    model = b.build(repvgg_block(b, y, n, 8, 8))
    out, report = onnxrep.optimize(model, only=ADD, input_shapes={"x": SHAPES[n][:1] + [3] + SHAPES[n][2:]})
    assert ops(out) == {"Conv": 2, "Relu": 2}
    assert [d.dim_param for d in out.graph.input[0].type.tensor_type.shape.dim] == shape[:1] + [""] + shape[2:]
    feeds = {"x": np.random.default_rng(3).standard_normal([2, 3] + [s + 1 for s in SHAPES[n][2:]]).astype(np.float32)}
    for ya, yb in zip(run(model, feeds), run(out, feeds)):
        np.testing.assert_allclose(yb, ya, rtol=1e-4, atol=1e-4)


def test_acnet_1d_block_is_one_conv():
    # Conv1d ACNet-like: k5 + k3 + k1, all centred, each + BN: one k5 conv
    b = GraphBuilder(SHAPES[1])
    y = b.add(*(b.bn(conv(b, b.x, 4, 6, (k,), (2,), bias=False), 6) for k in (5, 3, 1)))
    model = b.build(y)
    out, _ = onnxrep.optimize(model, only=ADD)
    assert ops(out) == {"Conv": 1}
    assert conv_weights(out)[0].shape == (6, 4, 5)
    assert conv_attrs(out)[0]["pads"] == [2, 2] and conv_attrs(out)[0]["strides"] == [2]
    assert_same_outputs(model, out)


def test_acnet_3d_block_is_one_conv():
    # KxKxK + the three 1-D kernels along each axis (and a 1xKxK slice), all centred: one KxKxK
    b = GraphBuilder(SHAPES[3])
    kernels = [(3, 3, 3), (3, 1, 1), (1, 3, 1), (1, 1, 3), (1, 3, 3)]
    y = b.add(*(b.bn(conv(b, b.x, 4, 6, k, bias=False), 6) for k in kernels))
    model = b.build(y)
    out, _ = onnxrep.optimize(model, only=ADD)
    assert ops(out) == {"Conv": 1}
    assert conv_weights(out)[0].shape == (6, 4, 3, 3, 3)
    assert_same_outputs(model, out)


@pytest.mark.parametrize("n", NDIMS)
def test_dilated_branches_nest_in_the_largest_window(n):
    # UniRepLKNet-style: dw k5 + dw k3 dilation 2 (extent 5) + dw k3, all centred
    b = GraphBuilder(SHAPES[n])
    y = b.add(b.bn(conv(b, b.x, 4, 4, (5,) * n, group=4, bias=False), 4),
              b.bn(conv(b, b.x, 4, 4, (3,) * n, dilations=(2,) * n, group=4, bias=False), 4),
              b.bn(conv(b, b.x, 4, 4, (3,) * n, group=4, bias=False), 4))
    model = b.build(y)
    out, _ = onnxrep.optimize(model, only=ADD)
    assert ops(out) == {"Conv": 1}
    assert conv_weights(out)[0].shape == (4, 1) + (5,) * n
    assert_same_outputs(model, out)


def test_asymmetric_pads_that_nest_exactly_merge():
    # 3-D: a 3x3x3 conv padded (1, 2, 0) at the start and (1, 0, 2) at the end, and an unpadded
    # 1x1x1 conv: both give the same output size at every size, the 1x1x1 sits inside the window
    b = GraphBuilder(["N", 4, 5, 6, 7])
    y = b.add(conv(b, b.x, 4, 6, (3, 3, 3), pads=(1, 2, 0, 1, 0, 2)), conv(b, b.x, 4, 6, (1, 1, 1)))
    model = b.build(y)
    out, _ = onnxrep.optimize(model, only=ADD)
    assert ops(out) == {"Conv": 1}
    assert conv_attrs(out)[0]["pads"] == [1, 2, 0, 1, 0, 2]
    assert_same_outputs(model, out, batch=2)


def test_asymmetric_pads_that_agree_only_at_odd_lengths_stay_under_a_dynamic_length():
    # Conv1d stride 2: k3 pads (1, 1) and k1 pads (0, 1) give equal lengths at odd L only.
    # With L dynamic the sum is not one conv at every L: untouched. With L = 13 fixed: one conv.
    def block(length):
        b = GraphBuilder([1, 4, length])
        return b.build(b.add(conv(b, b.x, 4, 6, (3,), (2,), (1, 1)), conv(b, b.x, 4, 6, (1,), (2,), (0, 1))))
    dynamic = block("L")
    out, report = onnxrep.optimize(dynamic, only=ADD, input_shapes={"x": [1, 4, 13]})
    assert ops(out) == ops(dynamic) == {"Conv": 2, "Add": 1}
    assert "every input size" in reasons(report)
    static = block(13)
    out, _ = onnxrep.optimize(static, only=ADD)
    assert ops(out) == {"Conv": 1}
    assert_same_outputs(static, out)


def test_strides_that_differ_on_the_last_axis_only_stay():
    # 3-D, last axis of size 4: a 1x1x4 window at stride 1 and a 1x1x1 window at stride 2 both give
    # 2 outputs there, but their sum is no single conv
    b = GraphBuilder([1, 3, 3, 3, 4])
    y = b.add(conv(b, b.x, 3, 5, (1, 1, 4), pads=(0,) * 6), conv(b, b.x, 3, 5, (1, 1, 1), (1, 1, 2), (0,) * 6))
    model = b.build(y)
    out, report = onnxrep.optimize(model, only=ADD)
    assert ops(out) == ops(model)
    assert "different strides" in reasons(report)
    assert_same_outputs(model, out)


def test_dilation_on_one_axis_that_misaligns_the_window_stays_without_allow_growth():
    # 3x3x3 + a 1x1x3 kernel dilated by 2 on the last axis only (extent 1x1x5): the union window
    # 3x3x5 is larger than either, so merging would raise MACs
    b = GraphBuilder(SHAPES[3])
    y = b.add(conv(b, b.x, 4, 6, (3, 3, 3)), conv(b, b.x, 4, 6, (1, 1, 3), dilations=(1, 1, 2)))
    model = b.build(y)
    out, report = onnxrep.optimize(model, only=ADD)
    assert ops(out) == ops(model)
    assert "misaligned" in reasons(report)
    grown, _ = onnxrep.optimize(model, only=ADD, allow_growth=True)
    assert ops(grown) == {"Conv": 1}
    assert conv_weights(grown)[0].shape == (6, 4, 3, 3, 5)
    assert_same_outputs(model, grown)


def test_same_auto_pad_resolves_per_axis():
    # SAME_UPPER, stride 2, sizes 5, 6, 7: the 3x3x3 conv pads (1, 0, 1) at the start and
    # (1, 1, 1) at the end (the even axis needs one pad, at the end), the 1x1x1 conv none; so
    # the 1x1x1 sits at the centre of the window on axes 1 and 3 and at the start on axis 2
    b = GraphBuilder(SHAPES[3])
    y = b.bn(conv(b, b.x, 4, 6, (3, 3, 3), (2, 2, 2), auto_pad="SAME_UPPER", bias=False), 6)
    model = b.build(b.add(y, b.bn(conv(b, b.x, 4, 6, (1, 1, 1), (2, 2, 2), auto_pad="SAME_UPPER", bias=False), 6)))
    out, _ = onnxrep.optimize(model, only=ADD)
    assert ops(out) == {"Conv": 1}
    assert conv_attrs(out)[0]["pads"] == [1, 0, 1, 1, 1, 1]
    assert_same_outputs(model, out)


def test_1d_and_2d_branches_never_merge():
    # a Conv1d branch on x and a Conv2d branch on Unsqueeze(x) are different inputs: both stay
    b = GraphBuilder([1, 4, 9])
    x2 = b.node("Unsqueeze", [b.x, b.const(np.array([3], np.int64), "axes")])
    y2 = b.node("Squeeze", [conv(b, x2, 4, 4, (3, 1)), b.const(np.array([3], np.int64), "axes")])
    model = b.build(b.add(conv(b, b.x, 4, 4, (3,)), y2))
    out, _ = onnxrep.optimize(model, only=ADD)
    assert ops(out) == ops(model)
    assert_same_outputs(model, out)


# ---- compose_sequential_convs, fold_pad_into_conv ---------------------------------------------

SEQ = ["fold_bn_into_conv", "compose_sequential_convs"]


@pytest.mark.parametrize("n", NDIMS)
def test_1x1_without_bias_then_padded_kxk_is_one_conv(n):
    b = GraphBuilder(SHAPES[n])
    y = conv(b, b.x, 4, 8, (1,) * n, bias=False)
    model = b.build(b.bn(conv(b, y, 8, 6, (3,) * n, strides=(2,) * n, bias=False), 6))
    out, _ = onnxrep.optimize(model, only=SEQ)
    assert ops(out) == {"Conv": 1}
    assert conv_weights(out)[0].shape == (6, 4) + (3,) * n
    assert_same_outputs(model, out)


@pytest.mark.parametrize("n", NDIMS)
def test_strided_kxk_then_1x1_with_biases_is_one_conv(n):
    b = GraphBuilder(SHAPES[n])
    y = conv(b, b.x, 4, 8, (3,) * n, strides=tuple(2 if i == n - 1 else 1 for i in range(n)))
    model = b.build(conv(b, y, 8, 6, (1,) * n))
    out, _ = onnxrep.optimize(model, only=SEQ)
    assert ops(out) == {"Conv": 1}
    assert_same_outputs(model, out)


@pytest.mark.parametrize("n", NDIMS)
def test_1x1_with_bias_then_padded_kxk_stays(n):
    # the zero border of the KxK is not the 1x1's bias: composing would be wrong on the border
    b = GraphBuilder(SHAPES[n])
    y = conv(b, b.x, 4, 8, (1,) * n, bias=True)
    model = b.build(conv(b, y, 8, 8, (3,) * n))
    out, report = onnxrep.optimize(model, only=SEQ)
    assert ops(out) == {"Conv": 2}
    assert "border" in reasons(report)
    assert_same_outputs(model, out)


def test_avgpool_1d_composes_with_the_conv_before_it():
    b = GraphBuilder(SHAPES[1])
    y = conv(b, b.x, 4, 4, (3,), pads=(0, 0))
    model = b.build(b.node("AveragePool", [y], kernel_shape=[3], strides=[2], pads=[0, 0]))
    out, _ = onnxrep.optimize(model, only=SEQ)
    assert ops(out) == {"Conv": 1}
    assert_same_outputs(model, out)


@pytest.mark.parametrize("n", NDIMS)
def test_zero_pad_before_a_conv_moves_into_its_pads(n):
    b = GraphBuilder(SHAPES[n])
    begins, ends = (0, 0) + (1, 0, 2)[:n], (0, 0) + (2, 1, 0)[:n]
    y = b.node("Pad", [b.x, b.const(np.array(begins + ends, np.int64), "pads")])
    model = b.build(conv(b, y, 4, 6, (3,) * n, pads=(0,) * (2 * n)))
    out, _ = onnxrep.optimize(model, only=["fold_pad_into_conv"])
    assert ops(out) == {"Conv": 1}
    assert conv_attrs(out)[0]["pads"] == list(begins[2:] + ends[2:])
    assert_same_outputs(model, out)


@pytest.mark.parametrize("n", NDIMS)
def test_pad_of_the_channel_axis_or_with_a_value_stays(n):
    for pads, value in (((0, 1) + (0,) * n + (0, 0) + (0,) * n, 0.0), ((0, 0) + (1,) * n + (0, 0) + (1,) * n, 0.5)):
        b = GraphBuilder(SHAPES[n])
        y = b.node("Pad", [b.x, b.const(np.array(pads, np.int64), "pads"), b.const(np.array(value, np.float32), "v")])
        cin = 5 if pads[1] else 4
        model = b.build(conv(b, y, cin, 6, (3,) * n, pads=(0,) * (2 * n)))
        out, _ = onnxrep.optimize(model, only=["fold_pad_into_conv"])
        assert ops(out) == ops(model)


# ---- the full default pipeline -----------------------------------------------------------------


@pytest.mark.parametrize("n", NDIMS)
def test_default_rules_reach_one_conv_per_block(n):
    b = GraphBuilder(SHAPES[n])
    y = repvgg_block(b, b.x, n, 4, 8, stride=2, identity=False)
    y = repvgg_block(b, y, n, 8, 8, group=2)
    model = b.build(y)
    out, report = onnxrep.optimize(model)
    assert ops(out) == {"Conv": 2, "Relu": 2}
    assert not report.rolled_back
    assert report.after.flops < report.before.flops
    assert_same_outputs(model, out)


# ---- one cost model (onnxrep.cost) for the rules and the report -------------------------------


@pytest.mark.parametrize("n", NDIMS)
@pytest.mark.parametrize("rule", ["merge_parallel_add", "compose_sequential_convs"])
def test_predicted_cost_is_the_measured_cost(n, rule):
    b = GraphBuilder(SHAPES[n])
    if rule == "merge_parallel_add":
        y = b.add(conv(b, b.x, 4, 4, (3,) * n, bias=False), conv(b, b.x, 4, 4, (1,) * n), b.x)
    else:
        y = conv(b, conv(b, b.x, 4, 8, (3,) * n, strides=(2,) * n), 8, 6, (1,) * n)
    model = b.build(y)
    out, report = onnxrep.optimize(model, only=[rule])
    assert len(report.rewrites) == 1 and report.rewrites[0].flops is not None, report.rewrites
    before, after = report.rewrites[0].flops
    assert before > after
    assert report.before.flops - report.after.flops == before - after
    assert_same_outputs(model, out)


@pytest.mark.parametrize("n", NDIMS)
def test_conv_flops_count_every_axis(n):
    kernel, out = (3, 2, 5)[:n], (4, 5, 6)[:n]
    p = ConvParams(weight=np.ones((2, 3) + kernel), bias=np.ones(2))
    outputs = int(np.prod(out))
    assert conv_flops(p, out) == 2 * 2 * 3 * int(np.prod(kernel)) * outputs + 2 * outputs


# ---- collapse_affine_region probes 2-D images only ---------------------------------------------


def test_affine_region_of_1d_convs_is_left_to_the_specific_rules():
    b = GraphBuilder(SHAPES[1])
    model = b.build(conv(b, b.node("Neg", [conv(b, b.x, 4, 4, (1,), bias=False)]), 4, 4, (3,)))
    out, report = onnxrep.optimize(model, only=["collapse_affine_region"])
    assert ops(out) == ops(model) and not report.declines


def test_image_region_through_a_1d_conv_declines_cleanly():
    # N C H W -> Reshape to N C L -> Conv1d -> Neg -> Reshape back -> Conv2d: an affine region
    # between 4-D tensors with a 1-D conv inside, which the impulse probes cannot read as an image
    b = GraphBuilder([1, 4, 8, 8])
    y = b.node("Reshape", [b.x, b.const(np.array([0, 4, 64], np.int64), "shape")])
    y = b.node("Neg", [conv(b, y, 4, 4, (3,))])
    y = b.node("Reshape", [y, b.const(np.array([0, 4, 8, 8], np.int64), "shape")])
    model = b.build(conv(b, y, 4, 4, (3, 3)))
    out, report = onnxrep.optimize(model, only=["collapse_affine_region"])
    assert ops(out) == ops(model)
    assert "only 2-D regions are probed" in reasons(report)
    assert_same_outputs(model, out)


# ---- merge_parallel_concat, merge_horizontal_convs ---------------------------------------------

CONCAT = ["fold_bn_into_conv", "merge_parallel_concat"]


@pytest.mark.parametrize("n", NDIMS)
def test_depth_concat_of_same_window_branches_is_one_conv(n):
    b = GraphBuilder(SHAPES[n])
    y = b.node("Concat", [b.bn(conv(b, b.x, 4, 3, (3,) * n, bias=False), 3),
                          b.bn(conv(b, b.x, 4, 5, (3,) * n), 5)], axis=1)
    model = b.build(y)
    out, _ = onnxrep.optimize(model, only=CONCAT)
    assert ops(out) == {"Conv": 1}
    assert conv_weights(out)[0].shape == (8, 4) + (3,) * n
    assert_same_outputs(model, out)


@pytest.mark.parametrize("n", NDIMS)
def test_depth_concat_with_a_smaller_kernel_merges_only_with_allow_growth(n):
    b = GraphBuilder(SHAPES[n])
    y = b.node("Concat", [conv(b, b.x, 4, 3, (3,) * n), conv(b, b.x, 4, 2, (1,) * n)], axis=1)
    model = b.build(y)
    out, report = onnxrep.optimize(model, only=CONCAT)
    assert ops(out) == ops(model)
    assert "allow-growth" in reasons(report)
    grown, _ = onnxrep.optimize(model, only=CONCAT, allow_growth=True)
    assert ops(grown) == {"Conv": 1}
    assert_same_outputs(model, grown)


@pytest.mark.parametrize("n", NDIMS)
def test_horizontal_merge_of_three_same_window_convs(n):
    b = GraphBuilder(SHAPES[n])
    ys = [b.node("Relu", [conv(b, b.x, 4, c, (3,) * n)]) for c in (2, 3, 4)]
    for y in ys[1:]:
        b.mark_output(y)
    model = b.build(ys[0])
    out, _ = onnxrep.optimize(model, only=["merge_horizontal_convs"], enable="merge_horizontal_convs")
    assert ops(out) == {"Conv": 1, "Split": 1, "Relu": 3}
    assert_same_outputs(model, out)
