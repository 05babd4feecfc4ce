"""The verifier against deliberately wrong candidates (docs/verification.md), and correct ones that must pass.

Each wrong candidate below is hand-made from its reference by one small change (a zeroed or
scaled channel, a border error, a shape that only works at even sizes). The cases marked
"blind spot" are accepted by the criterion onnxrep used before (one global
``max|y - ref| <= 1e-5 + 1e-4 * max|ref|`` per output, normal and uniform draws at one shape);
``old_criterion_accepts`` re-checks that, so each of those tests keeps testing a real blind spot.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxrep
from helpers import GraphBuilder, ops, run
from onnxrep.verify import (DEFAULT_DRAWS, DRAW_KINDS, TOLERANCES, Verifier, compare, computation_dtype,
                            second_shapes)

MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")


# ---- helpers ---------------------------------------------------------------------------


def static_shapes(model):
    return {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}


def verify(reference, candidate, shapes=None, **kw):
    return Verifier(reference, shapes or static_shapes(reference), "test", **kw).check(candidate)


def old_criterion_accepts(reference, candidate, shapes=None):
    """The criterion before per-channel checks: 3 draws (normal, uniform, normal) at one shape,
    max|y - ref| <= 1e-5 + 1e-4 * max|ref| per output."""
    shapes = shapes or static_shapes(reference)
    rng = np.random.default_rng(0)
    for i in range(3):
        feed = {k: (rng.standard_normal(s) if i % 2 == 0 else rng.uniform(0, 1, s)).astype(np.float32)
                for k, s in shapes.items()}
        for y, r in zip(run(candidate, feed), run(reference, feed)):
            if y.shape != r.shape or np.max(np.abs(y.astype(np.float64) - r)) > 1e-5 + 1e-4 * np.max(np.abs(r)):
                return False
    return True


def initializer(model, name):
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name)).copy()


def with_initializer(model, name, value):
    """A copy of ``model`` whose initializer ``name`` holds ``value``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    t = next(t for t in out.graph.initializer if t.name == name)
    t.CopyFrom(numpy_helper.from_array(np.asarray(value, dtype=numpy_helper.to_array(t).dtype), name))
    return out


def conv_node(model, index=0):
    return [n for n in model.graph.node if n.op_type == "Conv"][index]


def two_layer(seed=0, attenuate=None):
    """x -> Conv 4->4 -> Relu -> Conv 4->3; ``attenuate``: scale conv2's weights reading that
    channel by 1e-6, so an error of conv1 in it hardly reaches the output."""
    b = GraphBuilder([1, 4, 8, 8], seed=seed)
    h = b.node("Relu", [b.conv(b.x, 4, 4)])
    y = b.conv(h, 4, 3)
    model = b.build(y)
    if attenuate is not None:
        w2 = conv_node(model, 1).input[1]
        w = initializer(model, w2)
        w[:, attenuate] *= 1e-6
        model = with_initializer(model, w2, w)
    return model


# ---- correct candidates pass -------------------------------------------------------------


def test_identical_candidate_passes_with_every_tensor_compared():
    model = two_layer()
    result = verify(model, model)
    assert result.ok and result.first_divergence is None and not result.diverging
    assert result.tensors_compared == 3  # every node output: conv, relu and the output conv
    assert result.max_abs_error == 0.0 and result.max_error_ratio == 0.0
    line = result.describe()
    assert line.startswith("verified: ") and "\n" not in line
    assert "0.0001 * max|ref_c| + 1e-06 * max|ref|" in line and "(float32)" in line
    assert "5 draws (normal, large x1000, zeros, uniform+, uniform-)" in line


def test_optimized_repvgg_block_passes():
    b = GraphBuilder([1, 4, 9, 9])
    y = b.add(b.bn(b.conv(b.x, 4, 4, bias=False), 4), b.bn(b.conv(b.x, 4, 4, k=1, bias=False), 4), b.bn(b.x, 4))
    model = b.build(b.node("Relu", [y]))
    out, _ = onnxrep.optimize(model, verify=False)
    assert len(out.graph.node) == 2
    result = verify(model, out)
    assert result.ok, result.describe()
    assert 0 < result.max_error_ratio < 0.1


# ---- (a) one channel wrong next to a much larger one --------------------------------------


def big_and_small_channels():
    """Conv 4->2 whose channel 0 is 3e4 times channel 1."""
    b = GraphBuilder([1, 4, 8, 8])
    model = b.build(b.conv(b.x, 4, 2))
    conv = conv_node(model)
    w, bias = initializer(model, conv.input[1]), initializer(model, conv.input[2])
    w[0] *= 3e4
    bias[0] *= 3e4
    return with_initializer(with_initializer(model, conv.input[1], w), conv.input[2], bias)


def test_blind_spot_a_zeroed_small_channel_is_caught():
    model = big_and_small_channels()
    conv = conv_node(model)
    w, bias = initializer(model, conv.input[1]), initializer(model, conv.input[2])
    w[1], bias[1] = 0, 0
    wrong = with_initializer(with_initializer(model, conv.input[1], w), conv.input[2], bias)
    assert old_criterion_accepts(model, wrong)
    result = verify(model, wrong)
    assert not result.ok
    assert result.outputs[0].channel == 1 and result.outputs[0].ratio > 10
    assert (result.first_divergence.tensor, result.first_divergence.node) == (conv.output[0], conv.name)
    assert "FAILED verification" in result.describe() and "channel 1" in result.describe()


def test_small_channel_scaled_by_1e_3_is_caught():
    model = big_and_small_channels()
    conv = conv_node(model)
    w = initializer(model, conv.input[1])
    w[1] *= 1e-3
    result = verify(model, with_initializer(model, conv.input[1], w))
    assert not result.ok and result.outputs[0].channel == 1


@pytest.mark.parametrize("factor", [1e-3, 1 + 1e-3, 1 - 1e-3])
def test_one_channel_scaled_is_caught(factor):
    model = two_layer()
    conv = conv_node(model, 1)
    w = initializer(model, conv.input[1])
    w[1] *= factor
    result = verify(model, with_initializer(model, conv.input[1], w))
    assert not result.ok and result.outputs[0].channel == 1


# ---- (b) tiny outputs -------------------------------------------------------------------


def tiny_outputs():
    """A conv whose outputs are ~1e-6 at unit-scale inputs."""
    b = GraphBuilder([1, 4, 8, 8])
    model = b.build(b.conv(b.x, 4, 4))
    conv = conv_node(model)
    for name in conv.input[1:]:
        model = with_initializer(model, name, initializer(model, name) * 1e-7)
    return model


@pytest.mark.parametrize("factor", [-1.0, 0.0, 1 + 1e-3])
def test_blind_spot_b_every_element_of_a_tiny_output_wrong_is_caught(factor):
    model = tiny_outputs()
    x = np.random.default_rng(5).standard_normal((1, 4, 8, 8)).astype(np.float32)
    assert 1e-7 < np.max(np.abs(run(model, {"x": x})[0])) < 1e-5
    conv = conv_node(model)
    wrong = with_initializer(model, conv.input[1], initializer(model, conv.input[1]) * factor)
    if factor != 1 + 1e-3:
        assert old_criterion_accepts(model, wrong)
    result = verify(model, wrong)
    assert not result.ok and result.first_divergence.tensor == conv.output[0]


# ---- (c) errors confined to the border ----------------------------------------------------


def biased_1x1_then_padded_3x3(b1_scale=1e-4, b1=True):
    """x -> Conv1x1 4->4 (bias ~ b1_scale) -> Conv3x3 pad 1 (no bias): not one conv unless b1 = 0,
    because the 3x3 conv pads with zeros, not with b1."""
    b = GraphBuilder([1, 4, 8, 8])
    h = b.conv(b.x, 4, 4, k=1, bias=b1)
    model = b.build(b.conv(h, 4, 4, k=3, bias=False))
    c1, c2 = conv_node(model, 0), conv_node(model, 1)
    if b1:
        model = with_initializer(model, c1.input[2], initializer(model, c1.input[2]) * b1_scale / 0.5)
    return model, c1, c2


def composed_as_if_bias_free(model, c1, c2):
    """The fused conv by the 1x1 -> KxK formula W = W2 . W1, b = sum_taps W2 b1: exact only when
    b1 = 0; otherwise wrong on the border ring, where the original pads with 0 instead of b1."""
    w1 = initializer(model, c1.input[1])[:, :, 0, 0].astype(np.float64)  # [m, i]
    w2 = initializer(model, c2.input[1]).astype(np.float64)  # [o, m, 3, 3]
    b1 = initializer(model, c1.input[2]).astype(np.float64) if len(c1.input) > 2 else np.zeros(w1.shape[0])
    w = np.einsum("omhw,mi->oihw", w2, w1).astype(np.float32)
    bias = np.einsum("omhw,m->o", w2, b1).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W", "B"], [c2.output[0]], name="fused_conv", kernel_shape=[3, 3],
                          pads=[1, 1, 1, 1])],
        "test", list(model.graph.input), list(model.graph.output),
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(bias, "B")])
    out = helper.make_model(graph, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    return out


def test_blind_spot_c_bias_free_formula_on_a_biased_1x1_is_caught_on_the_border():
    model, c1, c2 = biased_1x1_then_padded_3x3()
    wrong = composed_as_if_bias_free(model, c1, c2)
    # wrong only on the border ring, and there by less than 1e-4 of the output's maximum
    x = np.random.default_rng(5).standard_normal((1, 4, 8, 8)).astype(np.float32)
    ref = run(model, {"x": x})[0].astype(np.float64)
    d, peak = np.abs(run(wrong, {"x": x})[0] - ref), np.abs(ref).max()
    interior = d[..., 1:-1, 1:-1].max()
    assert interior < 1e-6 * peak and 10 * interior < d.max() < 1e-4 * peak
    assert old_criterion_accepts(model, wrong)
    result = verify(model, wrong)
    assert not result.ok
    assert result.outputs[0].draw == "zeros"
    assert (result.first_divergence.tensor, result.first_divergence.node) == (c2.output[0], "fused_conv")


def test_the_same_composition_without_the_first_bias_passes():
    model, c1, c2 = biased_1x1_then_padded_3x3(b1=False)
    result = verify(model, composed_as_if_bias_free(model, c1, c2))
    assert result.ok, result.describe()


# ---- (d) right at the verified size only --------------------------------------------------


def dynamic_conv(pads, name="y"):
    """Conv 3x3 stride 2 over an input with dynamic batch, H and W."""
    b = GraphBuilder(["N", 4, "H", "W"])
    w = b.const(b.rand(4, 4, 3, 3), "w")
    b.nodes.append(helper.make_node("Conv", ["x", w], [name], name="conv", kernel_shape=[3, 3], strides=[2, 2],
                                    pads=pads))
    return b.build(name, output_shape=["N", 4, "h", "w"])


def test_blind_spot_d_merge_right_only_at_even_sizes_is_caught_at_the_second_shape():
    model = dynamic_conv([1, 1, 1, 1])
    wrong = dynamic_conv([1, 1, 0, 0])  # same output size and values when H, W are even
    shapes = {"x": [1, 4, 8, 8]}
    assert old_criterion_accepts(model, wrong, shapes)
    result = verify(model, wrong, shapes)
    assert not result.ok
    assert result.shapes == [{"x": [1, 4, 8, 8]}, {"x": [2, 4, 9, 9]}]
    assert result.outputs[0].note == "shape [2, 4, 4, 4] != [2, 4, 5, 5]"
    assert result.outputs[0].inputs == "x=[2,4,9,9]"
    assert verify(model, model, shapes).ok


def test_baked_resize_size_is_caught_at_the_second_shape():
    def model_with(resize_inputs):
        b = GraphBuilder(["N", 4, "H", "W"])
        ins = ["x", ""] + [b.const(np.asarray(v, dt)) for v, dt in resize_inputs]
        b.nodes.append(helper.make_node("Resize", ins, ["y"], name="resize", mode="nearest"))
        return b.build("y", output_shape=["N", 4, "h", "w"])

    model = model_with([([1, 1, 2, 2], np.float32)])  # scales
    baked = model_with([([], np.float32), ([1, 4, 16, 16], np.int64)])  # sizes, right at 8x8 only
    shapes = {"x": [1, 4, 8, 8]}
    assert old_criterion_accepts(model, baked, shapes)
    result = verify(model, baked, shapes)
    assert not result.ok and "shape" in result.outputs[0].note


def test_batch_baked_into_a_reshape_is_caught_at_batch_2():
    def model_with(shape):
        b = GraphBuilder(["N", 4, 3, 3])
        y = b.node("Reshape", [b.node("Relu", [b.x]), b.const(np.asarray(shape, np.int64))])
        return b.build(y, output_shape=["N", 36])

    model, baked = model_with([-1, 36]), model_with([1, 36])
    assert verify(model, model, {"x": [1, 4, 3, 3]}).ok
    result = verify(model, baked, {"x": [1, 4, 3, 3]})
    assert not result.ok and result.shapes[1] == {"x": [2, 4, 3, 3]}


def test_second_shape_falls_back_when_the_original_needs_even_sizes():
    """x + Upsample(AvgPool_s2(x)) only runs at even H, W: d + 1 fails, d + 2 is used."""
    b = GraphBuilder(["N", 4, "H", "W"])
    pooled = b.node("AveragePool", [b.x], kernel_shape=[2, 2], strides=[2, 2])
    up = b.node("Resize", [pooled, "", b.const(np.array([1, 1, 2, 2], np.float32))], mode="nearest")
    model = b.build(b.add(b.x, up), output_shape=["N", 4, "H", "W"])
    result = verify(model, model, {"x": [1, 4, 8, 8]})
    assert result.ok and result.shapes == [{"x": [1, 4, 8, 8]}, {"x": [2, 4, 10, 10]}]
    assert not result.notes


def test_only_one_shape_is_recorded_when_the_original_accepts_no_other():
    b = GraphBuilder(["N", 4, "H", 8])
    y = b.node("Reshape", [b.x, b.const(np.array([1, 4, 8, 8], np.int64))])
    model = b.build(b.node("Relu", [y]), output_shape=[1, 4, 8, 8])
    result = verify(model, model, {"x": [1, 4, 8, 8]})
    assert result.ok and len(result.shapes) == 1
    assert any(n.startswith("only one input shape checked") for n in result.notes)
    assert "only one input shape checked" in result.describe()


def test_second_shapes_change_named_dims_together():
    b = GraphBuilder(["N", 4, "S", "S"])
    model = b.build(b.node("Relu", [b.x]), output_shape=["N", 4, "S", "S"])
    assert second_shapes(model, {"x": [1, 4, 6, 6]}) == [
        {"x": [2, 4, 7, 7]}, {"x": [2, 4, 8, 8]}, {"x": [2, 4, 12, 12]}, {"x": [1, 4, 7, 7]}, {"x": [2, 4, 6, 6]}]
    static = GraphBuilder([1, 4, 6, 6])
    assert second_shapes(static.build(static.node("Relu", [static.x])), {"x": [1, 4, 6, 6]}) == []


def test_candidate_that_fails_to_run_at_the_second_shape_fails_without_a_divergence():
    def model_with(shape):
        b = GraphBuilder([1, 4, "H", 8])
        y = b.node("Reshape", [b.node("Relu", [b.x]), b.const(np.asarray(shape, np.int64))])
        return b.build(b.node("Relu", [y]), output_shape=[1, 4, "H", 8])

    model, baked = model_with([1, 4, -1, 8]), model_with([1, 4, 8, 8])
    result = verify(model, baked, {"x": [1, 4, 8, 8]})
    assert not result.ok and result.first_divergence is None
    assert result.outputs[0].note.startswith("the optimized model fails to run")
    assert "x=[1,4,9,8]" in result.describe()


# ---- tensor by tensor --------------------------------------------------------------------


def _attenuated_error():
    """(model, wrong, first conv): channel 2 of the first conv 1 % off, an error the second
    layer shrinks until it is invisible at the output."""
    model = two_layer(attenuate=2)
    c1 = conv_node(model, 0)
    w = initializer(model, c1.input[1])
    w[2] *= 1.01
    return model, with_initializer(model, c1.input[1], w), c1


def test_error_attenuated_by_later_layers_is_caught_where_it_arises():
    model, wrong, c1 = _attenuated_error()
    outputs_only = verify(model, wrong, compare_tensors=False)
    assert outputs_only.ok  # at the output the error is ~1e-8 of it
    result = verify(model, wrong)
    assert not result.ok and result.outputs[0].ok
    assert (result.first_divergence.tensor, result.first_divergence.node) == (c1.output[0], c1.name)
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    assert [c.name for c in result.diverging] == [c1.output[0], relu.output[0]]
    assert result.diverging[0].channel == 2


def test_first_divergence_is_the_earliest_in_the_candidates_node_order():
    model = two_layer()
    c1, c2 = conv_node(model, 0), conv_node(model, 1)
    bias2 = initializer(model, c2.input[2])
    bias2[0] += 1.0
    wrong = with_initializer(model, c2.input[2], bias2)
    assert verify(model, wrong).first_divergence.node == c2.name
    w1 = initializer(model, c1.input[1])
    w1[3] = 0
    result = verify(model, with_initializer(wrong, c1.input[1], w1))
    assert result.first_divergence.node == c1.name and result.diverging[-1].name == c2.output[0]


def test_tensor_budget_limits_the_intermediates_compared_not_the_outputs():
    model, wrong, _ = _attenuated_error()
    one = Verifier(model, static_shapes(model), "test", tensor_budget=4 * 256 * 5 + 1)  # room for one tap
    result = one.check(wrong)
    assert result.tensors_compared == 2 and not result.ok
    assert any("tensor budget" in n and "1 of 2" in n for n in result.notes)
    none = Verifier(model, static_shapes(model), "test", tensor_budget=0)
    assert none.check(wrong).ok and none.check(wrong).tensors_compared == 1


def test_same_named_tensor_of_another_shape_is_not_compared():
    """A candidate may hold a tensor of the original's name with another shape: another tensor."""
    b = GraphBuilder([1, 4, 6, 6])
    model = b.build(b.node("Relu", [b.conv(b.x, 4, 4)]))
    conv = conv_node(model)
    candidate = onnx.ModelProto()
    candidate.CopyFrom(model)
    conv_node(candidate).output[0] = "pre"
    flat, back = (numpy_helper.from_array(np.array(s, np.int64), n) for s, n in (([1, 4, 36], "flat"), ([1, 4, 6, 6], "back")))
    candidate.graph.initializer.extend([flat, back])
    candidate.graph.node.insert(1, helper.make_node("Reshape", ["pre", "flat"], [conv.output[0]]))
    candidate.graph.node.insert(2, helper.make_node("Reshape", [conv.output[0], "back"], ["unflat"]))
    next(n for n in candidate.graph.node if n.op_type == "Relu").input[0] = "unflat"
    result = verify(model, candidate)
    assert result.ok and result.tensors_compared == 1
    assert "1 same-named tensor(s) of another shape or dtype not compared" in result.notes


def test_tensors_of_unknown_size_are_measured_against_the_budget(monkeypatch):
    import onnxrep.verify as verify_module

    sized = verify_module._tensor_types
    monkeypatch.setattr(verify_module, "_tensor_types",
                        lambda model, shapes: {k: (e, None) for k, (e, _) in sized(model, shapes).items()})
    model = two_layer()
    verifier = Verifier(model, static_shapes(model), "test", tensor_budget=4 * 256 * 5 + 1)
    assert verifier.tensors == [model.graph.output[0].name, conv_node(model).output[0]]
    assert any("1 of 2" in n for n in verifier.check(model).notes)


# ---- the criterion itself ----------------------------------------------------------------


def test_compare_is_per_channel_with_a_floor_relative_to_the_tensor():
    ref = np.zeros((1, 2, 4, 4), np.float32)
    ref[:, 0] = 100.0
    ref[:, 1] = 1.0
    y = ref.copy()
    y[:, 1] *= 1 + 5e-4
    c = compare(y, ref, 1e-4, 1e-6)
    assert not c.ok and c.channel == 1
    assert c.allowed == pytest.approx(1e-4 * 1.0 + 1e-6 * 100.0)
    y[:, 1] = ref[:, 1] * (1 + 5e-5)
    assert compare(y, ref, 1e-4, 1e-6).ok
    # a channel that is zero in the reference gets the floor only
    ref[:, 1] = 0
    y = ref.copy()
    y[:, 1] = 5e-5
    assert compare(y, ref, 1e-4, 1e-6).ok  # 5e-5 <= 1e-6 * 100
    y[:, 1] = 2e-4
    assert not compare(y, ref, 1e-4, 1e-6).ok
    # an absolute floor replaces the relative one
    assert compare(y, ref, 1e-4, 1e-6, atol=0.1).ok


def test_compare_floor_covers_rounding_of_a_tensor_that_is_zero_at_this_draw():
    """y - v is ~0 at the zeros draw; its rounding is relative to what it holds at other draws."""
    ref = np.full((1, 2, 3, 3), 1e-11, np.float32)
    y = np.full((1, 2, 3, 3), 1.2e-7, np.float32)
    assert not compare(y, ref, 1e-4, 1e-6).ok
    assert compare(y, ref, 1e-4, 1e-6, scale=1.0).ok
    assert not compare(y * 100, ref, 1e-4, 1e-6, scale=1.0).ok


def test_compare_non_finite_values_must_match_in_position_and_kind():
    ref = np.array([[1.0, np.inf, np.nan, -np.inf]], np.float32)
    assert compare(ref.copy(), ref, 1e-4, 1e-6).ok
    for bad in ([1.0, -np.inf, np.nan, -np.inf], [1.0, np.inf, 0.0, -np.inf], [1.0, np.inf, np.nan, 1e30],
                [np.nan, np.inf, np.nan, -np.inf]):
        c = compare(np.array([bad], np.float32), ref, 1e-4, 1e-6)
        assert not c.ok and c.note == "non-finite values differ"


def test_compare_integers_exactly_and_rejects_another_shape_or_dtype():
    ref = np.array([[3, 1000]], np.int64)
    assert compare(ref.copy(), ref, 1e-4, 1e-6).ok
    assert not compare(ref + np.array([[0, 1]]), ref, 1e-4, 1e-6).ok
    assert compare(np.zeros((2, 3)), np.zeros((3, 2)), 1e-4, 1e-6).note == "shape [2, 3] != [3, 2]"
    assert "dtype" in compare(np.zeros(2, np.float16), np.zeros(2, np.float32), 1e-4, 1e-6).note


def test_non_finite_outputs_in_other_positions_are_caught():
    b = GraphBuilder([1, 2, 4, 4])
    model = b.build(b.node("Log", [b.x]))
    b2 = GraphBuilder([1, 2, 4, 4])
    wrong = b2.build(b2.node("Log", [b2.node("Abs", [b2.x])]))
    wrong.graph.output[0].name = model.graph.output[0].name
    wrong.graph.node[-1].output[0] = model.graph.output[0].name
    assert verify(model, model).ok  # NaN (x < 0) and -inf (zeros draw) in the same places
    result = verify(model, wrong)
    assert not result.ok and "non-finite" in result.outputs[0].note


def test_renamed_output_fails():
    model = two_layer()
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    renamed.graph.output[0].name = "other"
    renamed.graph.node[-1].output[0] = "other"
    result = verify(model, renamed)
    assert not result.ok and "output names changed" in result.describe()


# ---- tolerances by computation dtype, draws ------------------------------------------------


def keep_io_types_fp16():
    """fp32 input and output, fp16 inside (Cast, fp16 conv, Cast back)."""
    b = GraphBuilder([1, 4, 6, 6], dtype=np.float16)
    b.inputs[0] = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])
    b.nodes.append(helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16))
    y = b.conv("x16", 4, 4)
    b.nodes.append(helper.make_node("Cast", [y], ["y"], to=TensorProto.FLOAT))
    model = b.build("y", output_shape=[1, 4, 6, 6])
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT
    return model


def test_fp16_computation_with_fp32_io_gets_fp16_tolerances():
    model = keep_io_types_fp16()
    assert computation_dtype(model) == "float16"
    verifier = Verifier(model, static_shapes(model), "test")
    assert (verifier.rtol, verifier.floor_rel, verifier.atol) == (1e-2, 1e-3, None)
    result = verifier.check(model)
    assert result.ok and result.dtype == "float16" and "large x100" in result.describe()
    conv = conv_node(model)
    w = initializer(model, conv.input[1])
    w[1] *= 1.03
    assert not verifier.check(with_initializer(model, conv.input[1], w)).ok


def test_computation_dtype_is_the_lowest_float_precision():
    b = GraphBuilder([1, 4, 6, 6])
    model = b.build(b.conv(b.x, 4, 4))
    assert computation_dtype(model) == "float32"
    model.graph.node.append(helper.make_node("Cast", [model.graph.output[0].name], ["bf"], to=TensorProto.BFLOAT16))
    assert computation_dtype(model) == "bfloat16"
    assert TOLERANCES["bfloat16"][0] > TOLERANCES["float16"][0] > TOLERANCES["float32"][0]


def test_rtol_and_atol_override_the_defaults():
    model = tiny_outputs()
    conv = conv_node(model)
    wrong = with_initializer(model, conv.input[1], initializer(model, conv.input[1]) * 1.5)
    assert not verify(model, wrong, rtol=0.4).ok
    assert verify(model, wrong, rtol=0.6).ok
    loose = verify(model, wrong, atol=0.1)
    assert loose.ok and loose.atol == 0.1 and "+ 0.1 per channel" in loose.criterion()


def test_default_draws_cover_every_kind_once():
    model = two_layer()
    verifier = Verifier(model, static_shapes(model), "test")
    assert DEFAULT_DRAWS == len(DRAW_KINDS) == 5 and verifier.draw_kinds == list(DRAW_KINDS)
    feeds = verifier.feeds[0]
    assert len(feeds) == 5
    x = [f["x"] for f in feeds]
    assert 100 < np.abs(x[1]).max() < 1e4  # large
    assert not x[2].any()  # zeros
    assert x[3].min() >= 0 and x[4].max() <= 0
    assert not any(isinstance(v, ort.InferenceSession) for v in vars(verifier).values())
    assert Verifier(model, static_shapes(model), "test", draws=3).draw_kinds == ["normal", "large", "zeros"]


def test_integer_inputs_are_drawn_as_before():
    b = GraphBuilder([1, 4])
    b.inputs.append(helper.make_tensor_value_info("i", TensorProto.INT64, [1, 4]))
    y = b.node("Add", [b.x, b.node("Cast", ["i"], to=TensorProto.FLOAT)])
    model = b.build(y)
    verifier = Verifier(model, {"x": [1, 4], "i": [1, 4]}, "test")
    assert all(f["i"].dtype == np.int64 and 0 <= f["i"].min() <= f["i"].max() < 8 for f in verifier.feeds[0])
    assert verifier.check(model).ok


# ---- the fixtures, with the default draws ------------------------------------------------


with open(os.path.join(MODELS, "manifest.json")) as f:
    MANIFEST = json.load(f)


@pytest.mark.parametrize("entry", MANIFEST, ids=[e["file"] for e in MANIFEST])
def test_every_fixture_passes_the_default_verification_without_rollback(entry):
    out, report = onnxrep.optimize(os.path.join(MODELS, entry["file"]), verify_draws=DEFAULT_DRAWS)
    v = report.verification
    assert v.ok and not report.rolled_back, v.describe()
    assert len(v.shapes) == 2  # every fixture has a dynamic batch: batch 1 and 2
    assert v.tensors_compared > 1 and not v.notes
    assert v.max_error_ratio < 0.25, v.describe()  # well inside the tolerance, not at its edge



@pytest.mark.parametrize("shape", [(), (1,), (5,)], ids=["scalar", "one", "vector"])
def test_compare_tensors_of_rank_below_two(shape):
    """A scalar intermediate (a mean, a norm) is compared like any tensor, as one channel."""
    ref = np.full(shape, 2.0, np.float32)
    assert compare(ref.copy(), ref, 1e-4, 1e-6).ok
    off = ref + np.float32(1e-2)
    cmp = compare(off, ref, 1e-4, 1e-6)
    assert not cmp.ok and cmp.channel is None and cmp.error == pytest.approx(1e-2, rel=1e-3)


def test_scalar_intermediate_tensor_is_compared_in_a_candidate():
    """A graph with a 0-d intermediate (ReduceMean to a scalar, keepdims=0) verifies: the
    tensor-by-tensor comparison used to fail on it with an IndexError."""
    b = GraphBuilder([1, 4, 6, 6])
    y = b.bn(b.conv(b.x, 4, 4, k=3, bias=False), 4)
    m = b.node("ReduceMean", [y], keepdims=0)
    out = b.node("Mul", [y, m])
    model = b.build(out)
    optimized, report = onnxrep.optimize(model)
    assert report.verification.ok
    assert ops(optimized)["BatchNormalization"] == 0


# ---- the original's own rounding noise (docs/verification.md, "Rounding noise") ----------


def cancelling_model():
    """y = (x + 1e4) - 1e4: the original rounds x to float32's grid at 1e4 (steps of 1e-3), so
    the exact candidate y = x differs from it by up to ~5e-4, more than 1e-4 of max|y| ~ 4."""
    b = GraphBuilder([1, 3, 8, 8])
    big = b.const(np.full((3, 1, 1), 1e4, np.float32))
    return b.build(b.node("Sub", [b.node("Add", [b.x, big]), big]))


def candidate_of(reference, scale=None):
    """y = x (exactly what the reference means), or y = x * scale per channel."""
    b = GraphBuilder([1, 3, 8, 8])
    y = b.node("Mul", [b.x, b.const(np.ones((3, 1, 1), np.float32) if scale is None else
                                    np.asarray(scale, np.float32).reshape(3, 1, 1))])
    model = b.build(y)
    model.graph.output[0].name = reference.graph.output[0].name
    model.graph.node[-1].output[0] = reference.graph.output[0].name
    return model


def test_a_difference_within_the_originals_own_rounding_noise_passes():
    reference = cancelling_model()
    assert not verify(reference, candidate_of(reference), atol=1e-6).ok  # beyond the plain criterion
    result = verify(reference, candidate_of(reference))
    assert result.ok, result.describe()
    assert any("rounding noise" in note for note in result.notes)


@pytest.mark.parametrize("scale", [[1.01, 1, 1], [1, 1, 1.002]])
def test_a_real_error_in_a_noisy_original_is_still_caught(scale):
    # the noise floor there is ~2.4e-3 (1e4 * 2^-22), capped at 1e-3 of the channel's magnitude
    reference = cancelling_model()
    result = verify(reference, candidate_of(reference, scale))
    assert not result.ok
    assert result.outputs[0].channel == int(np.argmax(np.abs(np.array(scale) - 1)))


def test_the_noise_of_a_well_conditioned_original_hides_no_error():
    # a wrong candidate of a plain conv: the noise measured there is ~1e-7 and changes nothing
    b = GraphBuilder([1, 3, 6, 6])
    reference = b.build(b.conv(b.x, 3, 4))
    wrong = onnx.ModelProto()
    wrong.CopyFrom(reference)
    w = numpy_helper.to_array(wrong.graph.initializer[0]).copy()
    w[1] *= 1.001
    wrong.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, wrong.graph.initializer[0].name))
    result = verify(reference, wrong)
    assert not result.ok and result.outputs[0].channel == 1


def test_the_noise_allowance_is_capped_relative_to_the_channel():
    ref = np.ones((1, 2, 3, 3), np.float32)
    y = ref.copy()
    y[0, 1] += 5e-3
    huge = np.array([1e9, 1e9])
    assert not compare(y, ref, 1e-4, 1e-6, noise=huge).ok  # cap: 1e-4 * (1 + 10) + 1e-6
    y[0, 1] = 1 + 1e-3
    assert compare(y, ref, 1e-4, 1e-6, noise=huge).ok
    assert not compare(y, ref, 1e-4, 1e-6, noise=np.zeros(2)).ok


def test_perturbed_original_keeps_names_and_moves_values_by_the_amplitude():
    from onnxrep.verify import _tensor_types, perturbed
    reference = cancelling_model()
    before = reference.SerializeToString()
    model = perturbed(reference, _tensor_types(reference, static_shapes(reference)), 2.0 ** -10, seed=0)
    assert reference.SerializeToString() == before
    assert [o.name for o in model.graph.output] == [o.name for o in reference.graph.output]
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    (y_ref,), (y,) = run(reference, {"x": x}), run(model, {"x": x})
    assert 0 < np.abs(y - y_ref).max() <= 2 * 2.0 ** -10 * 1e4 * 1.01


def test_atol_given_by_the_user_leaves_the_noise_unmeasured():
    reference = cancelling_model()
    result = verify(reference, candidate_of(reference), atol=1e-6)
    assert not result.ok and not any("rounding noise" in note for note in result.notes)
