"""merge_parallel_concat (depth concat -> one Conv) and merge_horizontal_convs (-> Conv + Split)."""

import onnx
import pytest
from onnx import helper, numpy_helper

import onnxrep
from helpers import GraphBuilder, assert_same_outputs, ops

CONCAT = ["fold_bn_into_conv", "merge_parallel_concat"]
HORIZONTAL = ["merge_horizontal_convs"]


def concat(b, xs, axis=1):
    return b.node("Concat", list(xs), axis=axis)


def convs_of(model):
    inits = {i.name: i for i in model.graph.initializer}
    return [
        ({a.name: helper.get_attribute_value(a) for a in n.attribute}, list(inits[n.input[1]].dims))
        for n in model.graph.node if n.op_type == "Conv"
    ]


def with_second_input(b, shape):
    b.inputs.append(helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, list(shape)))
    return "z"


# ---- depth concat ----------------------------------------------------------------------


@pytest.mark.parametrize("axis", [1, -3])
def test_concat_of_bn_convs_is_one_conv(axis):
    b = GraphBuilder([1, 4, 8, 9])
    y = concat(b, [b.bn(b.conv(b.x, 4, 6, bias=False), 6), b.bn(b.conv(b.x, 4, 5, bias=False), 5)], axis)
    model = b.build(y)
    out, report = onnxrep.optimize(model, only=CONCAT)
    assert ops(out) == {"Conv": 1}
    [(attrs, dims)] = convs_of(out)
    assert dims == [11, 4, 3, 3] and attrs["group"] == 1
    assert report.rules_applied() == {"fold_bn_into_conv": 2, "merge_parallel_concat": 1}
    assert_same_outputs(model, out)


def test_identity_operand_joins_only_with_allow_growth():
    # x itself is a 1x1 window: placing it in the 3x3 window costs MACs.
    b = GraphBuilder([1, 4, 8, 8])
    y = concat(b, [b.bn(b.conv(b.x, 4, 6, bias=False), 6), b.bn(b.conv(b.x, 4, 5, bias=False), 5), b.x])
    model = b.build(y)
    out, report = onnxrep.optimize(model, only=CONCAT)
    assert ops(out) == {"Conv": 2, "Concat": 1}
    assert any("more MACs" in d.reason for d in report.declines), report.declines
    grown, report = onnxrep.optimize(model, only=CONCAT, allow_growth=True)
    assert ops(grown) == {"Conv": 1}
    assert convs_of(grown)[0][1] == [15, 4, 3, 3]
    assert report.rewrites[-1].detail == "conv3x3+conv3x3+identity"
    assert_same_outputs(model, grown)


def test_mixed_windows_need_allow_growth():
    b = GraphBuilder([1, 4, 8, 8])
    y = concat(b, [b.conv(b.x, 4, 6), b.conv(b.x, 4, 5, k=1), b.conv(b.x, 4, 3, k=(1, 3), pad=(0, 1, 0, 1))])
    model = b.build(y)
    for out, report in (onnxrep.optimize(model, only=CONCAT), onnxrep.optimize(model)):
        assert ops(out) == ops(model)
        assert report.rewrites == []
        assert any(d.rule == "merge_parallel_concat" and "more MACs" in d.reason for d in report.declines)
    grown, _ = onnxrep.optimize(model, only=CONCAT, allow_growth=True)
    assert ops(grown) == {"Conv": 1}
    assert convs_of(grown)[0][1] == [14, 4, 3, 3]
    assert_same_outputs(model, grown)


@pytest.mark.parametrize("position", [0, 1, 2])
def test_operand_from_another_input_is_kept(position):
    b = GraphBuilder([1, 4, 8, 8])
    z = with_second_input(b, [1, 3, 8, 8])
    operands = [b.conv(b.x, 4, 6), b.conv(b.x, 4, 5)]
    operands.insert(position, z)
    model = b.build(concat(b, operands))
    out, _ = onnxrep.optimize(model)
    if position == 1:  # z splits the convs apart: channel order forbids merging them
        assert ops(out) == ops(model)
    else:
        assert ops(out) == {"Conv": 1, "Concat": 1}
        cat = next(n for n in out.graph.node if n.op_type == "Concat")
        assert len(cat.input) == 2 and cat.input[position // 2] == "z"
        assert convs_of(out)[0][1] == [11, 4, 3, 3]
    assert_same_outputs(model, out)


def test_concat_on_another_axis_is_untouched():
    b = GraphBuilder([1, 4, 8, 8])
    model = b.build(concat(b, [b.conv(b.x, 4, 6), b.conv(b.x, 4, 6)], axis=2))
    for out, report in (onnxrep.optimize(model, only=CONCAT), onnxrep.optimize(model)):
        assert ops(out) == ops(model)
        assert report.rewrites == []
        assert not any(d.rule == "merge_parallel_concat" for d in report.declines)
        assert_same_outputs(model, out)


@pytest.mark.parametrize("escape", ["graph_output", "second_consumer"])
def test_branch_output_used_elsewhere_is_kept(escape):
    b = GraphBuilder([1, 4, 8, 8])
    c = b.conv(b.x, 4, 6)
    b.mark_output(c if escape == "graph_output" else b.node("Relu", [c]))
    model = b.build(concat(b, [c, b.conv(b.x, 4, 5)]))
    out, report = onnxrep.optimize(model, only=CONCAT)
    assert ops(out) == ops(model)
    assert report.rewrites == []
    assert_same_outputs(model, out)


@pytest.mark.parametrize("group", [2, 8])
def test_concat_of_grouped_convs_does_not_grow_macs(group):
    """Concat of two grouped (depthwise) convs is not a grouped conv in concat channel order:
    merging them yields a dense conv with `group` times the MACs. docs/rules.md §5, §6: rewrites
    that raise FLOPs are not applied by default."""
    b = GraphBuilder([1, 8, 8, 8])
    model = b.build(concat(b, [b.conv(b.x, 8, 8, group=group), b.conv(b.x, 8, 8, group=group)]))
    out, report = onnxrep.optimize(model, only=CONCAT)
    before, after = report.before.flops, report.after.flops
    assert after <= before, f"merge_parallel_concat raised FLOPs {before} -> {after} without allow_growth: {convs_of(out)}"
    assert_same_outputs(model, out)
    grown, _ = onnxrep.optimize(model, only=CONCAT, allow_growth=True)
    assert ops(grown) == {"Conv": 1}
    assert_same_outputs(model, grown)


def test_identity_operand_with_1x1_conv_does_not_grow_macs():
    """Concat[x, conv1x1(x)]: the windows agree, but the identity operand costs nothing while
    as rows of the merged conv it costs C*Cin MACs per pixel. Without allow_growth FLOPs must
    not rise (the invariant test_fixtures checks: after.flops <= before.flops)."""
    b = GraphBuilder([1, 4, 8, 8])
    model = b.build(concat(b, [b.x, b.conv(b.x, 4, 6, k=1)]))
    out, report = onnxrep.optimize(model, only=CONCAT)
    before, after = report.before.flops, report.after.flops
    assert after <= before, f"merge_parallel_concat raised FLOPs {before} -> {after} without allow_growth"
    grown, _ = onnxrep.optimize(model, only=CONCAT, allow_growth=True)
    assert ops(grown) == {"Conv": 1}
    assert convs_of(grown)[0][1] == [10, 4, 1, 1]
    assert_same_outputs(model, grown)


def test_merged_run_whose_first_operand_repeats_later_is_written_once():
    """Concat[x, conv1x1(x), z, x]: the run [x, conv1x1(x)] merges; the trailing x must stay x.
    The rewrite looks runs up by operand tensor, so it writes the merged conv again in place
    of the last x (23 channels instead of 17); verification then rolls the rewrite back."""
    b = GraphBuilder([1, 4, 8, 8])
    z = with_second_input(b, [1, 3, 8, 8])
    model = b.build(concat(b, [b.x, b.conv(b.x, 4, 6, k=1), z, b.x]))
    out, report = onnxrep.optimize(model, only=CONCAT, allow_growth=True)
    assert not report.rolled_back, f"rewrite failed verification and was rolled back: {report.rolled_back}"
    assert ops(out) == {"Conv": 1, "Concat": 1}
    cat = next(n for n in out.graph.node if n.op_type == "Concat")
    assert list(cat.input[1:]) == ["z", "x"]
    assert_same_outputs(model, out)


# ---- horizontal ------------------------------------------------------------------------


def three_relu_heads(b, couts=(3, 5, 2), k=1):
    heads = [b.node("Relu", [b.conv(b.x, 4, c, k=k)]) for c in couts]
    for h in heads[1:]:
        b.mark_output(h)
    return heads[0]


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_three_same_window_convs_become_conv_and_split(opset):
    b = GraphBuilder([1, 4, 7, 8])
    model = b.build(three_relu_heads(b), opset=opset)
    default, _ = onnxrep.optimize(model)  # off by default: slower on one CPU thread
    assert ops(default) == ops(model)
    for out, report in (onnxrep.optimize(model, only=HORIZONTAL), onnxrep.optimize(model, enable=HORIZONTAL)):
        assert ops(out) == {"Conv": 1, "Split": 1, "Relu": 3}
        assert convs_of(out)[0][1] == [10, 4, 1, 1]
        assert report.rules_applied() == {"merge_horizontal_convs": 1}
        split = next(n for n in out.graph.node if n.op_type == "Split")
        attrs = {a.name: helper.get_attribute_value(a) for a in split.attribute}
        if opset < 13:
            assert list(attrs["split"]) == [3, 5, 2] and len(split.input) == 1
        else:
            assert "split" not in attrs
            sizes = next(i for i in out.graph.initializer if i.name == split.input[1])
            assert list(numpy_helper.to_array(sizes)) == [3, 5, 2]
        assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
        onnx.checker.check_model(out, full_check=True)
        assert_same_outputs(model, out)


def test_two_same_window_convs_are_left_alone():
    b = GraphBuilder([1, 4, 7, 8])
    model = b.build(three_relu_heads(b, couts=(3, 5)))
    out, report = onnxrep.optimize(model)
    assert ops(out) == ops(model)
    assert report.rewrites == []


def test_convs_with_different_windows_are_not_combined():
    b = GraphBuilder([1, 4, 7, 8])
    heads = [
        b.node("Relu", [b.conv(b.x, 4, 3, k=1)]),
        b.node("Relu", [b.conv(b.x, 4, 3, k=3)]),
        b.node("Relu", [b.conv(b.x, 4, 3, k=3, stride=2)]),
        b.node("Relu", [b.conv(b.x, 4, 3, k=(1, 3), pad=(0, 1, 0, 1))]),
    ]
    for h in heads[1:]:
        b.mark_output(h)
    model = b.build(heads[0])
    out, report = onnxrep.optimize(model, only=HORIZONTAL)
    assert ops(out) == ops(model)
    assert any("share one window" in d.reason for d in report.declines), report.declines


def test_only_the_same_window_convs_combine():
    b = GraphBuilder([1, 4, 7, 8])
    y = three_relu_heads(b, k=3)
    b.mark_output(b.conv(b.x, 4, 3, k=1))
    model = b.build(y)
    out, _ = onnxrep.optimize(model, only=HORIZONTAL)
    assert ops(out) == {"Conv": 2, "Split": 1, "Relu": 3}
    assert sorted(dims for _, dims in convs_of(out)) == [[3, 4, 1, 1], [10, 4, 3, 3]]
    assert_same_outputs(model, out)
