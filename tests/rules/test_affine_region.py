"""collapse_affine_region: any region affine in one activation -> one Conv (impulse probes),
and the regions that must stay."""

import json
import os

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxrep
from helpers import GraphBuilder, assert_same_outputs, ops

RULE = ["collapse_affine_region"]
BORDER = np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)


def conv_dims(model):
    inits = {i.name: i for i in model.graph.initializer}
    return [list(inits[n.input[1]].dims) for n in model.graph.node if n.op_type == "Conv"]


def transposed_there_and_back(b, y):
    return b.node("Transpose", [b.node("Transpose", [y], perm=[0, 2, 3, 1])], perm=[0, 3, 1, 2])


def border_indices(n, c, h, w):
    """ScatterND indices [k, 4] of every border pixel of an [n, c, h, w] tensor."""
    grid = np.stack(np.meshgrid(np.arange(n), np.arange(c), np.arange(h), np.arange(w), indexing="ij"), -1)
    border = np.zeros((h, w), bool)
    border[[0, -1], :] = border[:, [0, -1]] = True
    return grid[:, :, border].reshape(-1, 4).astype(np.int64)


def dbb_block(batch=1, spelling="scatter", h=8, w=7):
    """DBB's 1x1 -> BN-and-pad -> AvgPool branch plus a parallel 3x3, with the border written
    with the 1x1 conv's bias: as Pad + ScatterND (dynamo) or as pad(y - v) + v."""
    b = GraphBuilder([batch, 4, h, w])
    bias = b.rand(6)
    y = b.node("Conv", [b.x, b.const(b.rand(6, 4, 1, 1)), b.const(bias)], kernel_shape=[1, 1])
    if spelling == "scatter":
        idx = border_indices(batch, 6, h + 2, w + 2)
        p = b.node("Pad", [y, b.const(BORDER)])
        p = b.node("ScatterND", [p, b.const(idx), b.const(bias[idx[:, 1]])])
    else:
        v = b.const(bias.reshape(1, 6, 1, 1))
        p = b.node("Add", [b.node("Pad", [b.node("Sub", [y, v]), b.const(BORDER)]), v])
    avg = b.node("AveragePool", [p], kernel_shape=[3, 3])
    return b.build(b.add(avg, b.conv(b.x, 4, 6, k=3)))


# ---- collapses -------------------------------------------------------------------------


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_through_transposes_is_one_conv(stride):
    b = GraphBuilder(["N", 4, 9, 8])
    model = b.build(transposed_there_and_back(b, b.conv(b.x, 4, 6, k=3, stride=stride)))
    # propagate_transposes would cancel the pair first: the fallback must see through it alone
    for out, report in (onnxrep.optimize(model, only=RULE), onnxrep.optimize(model, skip="propagate_transposes")):
        assert ops(out) == {"Conv": 1}
        assert conv_dims(out) == [[6, 4, 3, 3]]
        assert report.rules_applied() == {"collapse_affine_region": 1}
        assert report.verification.ok
        assert_same_outputs(model, out, batch=2)


def test_dbb_border_written_by_scatternd_is_one_conv():
    model = dbb_block()
    for out, report in (onnxrep.optimize(model, only=RULE), onnxrep.optimize(model)):
        assert ops(out) == {"Conv": 1}
        assert conv_dims(out) == [[6, 4, 3, 3]]
        assert report.rules_applied() == {"collapse_affine_region": 1}
        assert_same_outputs(model, out)


def test_dbb_border_written_as_pad_sub_add_is_one_conv_by_the_fallback_alone():
    model = dbb_block(spelling="padsub")
    out, report = onnxrep.optimize(model, only=RULE)
    assert ops(out) == {"Conv": 1}
    assert conv_dims(out) == [[6, 4, 3, 3]]
    assert report.rules_applied() == {"collapse_affine_region": 1}
    assert_same_outputs(model, out)


@pytest.mark.parametrize("batch", [2, 3])
def test_dbb_border_with_static_batch_above_one_is_one_conv(batch):
    """A static batch > 1 must not stop the fallback: the probes have to be padded to a
    multiple of the batch (and the random check too) instead of declining."""
    model = dbb_block(batch=batch)
    out, report = onnxrep.optimize(model, only=RULE)
    declines = [d.reason for d in report.declines]
    assert ops(out) == {"Conv": 1}, f"the fallback declined with a static batch of {batch}: {declines}"
    assert_same_outputs(model, out)


@pytest.mark.parametrize("shortcut", ["identity", "conv", "subtracted"])
def test_residual_added_at_the_end_is_set_aside(shortcut):
    """A ResNet block: DBB branches (border by ScatterND, which only the fallback reads) on
    relu(x), plus a shortcut of x added at the end. The shortcut reads another activation;
    it is set aside and added to the region's conv, as merge_parallel_add does."""
    b = GraphBuilder(["N", 4, 8, 7])
    z = b.node("Relu", [b.x])
    bias = b.rand(4)
    y = b.node("Conv", [z, b.const(b.rand(4, 4, 1, 1)), b.const(bias)], kernel_shape=[1, 1])
    idx = border_indices(1, 4, 10, 9)
    p = b.node("Pad", [y, b.const(BORDER)])
    p = b.node("ScatterND", [p, b.const(idx), b.const(bias[idx[:, 1]])])
    block = b.add(b.node("AveragePool", [p], kernel_shape=[3, 3]), b.conv(z, 4, 4, k=3))
    short = b.x if shortcut != "conv" else b.conv(b.x, 4, 4, k=1, pad=0)
    model = b.build(b.node("Sub" if shortcut == "subtracted" else "Add", [block, short]))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # ScatterND indices fix the batch
    out, report = onnxrep.optimize(model, only=RULE)
    assert report.rules_applied() == {"collapse_affine_region": 1}, report.declines
    convs = 2 if shortcut == "conv" else 1
    assert ops(out) == {"Relu": 1, "Conv": convs, "Sub" if shortcut == "subtracted" else "Add": 1}
    assert_same_outputs(model, out)


def test_residual_that_broadcasts_the_sum_is_not_set_aside():
    # a [N, C, 1, 1] operand: read as 0 it would not give the sum its shape
    b = GraphBuilder([1, 4, 8, 7])
    z = b.node("Relu", [b.x])
    block = b.add(b.node("AveragePool", [b.conv(z, 4, 4, k=1, pad=0)], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         count_include_pad=1), b.conv(z, 4, 4, k=3))
    model = b.build(b.add(block, b.node("GlobalAveragePool", [b.x])))
    out, report = onnxrep.optimize(model, only=RULE)
    assert ops(out) == ops(model)
    assert any("reads 2 activations" in d.reason for d in report.declines), report.declines


# ---- declines --------------------------------------------------------------------------


def test_relu_inside_stays():
    b = GraphBuilder([1, 4, 8, 7])
    p = b.node("Pad", [b.conv(b.x, 4, 6, k=1), b.const(BORDER)])
    avg = b.node("AveragePool", [b.node("Relu", [p])], kernel_shape=[3, 3])
    model = b.build(b.add(avg, b.conv(b.x, 4, 6, k=3)))
    out, report = onnxrep.optimize(model)
    assert ops(out) == ops(model)
    assert report.rewrites == []  # the branch past the Relu reads another activation: at most set aside
    assert_same_outputs(model, out)


@pytest.mark.parametrize("where", ["chain", "branch"])
def test_product_of_activations_stays(where):
    b = GraphBuilder([1, 4, 8, 7])
    if where == "chain":
        c = b.conv(b.x, 4, 6, k=3)
        y = transposed_there_and_back(b, b.node("Mul", [c, c]))
    else:
        y = b.add(b.node("Mul", [b.conv(b.x, 4, 6, k=3), b.conv(b.x, 4, 6, k=1)]), b.conv(b.x, 4, 6, k=3))
    model = b.build(y)
    out, report = onnxrep.optimize(model, skip="propagate_transposes")  # it would cancel the pair
    assert ops(out) == ops(model)
    assert report.rewrites == []
    assert_same_outputs(model, out)


def test_spatially_varying_bias_declines():
    b = GraphBuilder([1, 4, 8, 7])
    convs = b.node("Relu", [b.x])  # two branches of one input, so the region is worth probing
    y = b.add(b.conv(convs, 4, 6, k=3), b.conv(convs, 4, 6, k=1), b.const(b.rand(1, 6, 8, 7)))
    model = b.build(y)
    out, report = onnxrep.optimize(model, only=RULE)
    assert ops(out) == ops(model)
    assert any("varies over space" in d.reason for d in report.declines), report.declines
    assert_same_outputs(model, out)
    # the specific rules merge the two convs but keep adding the spatially varying constant
    out, _ = onnxrep.optimize(model)
    assert ops(out) == {"Relu": 1, "Conv": 1, "Add": 1}
    assert_same_outputs(model, out)


def test_dearer_region_declines_unless_allow_growth():
    # BSConv-U: 1x1 then depthwise 3x3 is cheaper than the dense 3x3 it equals.
    b = GraphBuilder([1, 8, 8, 8])
    model = b.build(b.conv(b.conv(b.x, 8, 8, k=1, bias=False), 8, 8, k=3, group=8))
    out, report = onnxrep.optimize(model, only=RULE)
    assert ops(out) == ops(model)
    assert any("FLOPs" in d.reason for d in report.declines), report.declines
    grown, report = onnxrep.optimize(model, only=RULE, allow_growth=True)
    assert ops(grown) == {"Conv": 1}
    assert conv_dims(grown) == [[8, 8, 3, 3]]
    assert report.rules_applied() == {"collapse_affine_region": 1}
    assert_same_outputs(model, grown)


def test_region_reading_two_activations_declines():
    # the two activations mix before the last conv: no residual to set aside
    b = GraphBuilder([1, 4, 8, 7])
    b.inputs.append(helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1, 4, 8, 7]))
    model = b.build(b.conv(b.add(b.conv(b.x, 4, 6, k=3), b.conv("z", 4, 6, k=1)), 6, 6, k=1, pad=0))
    for out, report in (onnxrep.optimize(model, only=RULE), onnxrep.optimize(model)):
        assert ops(out) == ops(model)
        assert any("reads 2 activations" in d.reason for d in report.declines), report.declines
        assert_same_outputs(model, out)


def test_avgpool_excluding_pads_is_not_translation_equivariant():
    b = GraphBuilder([1, 4, 8, 7])
    avg = b.node("AveragePool", [b.conv(b.x, 4, 6, k=1, bias=False)], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                 count_include_pad=0)
    model = b.build(b.add(avg, b.conv(b.x, 4, 6, k=3)))
    out, report = onnxrep.optimize(model, only=RULE)
    assert ops(out) == ops(model)
    # declined from the pool's attributes, before any probing
    assert any("count_include_pad=0" in d.reason for d in report.declines), report.declines
    assert_same_outputs(model, out)


def test_scalar_before_a_single_conv_is_left_for_the_runtime():
    # GELU's trailing "* 0.5" feeding a conv: folding it saves one elementwise op but costs
    # onnxruntime its Gelu fusion, so the fallback leaves one-layer regions of constants alone.
    b = GraphBuilder([1, 4, 6, 6])
    y = b.conv(b.node("Mul", [b.node("Relu", [b.x]), b.const(np.float32(0.5))]), 4, 4, k=1)
    model = b.build(y)
    out, report = onnxrep.optimize(model)
    assert ops(out) == ops(model)
    assert report.rewrites == []


# ---- probing cost does not grow with the image ---------------------------------------------


@pytest.mark.parametrize("group", [1, 8])
def test_probes_run_on_a_canvas_sized_by_the_receptive_field(monkeypatch, group):
    from onnxrep import probe

    seen = []
    original = probe.Submodel.run

    def recording(self, xs):
        seen.append(xs.shape)
        return original(self, xs)

    monkeypatch.setattr(probe.Submodel, "run", recording)
    b = GraphBuilder([1, 8, 48, 40])
    y = b.conv(b.node("Neg", [b.conv(b.x, 8, 8, k=1, bias=False, group=group)]), 8, 8, k=3, group=group)
    model = b.build(y)
    out, report = onnxrep.optimize(model, only=RULE)
    assert ops(out) == {"Conv": 1}
    probes = seen[3:]  # after the three full-size batch checks: the impulse batches
    assert probes and all(s[2] < 48 and s[3] < 40 for s in probes), seen
    if group == 8:  # depthwise: every channel probed at once, one impulse per stride residue
        assert max(s[0] for s in probes) == 2
    assert_same_outputs(model, out)


def _scatter_border(b, bias):
    """A 1x1 conv of x with ``bias``, then a border holding ``bias`` written by Pad + ScatterND."""
    y = b.node("Conv", [b.x, b.const(b.rand(4, 4, 1, 1)), b.const(bias)], kernel_shape=[1, 1])
    idx = border_indices(1, 4, 10, 9)
    return b.node("ScatterND", [b.node("Pad", [y, b.const(BORDER)]), b.const(idx), b.const(bias[idx[:, 1]])])


def test_horizontal_merging_does_not_pre_empt_the_fallback():
    """A DBB block (borders by ScatterND: only the fallback reads them) whose two 1x1 convs
    share their input and window with the block's shortcut 1x1. Merged horizontally first, the
    three would feed two regions through one Split, and the block could not collapse."""
    b = GraphBuilder([1, 4, 8, 7])
    avg = b.node("AveragePool", [_scatter_border(b, b.rand(4))], kernel_shape=[3, 3])
    kxk = b.conv(_scatter_border(b, b.rand(4)), 4, 4, k=3, pad=0)
    dbb = b.add(avg, kxk, b.conv(b.x, 4, 4, k=3))
    model = b.build(b.add(b.conv(b.node("Relu", [dbb]), 4, 4, k=3), b.conv(b.x, 4, 4, k=1, pad=0)))
    out, report = onnxrep.optimize(model, enable=["merge_horizontal_convs"])
    assert "merge_horizontal_convs" not in report.rules_applied(), report.rewrites
    assert ops(out) == {"Conv": 3, "Relu": 1, "Add": 1}  # the block, the 3x3 after it, the shortcut
    assert_same_outputs(model, out)


@pytest.mark.parametrize("name", ["dbb_resnet_b1", "dbb_resnet_dynamic"])
def test_fallback_alone_reaches_deploy_on_paddle2onnx_dbb(name):
    """Without the rule that reads paddle2onnx's Concat borders, the fallback must still
    collapse every DBB: the second DBB of each ResNet block ends in the residual Add (set
    aside), and under a dynamic batch its costs come from resolved sizes."""
    folder = os.path.join(os.path.dirname(__file__), "..", "..", "models", "paddle2onnx")
    with open(os.path.join(folder, "manifest.json")) as f:
        entry = next(e for e in json.load(f) if e["file"] == name + ".onnx")
    model = onnx.load(os.path.join(folder, entry["file"]))
    out, report = onnxrep.optimize(model, skip=["fold_border_pad_into_conv"])
    assert ops(out)["Conv"] == entry["deploy_ops"]["Conv"], report.declines
    assert report.rules_applied()["collapse_affine_region"] == 4  # every DBB's border branches
    assert_same_outputs(model, out, batch=2 if entry["dynamic_batch"] else 1)
