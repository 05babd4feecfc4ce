"""compose_sequential_convs: Conv/AveragePool -> Conv/AveragePool -> one Conv, and what must stay."""

import pytest
from onnx import helper, numpy_helper

import onnxrep
from helpers import GraphBuilder, assert_same_outputs, ops

RULES = ["fold_bn_into_conv", "compose_sequential_convs"]


def optimize(model, **kw):
    return onnxrep.optimize(model, only=RULES, **kw)


def the_conv(model):
    """Attributes and weight shape of the model's only Conv."""
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 1, ops(model)
    attrs = {a.name: helper.get_attribute_value(a) for a in convs[0].attribute}
    inits = {i.name: i for i in model.graph.initializer}
    attrs["weight"] = list(numpy_helper.to_array(inits[convs[0].input[1]]).shape)
    return attrs


def avgpool(b, x, pads, count_include_pad=1):
    return b.node("AveragePool", [x], kernel_shape=[3, 3], strides=[1, 1], pads=[pads] * 4,
                  count_include_pad=count_include_pad)


# ---- compositions ----------------------------------------------------------------------


@pytest.mark.parametrize("k", [3, 5])
def test_strided_kxk_then_1x1_with_biases_is_one_conv(k):
    b = GraphBuilder([1, 4, 11, 10])
    y = b.conv(b.conv(b.x, 4, 8, k=k, stride=2), 8, 6, k=1)
    model = b.build(y)
    out, report = optimize(model)
    assert ops(out) == {"Conv": 1}
    conv = the_conv(out)
    assert conv["weight"] == [6, 4, k, k]
    assert list(conv["strides"]) == [2, 2]
    assert report.rules_applied() == {"compose_sequential_convs": 1}
    assert report.verification.ok
    assert_same_outputs(model, out)


def test_3x3_then_unpadded_3x3_is_one_5x5():
    # A wide middle (16 channels) makes the composite 5x5 cheaper than the two 3x3s.
    b = GraphBuilder([1, 4, 9, 9])
    y = b.conv(b.conv(b.x, 4, 16, k=3, pad=1), 16, 6, k=3, pad=0)
    model = b.build(y)
    out, _ = optimize(model)
    conv = the_conv(out)
    assert conv["weight"] == [6, 4, 5, 5]
    assert list(conv["pads"]) == [1, 1, 1, 1]
    assert_same_outputs(model, out)


def test_grouped_convs_compose_keeping_groups():
    b = GraphBuilder([1, 8, 7, 7])
    y = b.conv(b.conv(b.x, 8, 16, k=3, group=4), 16, 4, k=1, group=4)
    model = b.build(y)
    out, _ = optimize(model)
    conv = the_conv(out)
    assert conv["group"] == 4
    assert conv["weight"] == [4, 2, 3, 3]
    assert_same_outputs(model, out)


@pytest.mark.parametrize("stride", [1, 2])
def test_bias_free_1x1_then_padded_3x3_is_one_conv(stride):
    b = GraphBuilder([1, 4, 8, 9])
    y = b.conv(b.conv(b.x, 4, 6, k=1, bias=False), 6, 5, k=3, stride=stride)
    model = b.build(y)
    out, _ = optimize(model)
    conv = the_conv(out)
    assert conv["weight"] == [5, 4, 3, 3]
    assert list(conv["pads"]) == [1, 1, 1, 1]
    assert list(conv["strides"]) == [stride, stride]
    assert_same_outputs(model, out)


@pytest.mark.parametrize("pads", [0, 1])
def test_dbb_avg_branch_joins_parallel_kxk_as_one_conv(pads):
    # DBB's 1x1 -> AvgPool branch added to a 3x3 on the same input. Composed alone it would
    # cost more MACs, but the 3x3 sibling covers its window, so the whole block is one conv.
    b = GraphBuilder([1, 4, 8, 8])
    avg = avgpool(b, b.conv(b.x, 4, 6, k=1, bias=pads == 0), pads)
    model = b.build(b.add(avg, b.conv(b.x, 4, 6, k=3, pad=pads)))
    out, report = onnxrep.optimize(model)
    assert ops(out) == {"Conv": 1}
    assert the_conv(out)["weight"] == [6, 4, 3, 3]
    assert report.rules_applied() == {"compose_sequential_convs": 1, "merge_parallel_add": 1}
    assert_same_outputs(model, out)


# ---- declines --------------------------------------------------------------------------


def test_1x1_with_bias_then_zero_padded_3x3_declines():
    b = GraphBuilder([1, 4, 8, 8])
    model = b.build(b.conv(b.conv(b.x, 4, 6, k=1), 6, 5, k=3))
    for out, report in (optimize(model), onnxrep.optimize(model)):
        assert ops(out) == {"Conv": 2}
        assert report.rewrites == []
        assert any(d.rule == "compose_sequential_convs" and "bias is not zero" in d.reason and "border" in d.reason
                   for d in report.declines), report.declines
        assert_same_outputs(model, out)


def test_relu_between_convs_composes_nothing():
    b = GraphBuilder([1, 4, 8, 8])
    y = b.conv(b.node("Relu", [b.conv(b.x, 4, 6, k=3)]), 6, 5, k=1)
    model = b.build(y)
    out, report = onnxrep.optimize(model)
    assert ops(out) == ops(model)
    assert report.rewrites == []
    assert_same_outputs(model, out)


@pytest.mark.parametrize("escape", ["graph_output", "second_consumer"])
def test_first_conv_output_used_elsewhere_is_kept(escape):
    b = GraphBuilder([1, 4, 8, 8])
    c1 = b.conv(b.x, 4, 6, k=3)
    y = b.conv(c1, 6, 5, k=1)
    if escape == "graph_output":
        b.mark_output(c1)
    else:
        b.mark_output(b.node("Relu", [c1]))
    model = b.build(y)
    out, report = onnxrep.optimize(model)
    assert ops(out) == ops(model)
    assert report.rewrites == []
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    assert_same_outputs(model, out)


def test_bsconv_1x1_then_depthwise_needs_allow_growth():
    b = GraphBuilder([1, 8, 8, 8])
    model = b.build(b.conv(b.conv(b.x, 8, 8, k=1, bias=False), 8, 8, k=3, group=8))
    out, report = optimize(model)
    assert ops(out) == {"Conv": 2}
    assert any("raise FLOPs" in d.reason for d in report.declines), report.declines
    grown, report = optimize(model, allow_growth=True)
    conv = the_conv(grown)
    assert conv["weight"] == [8, 8, 3, 3] and conv["group"] == 1
    assert report.rules_applied() == {"compose_sequential_convs": 1}
    assert_same_outputs(model, grown)


def test_avgpool_excluding_pads_is_not_a_conv():
    b = GraphBuilder([1, 4, 8, 8])
    avg = avgpool(b, b.conv(b.x, 4, 6, k=1, bias=False), 1, count_include_pad=0)
    model = b.build(b.add(avg, b.conv(b.x, 4, 6, k=3)))
    out, report = onnxrep.optimize(model)
    assert ops(out) == ops(model)
    assert report.rewrites == []
    assert any("count_include_pad=0" in d.reason for d in report.declines), report.declines
    assert_same_outputs(model, out)


def test_growth_is_not_excused_by_a_sibling_that_cannot_absorb_it():
    """The 1x1 -> AvgPool composite costs more MACs; it is only free when merge_parallel_add
    then merges it into a covering sibling. A 3x3 sibling with 1 output channel (broadcast by
    the Add) covers the window but cannot merge (different Cout), so composing only adds MACs."""
    b = GraphBuilder([1, 4, 8, 8])
    avg = avgpool(b, b.conv(b.x, 4, 6, k=1, bias=False), 1)
    model = b.build(b.add(avg, b.conv(b.x, 4, 1, k=3)))
    out, report = onnxrep.optimize(model)
    before, after = report.before.flops, report.after.flops
    assert after <= before, f"FLOPs grew {before} -> {after} without allow_growth: {[r.detail for r in report.rewrites]}"
    assert_same_outputs(model, out)
