"""Odd numerics in valid models: bfloat16 weights, BatchNormalization with spatial=0, a zero
variance with epsilon 0, folded values that overflow float16. Each gets a result or a
declined match with a reason, never a crash or a printed warning."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxrep
from helpers import GraphBuilder, assert_equal_per_channel, ops, run


def _repvgg_block(shape=(1, 4, 6, 6)):
    b = GraphBuilder(list(shape))
    return b, b.add(b.bn(b.conv(b.x, 4, 4, k=3), 4), b.bn(b.conv(b.x, 4, 4, k=1), 4), b.bn(b.x, 4))


def _retyped(model: onnx.ModelProto, elem: int) -> onnx.ModelProto:
    """The model with every float32/bfloat16 initializer and graph input/output stored as ``elem``."""
    floats = (TensorProto.FLOAT, TensorProto.BFLOAT16)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.data_type in floats:
            a = numpy_helper.to_array(t).astype(np.float32)
            t.CopyFrom(helper.make_tensor(t.name, elem, a.shape, a.reshape(-1).tolist()))
    for v in list(out.graph.input) + list(out.graph.output) + list(out.graph.value_info):
        if v.type.tensor_type.elem_type in floats:
            v.type.tensor_type.elem_type = elem
    return out


def test_bfloat16_weights_fold_in_float64_and_stay_bfloat16():
    b, y = _repvgg_block()
    model = _retyped(b.build(y), TensorProto.BFLOAT16)
    out, report = onnxrep.optimize(model, verify=False)  # onnxruntime's CPU Conv has no bfloat16
    assert ops(out) == {"Conv": 1}
    assert {t.data_type for t in out.graph.initializer} == {TensorProto.BFLOAT16}
    # compare both in float32: the fold is exact up to bfloat16 rounding of the new weights
    feeds = {"x": np.random.default_rng(3).standard_normal((1, 4, 6, 6)).astype(np.float32)}
    assert_equal_per_channel(_retyped(model, TensorProto.FLOAT), _retyped(out, TensorProto.FLOAT), feeds, rtol=3e-2)


def test_bfloat16_model_that_cannot_be_verified_is_one_clear_error():
    b, y = _repvgg_block()
    model = _retyped(b.build(y), TensorProto.BFLOAT16)
    with pytest.raises(onnxrep.OnnxrepError, match="cannot be verified") as info:
        onnxrep.optimize(model)
    assert "\n" not in str(info.value)


def test_float16_overflow_of_a_folded_weight_declines():
    b = GraphBuilder([1, 4, 6, 6], dtype=np.float16)
    c = b.conv(b.x, 4, 4, k=3)
    # a BN whose scale is ~1e5: the folded weights overflow float16 (max 65504)
    ins = [c] + [b.const(np.full(4, v, np.float16)) for v in (1.0, 0.0, 0.0, 1e-10)]
    y = b.node("BatchNormalization", ins, epsilon=0.0)
    model = b.build(y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, report = onnxrep.optimize(model, verify=False)
    assert ops(out) == ops(model)
    assert any("not finite" in d.reason for d in report.declines), report.declines


def test_zero_variance_with_epsilon_zero_declines_without_a_warning():
    b = GraphBuilder([1, 4, 6, 6])
    c = b.conv(b.x, 4, 4, k=3)
    ins = [c] + [b.const(np.asarray(v, np.float32)) for v in ([1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 1, 1])]
    model = b.build(b.node("BatchNormalization", ins, epsilon=0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a numpy RuntimeWarning would fail the test
        out, report = onnxrep.optimize(model)
    assert ops(out) == {"Conv": 1, "BatchNormalization": 1}
    assert any("not finite" in d.reason for d in report.declines), report.declines
    assert report.verification.ok


def _spatial0_bn(b: GraphBuilder, x: str, c: int, hw, vary: bool) -> str:
    rng = np.random.default_rng(4)
    params = []
    for lo, hi in ((0.5, 1.5), (-1, 1), (-1, 1), (0.5, 2.0)):
        v = rng.uniform(lo, hi, (c, 1, 1)) * np.ones((1,) + tuple(hw))
        if vary:
            v = v + rng.uniform(0, 0.1, v.shape)
        params.append(b.const(v.astype(np.float32)))
    return b.node("BatchNormalization", [x, *params], spatial=0, epsilon=1e-3)


@pytest.mark.parametrize("vary", [False, True])
def test_batchnorm_spatial_0_folds_only_when_per_channel(vary):
    b = GraphBuilder([1, 4, 5, 5])
    y = _spatial0_bn(b, b.conv(b.x, 4, 4, k=3), 4, (5, 5), vary)
    model = b.build(y, opset=8)
    out, report = onnxrep.optimize(model)
    if vary:
        assert ops(out) == {"Conv": 1, "BatchNormalization": 1}
        assert any("varies over space" in d.reason for d in report.declines), report.declines
    else:
        assert ops(out) == {"Conv": 1}
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 4, 5, 5)).astype(np.float32)}
    assert_equal_per_channel(model, out, feeds)
    assert run(out, feeds)[0].shape == (1, 4, 5, 5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_a_constant_that_is_not_finite_anywhere_is_refused(dtype, bad):
    """RepGraph.constant's finiteness check finds one bad value among many, in every float dtype
    (it looks at the extremes instead of making a copy as large as the weight)."""
    import ml_dtypes

    from onnxrep.errors import Decline
    from onnxrep.graph import RepGraph
    from onnxrep.normalize import import_graph

    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    b = GraphBuilder([1, 2, 4, 4])
    g = RepGraph(import_graph(b.build(b.node("Relu", [b.x]))))
    values = np.linspace(-3, 3, 1000)
    assert g.constant("ok", values, np_dtype).values.dtype == np_dtype
    values[617] = bad
    with pytest.raises(Decline, match="not finite"):
        g.constant("bad", values, np_dtype)
