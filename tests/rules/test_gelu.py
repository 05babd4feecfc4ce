"""canonicalize_gelu: dynamo's GELU spelling becomes the one onnxruntime fuses, bit-exactly."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxrep
from helpers import GraphBuilder, ops, run

RULE = ["canonicalize_gelu"]
SQRT2 = 1.4142135623730951


def dynamo_gelu(b: GraphBuilder, x: str, swap: bool = False, inverse: bool = False, half: float = 0.5) -> str:
    """x * (0.5 * (1 + erf(x / sqrt2))) as torch.onnx.export(dynamo=True) writes it."""
    c = lambda v: b.const(np.float32(v))  # noqa: E731
    scaled = b.node("Mul", [x, c(1 / SQRT2)]) if inverse else b.node("Div", [x, c(SQRT2)])
    s = b.node("Add", [c(1.0), b.node("Erf", [scaled])] if swap else [b.node("Erf", [scaled]), c(1.0)])
    m = b.node("Mul", [c(half), s] if not swap else [s, c(half)])
    return b.node("Mul", [x, m] if not swap else [m, x])


def fused_ops(model: onnx.ModelProto, tmp_path) -> list:
    """The op types onnxruntime runs after its own graph optimizations."""
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "fused.onnx")
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "fused.onnx")).graph.node]


@pytest.mark.parametrize("swap, inverse", [(False, False), (True, False), (False, True)])
def test_dynamo_gelu_becomes_the_fused_form(tmp_path, swap, inverse):
    b = GraphBuilder([1, 4, 6, 6])
    y = b.conv(dynamo_gelu(b, b.conv(b.x, 4, 4, k=3), swap, inverse), 4, 4, k=1)
    model = b.build(y)
    out, report = onnxrep.optimize(model, only=RULE)
    assert report.rules_applied() == {"canonicalize_gelu": 1}
    assert "Gelu" not in fused_ops(model, tmp_path)
    assert fused_ops(out, tmp_path).count("Gelu") == 1
    x = {"x": np.random.default_rng(0).standard_normal((1, 4, 6, 6)).astype(np.float32) * 3}
    ref, got = run(model, x)[0], run(out, x)[0]
    if inverse:  # x * (1/sqrt2) became x / sqrt2: equal within a rounding
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    else:
        assert np.array_equal(got, ref)  # multiplying by 0.5 is exact: bit-identical


def test_not_gelu_is_left_alone():
    b = GraphBuilder([1, 4, 6, 6])
    model = b.build(dynamo_gelu(b, b.x, half=0.6))
    out, report = onnxrep.optimize(model, only=RULE)
    assert ops(out) == ops(model) and not report.rewrites


def test_gelu_whose_intermediate_escapes_is_left_alone():
    b = GraphBuilder([1, 4, 6, 6])
    y = dynamo_gelu(b, b.x)
    erf = next(n.output[0] for n in b.nodes if n.op_type == "Erf")
    b.mark_output(erf)
    model = b.build(y)
    out, report = onnxrep.optimize(model, only=RULE)
    assert ops(out) == ops(model)
    assert any("graph output" in d.reason for d in report.declines), report.declines
