"""Normalization: exporter artifacts and constant subgraphs disappear before the rules run."""

import numpy as np
import pytest
import onnx
from onnx import helper

import onnxrep
from helpers import GraphBuilder, assert_same_outputs, ops, run
from onnxrep.normalize import import_graph, normalize


def _normalized_ops(model):
    graph = normalize(import_graph(model))
    return {n.op: sum(1 for m in graph.nodes if m.op == n.op) for n in graph.nodes}


def test_dynamo_noopt_zero_bias_chain_folds_to_a_constant():
    b = GraphBuilder([1, 4, 6, 6])
    w = b.const(b.rand(5, 4, 3, 3))
    zero = b.node("CastLike", [b.const(np.array(0.0, np.float32)), b.x])
    shape = b.node("Shape", [w], start=0, end=1)
    bias = b.node("Expand", [zero, shape])
    y = b.node("Conv", [b.x, w, bias], pads=[1, 1, 1, 1])
    model = b.build(y, opset=18)
    assert _normalized_ops(model) == {"Conv": 1}


def test_castlike_like_an_activation_of_unknown_shape_folds_and_the_affine_reaches_the_conv():
    # dynamo optimize=False: GroupNorm's affine as t = x * CastLike(g', x); t + CastLike(b, t),
    # where g' is computed from the weight by ops inference cannot size before folding, so t
    # has a dtype but no shape: the dtype alone decides the cast
    b = GraphBuilder(["N", 4, 6, 6])
    x = b.node("Relu", [b.x])
    axes = b.node("Cast", [b.node("Cast", [b.const(np.array([0], np.int64))], to=1)], to=7)
    g = b.node("Squeeze", [b.const(b.rand(1, 4, 1, 1)), axes])  # rank unknown until folded
    scaled = b.node("Mul", [x, b.node("CastLike", [g, x])])
    shifted = b.node("Add", [scaled, b.node("CastLike", [b.const(b.rand(4, 1, 1)), scaled])])
    y = b.conv(shifted, 4, 6, k=1)
    model = b.build(y, opset=18, output_shape=["N", 6, 6, 6])
    graph = normalize(import_graph(model))
    assert [n.op for n in graph.nodes].count("CastLike") == 0
    out, _ = onnxrep.optimize(model)
    assert ops(out) == {"Relu": 1, "Conv": 1}
    assert_same_outputs(model, out)


@pytest.mark.parametrize("spelling", ["gather", "shape slice"])
def test_folding_runs_until_sizes_learned_from_a_fold_have_folded_too(spelling):
    """RT-DETR: a Pad whose pads are computed (opaque to inference until folded), then a position
    embedding computed from the padded tensor's width (Shape -> Range -> Sin). The width is only
    known once the pads are: the embedding folds in a later round, not in a second run."""
    b = GraphBuilder(["N", 2, 4, 4])
    pads = b.node("Cast", [b.node("Cast", [b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))], to=1)], to=7)
    y = b.node("Pad", [b.x, pads])
    if spelling == "gather":
        w = b.node("Gather", [b.node("Shape", [y]), b.const(np.array(3, np.int64))], axis=0)
    else:  # Shape(start, end) of opset 15, the batch dynamic
        w = b.node("Squeeze", [b.node("Shape", [y], start=3, end=4), b.const(np.array([0], np.int64))])
    width = b.node("Cast", [w], to=1)
    pos = b.node("Sin", [b.node("Range", [b.const(np.float32(0)), width, b.const(np.float32(1))])])
    model = b.build(b.node("Add", [y, pos]), output_shape=["N", 2, 6, 6])
    assert _normalized_ops(model) == {"Pad": 1, "Add": 1}
    out, _ = onnxrep.optimize(model)
    again, report = onnxrep.optimize(out)
    assert len(again.graph.node) == len(out.graph.node) and not report.rewrites
    assert_same_outputs(model, out, batch=2)


def test_kernel_computed_from_parameters_is_folded():
    # OREPA-style: W = w0 * a + Pad(w1x1) + einsum(A, B), computed in the graph
    b = GraphBuilder([1, 3, 6, 6])
    w0 = b.node("Mul", [b.const(b.rand(4, 3, 3, 3)), b.const(np.float32(0.7))])
    w1 = b.node("Pad", [b.const(b.rand(4, 3, 1, 1)), b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))])
    w2 = b.node("Einsum", [b.const(b.rand(4, 2)), b.const(b.rand(2, 3, 3, 3))], equation="om,mihw->oihw")
    w = b.node("Add", [b.node("Add", [w0, w1]), w2])
    y = b.node("Conv", [b.x, w], pads=[1, 1, 1, 1])
    model = b.build(y)
    assert _normalized_ops(model) == {"Conv": 1}
    out, report = onnxrep.optimize(model)
    assert ops(out) == {"Conv": 1}
    assert_same_outputs(model, out)


def test_identity_chains_are_removed_but_output_names_kept():
    b = GraphBuilder([1, 4, 6, 6])
    c = b.node("Identity", [b.node("Identity", [b.conv(b.x, 4, 4)])])
    y = b.node("Identity", [b.node("Relu", [c])])
    model = b.build(y)
    out, _ = onnxrep.optimize(model)
    assert ops(out) == {"Conv": 1, "Relu": 1}
    assert out.graph.output[0].name == model.graph.output[0].name
    assert_same_outputs(model, out)


def test_identity_from_input_to_output_is_kept():
    b = GraphBuilder([1, 4, 6, 6])
    model = b.build(b.node("Identity", [b.x]))
    out, _ = onnxrep.optimize(model)
    assert ops(out) == {"Identity": 1}


def test_metadata_and_doc_strings_are_preserved():
    b = GraphBuilder([1, 4, 6, 6])
    model = b.build(b.add(b.conv(b.x, 4, 4, k=3), b.conv(b.x, 4, 4, k=1)))
    model.doc_string = "model doc"
    model.graph.doc_string = "graph doc"
    model.producer_name = "pytorch"
    helper.set_model_props(model, {"author": "someone"})
    out, _ = onnxrep.optimize(model)
    assert ops(out) == {"Conv": 1}
    assert out.doc_string == "model doc" and out.graph.doc_string == "graph doc"
    assert out.producer_name == "pytorch"
    assert {p.key: p.value for p in out.metadata_props} == {"author": "someone"}
    assert out.ir_version == model.ir_version


def test_if_subgraphs_are_left_untouched_and_verified():
    b = GraphBuilder([1, 4, 6, 6])
    w = b.rand(4, 4, 3, 3)
    then_nodes = GraphBuilder([1, 4, 6, 6])  # borrow its BN/Conv builders for the branch body
    then_y = then_nodes.bn(then_nodes.conv(b.x, 4, 4, k=3, weight=w), 4)
    elem = onnx.TensorProto.FLOAT
    then_graph = helper.make_graph(then_nodes.nodes, "then", [], [helper.make_tensor_value_info(then_y, elem, [1, 4, 6, 6])],
                                   then_nodes.inits)
    else_graph = helper.make_graph([helper.make_node("Relu", [b.x], ["else_y"])], "else", [],
                                   [helper.make_tensor_value_info("else_y", elem, [1, 4, 6, 6])])
    b.inputs.append(helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []))
    y = b.node("If", ["cond"], then_branch=then_graph, else_branch=else_graph)
    model = b.build(b.add(b.conv(b.x, 4, 4, k=3), b.conv(b.x, 4, 4, k=1), y), output_shape=[1, 4, 6, 6])
    out, report = onnxrep.optimize(model)
    assert report.verification.ok
    assert ops(out) == {"Conv": 1, "Add": 1, "If": 1}
    branch = next(a.g for n in out.graph.node if n.op_type == "If" for a in n.attribute if a.name == "then_branch")
    assert sorted(n.op_type for n in branch.node) == ["BatchNormalization", "Conv"]
    for cond in (True, False):
        feeds = {"x": np.random.default_rng(1).standard_normal((1, 4, 6, 6)).astype(np.float32), "cond": np.array(cond)}
        np.testing.assert_allclose(run(model, feeds)[0], run(out, feeds)[0], rtol=1e-4, atol=1e-5)


# ---- exporter spellings that used to break normalization ---------------------------------------


def _model(nodes, x_shape, inits=(), y_shape=None):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, y_shape)], list(inits))
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _ints(name, values):
    return onnx.numpy_helper.from_array(np.asarray(values, np.int64), name)


def test_constant_value_floats_stays_float32():
    # dynamo, optimize=False: nn.Upsample scales as Constant(value_floats); read as a Python list
    # it became a float64 tensor that Resize rejects
    model = _model([helper.make_node("Constant", [], ["scales"], value_floats=[1.0, 1.0, 2.0, 2.0]),
                    helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="nearest")],
                   ["N", 4, 6, 6], y_shape=["N", 4, 12, 12])
    out, report = onnxrep.optimize(model)
    assert report.verification.ok
    scales = {i.name: i for i in out.graph.initializer}[next(n for n in out.graph.node if n.op_type == "Resize").input[2]]
    assert scales.data_type == onnx.TensorProto.FLOAT


def test_split_to_sequence_of_unequal_parts_keeps_distinct_sizes():
    nodes = [helper.make_node("SplitToSequence", ["x", "split"], ["seq"], axis=1)]
    nodes += [helper.make_node("SequenceAt", ["seq", f"i{i}"], [f"part{i}"]) for i in range(3)]
    nodes += [helper.make_node("Relu", ["part0"], ["r0"]), helper.make_node("Sigmoid", ["part1"], ["r1"]),
              helper.make_node("Concat", ["r0", "r1", "part2"], ["y"], axis=1)]
    inits = [_ints("split", [2, 2, 4])] + [_ints(f"i{i}", i) for i in range(3)]
    model = _model(nodes, ["N", 8, "H", "W"], inits, ["N", 8, "H", "W"])
    out, report = onnxrep.optimize(model, input_shapes={"x": [1, 8, 5, 5]})
    assert report.verification.ok
    # no dim name that inference invented (and shared between unequal parts) is written
    for vi in list(out.graph.value_info) + list(out.graph.output):
        assert not any(d.dim_param.startswith("unk__") for d in vi.type.tensor_type.shape.dim), vi
    x = np.random.default_rng(0).standard_normal((2, 8, 3, 7)).astype(np.float32)
    np.testing.assert_allclose(run(model, {"x": x})[0], run(out, {"x": x})[0], rtol=1e-6)


def test_split_to_sequence_over_a_constant_is_left_unfolded():
    # MultiheadAttention's packed in_proj_weight split as a sequence: folding crashed on it
    w = onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32), "w")
    nodes = [helper.make_node("SplitToSequence", ["w", "split"], ["seq"], axis=0),
             helper.make_node("SequenceAt", ["seq", "i0"], ["a"]), helper.make_node("SequenceAt", ["seq", "i1"], ["b"]),
             helper.make_node("MatMul", ["x", "a"], ["ya"]), helper.make_node("MatMul", ["x", "b"], ["yb"]),
             helper.make_node("Add", ["ya", "yb"], ["y"])]
    model = _model(nodes, ["N", 4], [w, _ints("split", [4, 4]), _ints("i0", 0), _ints("i1", 1)], ["N", 4])
    out, report = onnxrep.optimize(model)
    assert report.verification.ok
    assert ops(out)["MatMul"] == 2


def test_output_inference_cannot_size_keeps_declared_rank_and_names():
    # paddle2onnx's flatten under a dynamic batch: Reshape(x, Concat(Shape(x)[0:1], [-1])),
    # which opset-13 shape inference cannot size; a graph output still needs a shape.
    b = GraphBuilder(["N", 4, 3, 3])
    p = b.node("GlobalAveragePool", [b.x])
    batch = b.node("Slice", [b.node("Shape", [p]), b.const(np.array([0])), b.const(np.array([1])), b.const(np.array([0]))])
    target = b.node("Concat", [batch, b.const(np.array([-1]))], axis=0)
    model = b.build(b.node("Reshape", [p, target]), opset=13, output_shape=["N", 4])
    out, _ = onnxrep.optimize(model)
    dims = out.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["N", ""] and not any(d.HasField("dim_value") for d in dims)
    onnx.checker.check_model(out, full_check=True)
    assert_same_outputs(model, out, batch=2)


def test_known_shapes_reach_past_a_shape_chain_and_a_resize():
    """TorchScript's C2f chunk (a Slice whose end is computed from Shape) hides every size from
    inference on the original, and inference on the normalized graph gives a Resize's output a
    batch symbol of its own ('unk__0'): the report must still count the conv after them."""
    b = GraphBuilder(["N", 4, 4, 4])
    c = b.node("Gather", [b.node("Shape", [b.x]), b.const(np.array(1, np.int64))])
    half = b.node("Unsqueeze", [b.node("Div", [c, b.const(np.array(2, np.int64))]), b.const(np.array([0], np.int64))])
    s = b.node("Slice", [b.x, b.const(np.array([0], np.int64)), half, b.const(np.array([1], np.int64))])
    r = b.node("Resize", [s, "", b.const(np.array([1, 1, 2, 2], np.float32))], mode="nearest")
    model = b.build(b.conv(r, 2, 2, k=3, pad=1))
    out, report = onnxrep.optimize(model)
    conv = 2 * (2 * 8 * 8) * (2 * 3 * 3) + 2 * 8 * 8  # at batch 1: MACs x 2 + bias
    assert report.before.flops >= conv and report.after.flops >= conv
    assert not report.warnings
