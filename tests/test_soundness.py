"""Models that valid inputs can be, on which a rewrite used to write a wrong model or crash.

Each test names the class of bug it holds (docs/architecture.md, "What the pass manager
guarantees"). They assert the structure (what stays, what goes), the numbers (outputs equal
per output channel) and, where a rule must decline, the reason.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxrep
from helpers import GraphBuilder, assert_equal_per_channel, ops

REGION = ["collapse_affine_region"]


def feeds_for(shape, seed=5, scale=1.0, **extra):
    x = (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)
    return {"x": x, **extra}


# ---- class 1: ops whose linearity depends on an attribute --------------------------------


@pytest.mark.parametrize("reduction", ["max", "min", "mul", "add"])
def test_scatternd_with_a_reduction_is_not_affine(reduction):
    # max(y, -5000) at every pixel of channel 0: a clamp that neither impulse probes nor
    # ordinary draws reach, so probing alone would see a linear map
    b = GraphBuilder([1, 2, 5, 5])
    y = b.conv(b.x, 2, 3, k=1, bias=False)
    idx = np.stack(np.meshgrid([0], [0], np.arange(5), np.arange(5), indexing="ij"), -1).reshape(-1, 4)
    y = b.node("ScatterND", [y, b.const(idx.astype(np.int64)), b.const(np.full(25, -5000.0, np.float32))],
               reduction=reduction)
    model = b.build(b.conv(y, 3, 3, k=3, pad=0), opset=18)
    out, report = onnxrep.optimize(model, only=REGION)
    assert ops(out) == ops(model)
    assert not report.rewrites
    big = feeds_for([1, 2, 5, 5], scale=1e5)  # reaches the clamp
    assert_equal_per_channel(model, out, big)


def test_scatter_elements_with_a_reduction_is_not_affine():
    b = GraphBuilder([1, 2, 4, 4])
    idx = np.zeros((1, 2, 1, 4), np.int64)
    y = b.node("ScatterElements", [b.conv(b.x, 2, 2, k=1, bias=False), b.const(idx),
                                   b.const(np.full((1, 2, 1, 4), -5000.0, np.float32))], axis=2, reduction="max")
    model = b.build(b.conv(y, 2, 2, k=3, pad=0), opset=18)
    out, _ = onnxrep.optimize(model, only=REGION)
    assert ops(out) == ops(model)
    assert_equal_per_channel(model, out, feeds_for([1, 2, 4, 4], scale=1e5))


def test_scatternd_without_reduction_still_collapses():
    # the same write with reduction "none" sets channel 0 to a constant: affine, one conv
    b = GraphBuilder([1, 2, 5, 5])
    y = b.conv(b.x, 2, 3, k=1, bias=False)
    idx = np.stack(np.meshgrid([0], [0], np.arange(5), np.arange(5), indexing="ij"), -1).reshape(-1, 4)
    y = b.node("ScatterND", [y, b.const(idx.astype(np.int64)), b.const(np.full(25, 0.0, np.float32))])
    model = b.build(b.conv(y, 3, 3, k=3, pad=0), opset=18)
    out, report = onnxrep.optimize(model, only=REGION)
    assert ops(out) == {"Conv": 1}
    assert_equal_per_channel(model, out, feeds_for([1, 2, 5, 5]))


# ---- class 2: a channel much smaller than another ------------------------------------------


@pytest.mark.parametrize("ratio", [1e4, 1e6])
def test_small_channel_is_recovered_exactly(ratio):
    # x -> Conv1x1 -> Neg -> Conv3x3, output channel 1 `ratio` times larger than channel 0
    b = GraphBuilder([1, 3, 7, 6])
    y = b.node("Neg", [b.conv(b.x, 3, 4, k=1, bias=False)])
    w2 = b.rand(2, 4, 3, 3)
    w2[1] *= ratio
    model = b.build(b.conv(y, 4, 2, k=3, weight=w2))
    out, report = onnxrep.optimize(model, only=REGION)
    assert ops(out) == {"Conv": 1}
    assert report.verification.ok
    for seed in (1, 2):
        assert_equal_per_channel(model, out, feeds_for([1, 3, 7, 6], seed=seed))


def test_small_channel_of_the_specific_rules_is_exact_too():
    b = GraphBuilder([1, 3, 7, 6])
    w = b.rand(4, 3, 3, 3)
    w[0] *= 1e-6
    model = b.build(b.add(b.bn(b.conv(b.x, 3, 4, k=3, weight=w), 4), b.bn(b.conv(b.x, 3, 4, k=1), 4)))
    out, _ = onnxrep.optimize(model)
    assert ops(out) == {"Conv": 1}
    assert_equal_per_channel(model, out, feeds_for([1, 3, 7, 6]))


# ---- class 3: regions over the batch axis ----------------------------------------------------


@pytest.mark.parametrize("op", ["Slice", "Gather", "Concat", "Transpose"])
def test_region_that_acts_across_the_batch_declines(op):
    b = GraphBuilder([2, 2, 5, 5])
    y = b.conv(b.x, 2, 2, k=1)
    if op == "Slice":
        y = b.node("Slice", [y, b.const(np.array([1], np.int64)), b.const(np.array([2], np.int64)),
                             b.const(np.array([0], np.int64))])
    elif op == "Gather":
        y = b.node("Gather", [y, b.const(np.array([1, 0], np.int64))], axis=0)
    elif op == "Concat":
        y = b.node("Concat", [y, y], axis=0)
    else:
        y = b.node("Transpose", [y], perm=[1, 0, 2, 3])
    model = b.build(b.conv(y, 2, 2, k=3))
    out, report = onnxrep.optimize(model, only=REGION)  # declines: no exception, nothing wrong
    assert ops(out) == ops(model)
    assert any(d.rule == "collapse_affine_region" for d in report.declines), report.declines
    x = np.random.default_rng(0).standard_normal((2, 2, 5, 5)).astype(np.float32)
    assert_equal_per_channel(model, out, {"x": x})


# ---- class 6: readers inside If / Loop bodies --------------------------------------------------


def _if_reading(b: GraphBuilder, t: str, shape, cout: int, pad=None, k: int = 3) -> str:
    """An If whose branches each run a Conv (k x k, ``pad``) on the outer tensor ``t``."""
    elem = onnx.TensorProto.FLOAT
    branches = []
    for i, name in enumerate(("then", "else")):
        body = GraphBuilder(shape, seed=9 + i)
        body._n = itertools.count(1000 * (i + 1))  # names distinct from the outer graph's
        y = body.conv(t, shape[1], cout, k=k, pad=pad)
        branches.append(helper.make_graph(body.nodes, name, [], [helper.make_tensor_value_info(y, elem, None)],
                                          body.inits))
    then_g, else_g = branches
    b.inputs.append(helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []))
    return b.node("If", ["cond"], then_branch=then_g, else_branch=else_g)


def _branch_ops(model, attr="else_branch"):
    return sorted(n.op_type for n in model.graph.node if n.op_type == "If"
                  for a in n.attribute if a.name == attr for n in a.g.node)


def _check_both_ways(model, out, shape):
    for cond in (True, False):
        assert_equal_per_channel(model, out, feeds_for(shape, cond=np.array(cond)))


def test_pad_read_inside_an_if_body_is_not_folded():
    b = GraphBuilder([1, 4, 6, 6])
    padded = b.node("Pad", [b.x, b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))])
    main = b.conv(padded, 4, 4, k=3, pad=0)
    y = _if_reading(b, padded, [1, 4, 8, 8], 4, pad=0)
    model = b.build(b.add(main, y), output_shape=[1, 4, 6, 6])
    out, report = onnxrep.optimize(model)
    assert _branch_ops(out) == ["Conv"]  # the body keeps its conv
    assert ops(out)["Pad"] == 1 and ops(out)["If"] == 1
    assert any("subgraph" in d.reason for d in report.declines if d.rule == "fold_pad_into_conv"), report.declines
    _check_both_ways(model, out, [1, 4, 6, 6])


def test_horizontal_merge_leaves_a_body_conv_where_it_is():
    b = GraphBuilder([1, 4, 6, 6])
    convs = [b.conv(b.x, 4, 2, k=1) for _ in range(3)]
    y = _if_reading(b, b.x, [1, 4, 6, 6], 2, k=1)  # the same window as the main convs
    model = b.build(b.node("Concat", [*convs, y], axis=1), output_shape=[1, 8, 6, 6])
    out, report = onnxrep.optimize(model, only=["merge_horizontal_convs"])
    assert _branch_ops(out) == ["Conv"]
    assert report.rules_applied() == {"merge_horizontal_convs": 1}
    assert ops(out)["Conv"] == 1 and ops(out)["Split"] == 1  # the three main-graph convs only
    _check_both_ways(model, out, [1, 4, 6, 6])


def test_branch_tensor_read_inside_an_if_body_pins_the_branch():
    b = GraphBuilder([1, 4, 6, 6])
    c3 = b.conv(b.x, 4, 4, k=3)
    y = _if_reading(b, c3, [1, 4, 6, 6], 4)
    model = b.build(b.add(b.add(c3, b.conv(b.x, 4, 4, k=1)), y), output_shape=[1, 4, 6, 6])
    out, report = onnxrep.optimize(model)
    assert ops(out)["Conv"] == 2  # c3 must stay: the body reads it
    _check_both_ways(model, out, [1, 4, 6, 6])


# ---- class 4: declared shapes are metadata, not truth ----------------------------------------


def _with_stale_shapes(model: onnx.ModelProto, names, shape) -> onnx.ModelProto:
    """The model with a static ``shape`` declared for ``names`` (value_info or outputs), as an
    export traced at one size leaves it."""
    declared = {o.name for o in model.graph.output}
    for name in names:
        vi = helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape)
        if name in declared:
            out = next(o for o in model.graph.output if o.name == name)
            out.CopyFrom(vi)
        else:
            model.graph.value_info.append(vi)
    return model


def test_stale_declared_shapes_are_not_baked_into_the_result():
    b = GraphBuilder(["N", 4, "H", "W"])
    t = b.conv(b.x, 4, 4, k=3)
    e = b.node("Expand", [b.const(b.rand(1, 4, 1, 1)), b.node("Shape", [t])])
    r = b.node("Relu", [b.add(t, e)])
    y = b.add(b.bn(b.conv(r, 4, 4, k=3, stride=2, pad=0), 4), b.bn(b.conv(r, 4, 4, k=1, stride=2, pad=0), 4))
    model = b.build(y)
    for n in model.graph.node:  # SAME_UPPER convs: pads depend on the parity of H and W
        if n.op_type == "Conv" and any(a.name == "strides" and a.ints[0] == 2 for a in n.attribute):
            del n.attribute[[a.name for a in n.attribute].index("pads")]
            n.attribute.append(helper.make_attribute("auto_pad", "SAME_UPPER"))
    model = _with_stale_shapes(model, [t, r, y], [1, 4, 16, 16])
    onnx.checker.check_model(model)
    out, report = onnxrep.optimize(model, input_shapes={"x": [1, 4, 16, 16]})
    assert report.verification.ok
    dims = out.graph.output[0].type.tensor_type.shape.dim
    assert not any(d.HasField("dim_value") and d.dim_value == 16 for d in dims), dims
    for shape in ([1, 4, 16, 16], [2, 4, 13, 11], [1, 4, 7, 20]):
        assert_equal_per_channel(model, out, feeds_for(shape))


# ---- class 5: branch outputs equal at some sizes only ------------------------------------------


def test_merge_whose_sizes_agree_only_at_even_sizes_declines():
    # 3x3 s2 pads (0,0,1,1) and 1x1 s2: equal outputs at even H and W, not at odd ones
    b = GraphBuilder(["N", 4, "H", "W"])
    y = b.add(b.bn(b.conv(b.x, 4, 4, k=3, stride=2, pad=(0, 0, 1, 1)), 4), b.bn(b.conv(b.x, 4, 4, k=1, stride=2, pad=0), 4))
    model = b.build(y)
    out, report = onnxrep.optimize(model, input_shapes={"x": [1, 4, 8, 8]})
    assert ops(out)["Conv"] == 2 and ops(out)["Add"] == 1
    assert any("every input size" in d.reason for d in report.declines if d.rule == "merge_parallel_add"), report.declines
    assert_equal_per_channel(model, out, feeds_for([1, 4, 8, 8]))


def test_merge_whose_sizes_agree_at_every_size_still_happens():
    b = GraphBuilder(["N", 4, "H", "W"])
    y = b.add(b.bn(b.conv(b.x, 4, 4, k=3, stride=2, pad=1), 4), b.bn(b.conv(b.x, 4, 4, k=1, stride=2, pad=0), 4))
    model = b.build(y)
    out, _ = onnxrep.optimize(model, input_shapes={"x": [1, 4, 8, 8]})
    assert ops(out) == {"Conv": 1}
    for shape in ([1, 4, 8, 8], [3, 4, 9, 7], [1, 4, 1, 2]):
        assert_equal_per_channel(model, out, feeds_for(shape))
