"""fold_bn_into_conv on hand-built graphs: Conv, grouped ConvTranspose, Gemm, MatMul, declines."""

import onnx
from onnx import helper

import onnxrep
from helpers import GraphBuilder, assert_same_outputs, ops

RULE = ["fold_bn_into_conv"]


def optimize(model, **kw):
    return onnxrep.optimize(model, only=RULE, **kw)


def test_conv_bn_folds_grouped_strided_dilated():
    b = GraphBuilder([1, 4, 9, 9])
    y = b.bn(b.conv(b.x, 4, 6, k=3, stride=2, dilation=2, group=2, bias=False), 6)
    model = b.build(y)
    out, report = optimize(model)
    assert ops(out) == {"Conv": 1}
    assert report.rules_applied() == {"fold_bn_into_conv": 1}
    assert report.verification.ok
    assert_same_outputs(model, out)


def test_conv_transpose_bn_grouped():
    b = GraphBuilder([1, 4, 5, 5])
    w = b.rand(4, 3, 3, 3)  # [Cin, Cout/g, kh, kw] with g=2 -> Cout = 6
    t = b.node("ConvTranspose", [b.x, b.const(w), b.const(b.rand(6))], group=2, strides=[2, 2], pads=[1, 1, 1, 1])
    y = b.bn(t, 6)
    model = b.build(y)
    out, _ = optimize(model)
    assert ops(out) == {"ConvTranspose": 1}
    assert_same_outputs(model, out)


def test_gemm_transb_and_matmul_bn():
    b = GraphBuilder([3, 5])
    g = b.node("Gemm", [b.x, b.const(b.rand(4, 5)), b.const(b.rand(4))], transB=1, alpha=0.7, beta=1.3)
    y1 = b.bn(g, 4)
    m = b.node("MatMul", [y1, b.const(b.rand(4, 6))])
    y2 = b.bn(m, 6)
    model = b.build(y2)
    out, report = optimize(model)
    assert ops(out) == {"Gemm": 2}
    assert report.rules_applied() == {"fold_bn_into_conv": 2}
    assert_same_outputs(model, out)


def test_declines_when_conv_output_is_also_a_graph_output():
    b = GraphBuilder([1, 4, 6, 6])
    c = b.conv(b.x, 4, 4)
    y = b.bn(c, 4)
    b.mark_output(c)
    model = b.build(y)
    out, report = optimize(model)
    assert ops(out) == ops(model)
    assert any("graph output" in d.reason for d in report.declines)
    assert_same_outputs(model, out)


def test_declines_when_conv_output_has_another_consumer():
    b = GraphBuilder([1, 4, 6, 6])
    c = b.conv(b.x, 4, 4)
    y = b.add(b.bn(c, 4), b.node("Relu", [c]))
    model = b.build(y)
    out, report = optimize(model)
    assert ops(out)["BatchNormalization"] == 1
    assert any("also used by" in d.reason for d in report.declines)


def test_declines_when_weight_is_a_graph_input():
    b = GraphBuilder([1, 4, 6, 6])
    w = helper.make_tensor_value_info("w_in", onnx.TensorProto.FLOAT, [4, 4, 3, 3])
    b.inputs.append(w)
    c = b.node("Conv", [b.x, "w_in"], pads=[1, 1, 1, 1])
    model = b.build(b.bn(c, 4))
    out, report = optimize(model)
    assert ops(out) == {"Conv": 1, "BatchNormalization": 1}
    assert any("not a constant" in d.reason for d in report.declines)


def test_matmul_on_rank3_activation_declines():
    b = GraphBuilder([2, 4, 5])
    m = b.node("MatMul", [b.x, b.const(b.rand(5, 5))])
    model = b.build(b.bn(m, 4))
    out, report = optimize(model)
    assert ops(out) == {"MatMul": 1, "BatchNormalization": 1}
    assert any("not 2-D" in d.reason for d in report.declines)


def test_training_mode_bn_declines_in_the_rule():
    from onnxrep.graph import RepGraph
    from onnxrep.normalize import import_graph
    from onnxrep.passes import Context, try_match
    from onnxrep.rules.conv_bn import FoldBnIntoConv

    b = GraphBuilder([1, 4, 6, 6])
    model = b.build(b.bn(b.conv(b.x, 4, 4), 4, training_mode=1), opset=15, output_shape=[1, 4, 6, 6])
    graph = import_graph(model)
    bn = next(n for n in graph.nodes if n.op == "BatchNormalization")
    reason = try_match(Context(RepGraph(graph)), FoldBnIntoConv(), bn)
    assert isinstance(reason, str) and "training_mode" in reason
