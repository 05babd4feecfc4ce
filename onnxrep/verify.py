"""Verification of a candidate model against the original with onnxruntime (docs/verification.md).

Both models run with every onnxruntime graph optimization disabled, so the runtime's own
fusions cannot make the reference look like the candidate. Inputs are seeded random draws at
the resolved input shapes, alternating standard normal and positive uniform [0, 1). For every
output and draw the pass condition is

    max|y - y_ref| <= atol + rtol * max|y_ref|

Default tolerances: float32 rtol 1e-4, atol 1e-5; float16 (any fp16 output) rtol 1e-2, atol 1e-3.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx
import onnxruntime as ort

from . import modelio
from .errors import OnnxrepError, first_line

FP32_TOL = (1e-4, 1e-5)  # (rtol, atol)
FP16_TOL = (1e-2, 1e-3)


@dataclass
class OutputCheck:
    name: str
    max_abs_error: float
    allowed: float
    ok: bool
    note: str = ""


@dataclass
class VerifyResult:
    ok: bool
    rtol: float
    atol: float
    draws: int
    outputs: List[OutputCheck] = field(default_factory=list)

    @property
    def max_abs_error(self) -> float:
        return max((o.max_abs_error for o in self.outputs), default=0.0)

    def describe(self) -> str:
        worst = max(self.outputs, key=lambda o: o.max_abs_error / max(o.allowed, 1e-300), default=None)
        if worst is None:
            return "no outputs compared"
        status = "verified" if self.ok else "FAILED verification"
        extra = f" ({worst.note})" if worst.note else ""
        return (
            f"{status}: max |error| {worst.max_abs_error:.2e} on '{worst.name}', allowed {worst.allowed:.2e} "
            f"(atol {self.atol:g} + rtol {self.rtol:g} * max|ref|), {self.draws} draws{extra}"
        )


def _session(model: onnx.ModelProto, label: str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    try:
        return modelio.session(model, opts)
    except Exception as exc:
        raise OnnxrepError(
            f"{label}: onnxruntime cannot run this model, so it cannot be verified ({first_line(exc)}); "
            "--no-verify skips verification"
        ) from None


_NP_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def make_inputs(session: ort.InferenceSession, shapes: Dict[str, List[int]], draws: int, seed: int, label: str):
    rng = np.random.default_rng(seed)
    feeds = []
    for i in range(draws):
        feed = {}
        for inp in session.get_inputs():
            dtype = _NP_TYPES.get(inp.type)
            if dtype is None:
                raise OnnxrepError(f"{label}: input '{inp.name}' has type {inp.type}, which verification cannot draw")
            shape = shapes[inp.name]
            if np.issubdtype(dtype, np.floating):
                x = rng.standard_normal(shape) if i % 2 == 0 else rng.uniform(0.0, 1.0, shape)
            elif dtype is np.bool_:
                x = rng.integers(0, 2, shape)
            else:
                x = rng.integers(0, 8, shape)
            feed[inp.name] = np.asarray(x).astype(dtype)
        feeds.append(feed)
    return feeds


def default_tolerances(model: onnx.ModelProto) -> Tuple[float, float]:
    fp16 = any(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for o in model.graph.output)
    return FP16_TOL if fp16 else FP32_TOL


class Verifier:
    """Runs the reference once per draw and compares candidates against those outputs."""

    def __init__(
        self,
        reference: onnx.ModelProto,
        shapes: Dict[str, List[int]],
        label: str,
        rtol: Optional[float] = None,
        atol: Optional[float] = None,
        draws: int = 3,
        seed: int = 0,
    ):
        if draws < 1:
            raise OnnxrepError(f"{label}: --verify-draws must be at least 1")
        d_rtol, d_atol = default_tolerances(reference)
        self.rtol = d_rtol if rtol is None else float(rtol)
        self.atol = d_atol if atol is None else float(atol)
        self.label = label
        self.draws = draws
        session = _session(reference, label)
        self.output_names = [o.name for o in session.get_outputs()]
        self.feeds = make_inputs(session, shapes, draws, seed, label)
        try:
            self.expected = [session.run(None, feed) for feed in self.feeds]
        except Exception as exc:
            raise OnnxrepError(f"{label}: onnxruntime failed to run the original model ({first_line(exc)})") from None

    def check(self, candidate: onnx.ModelProto) -> VerifyResult:
        session = _session(candidate, f"{self.label} (optimized)")
        names = [o.name for o in session.get_outputs()]
        result = VerifyResult(ok=True, rtol=self.rtol, atol=self.atol, draws=self.draws)
        if names != self.output_names:
            result.ok = False
            result.outputs.append(OutputCheck(",".join(names), float("inf"), 0.0, False, "output names changed"))
            return result
        worst: Dict[str, OutputCheck] = {}
        for feed, expected in zip(self.feeds, self.expected):
            got = session.run(None, feed)
            for name, y, ref in zip(names, got, expected):
                check = _compare(name, np.asarray(y), np.asarray(ref), self.rtol, self.atol)
                prev = worst.get(name)
                if prev is None or (prev.ok and not check.ok) or (prev.ok == check.ok and check.max_abs_error > prev.max_abs_error):
                    worst[name] = check
        result.outputs = list(worst.values())
        result.ok = all(o.ok for o in result.outputs)
        return result


def _compare(name: str, y: np.ndarray, ref: np.ndarray, rtol: float, atol: float) -> OutputCheck:
    if y.shape != ref.shape:
        return OutputCheck(name, float("inf"), 0.0, False, f"shape {y.shape} != {ref.shape}")
    if y.dtype != ref.dtype:
        return OutputCheck(name, float("inf"), 0.0, False, f"dtype {y.dtype} != {ref.dtype}")
    if y.size == 0:
        return OutputCheck(name, 0.0, atol, True)
    yf, rf = y.astype(np.float64), ref.astype(np.float64)
    finite = np.isfinite(rf)
    if not np.array_equal(np.isfinite(yf), finite) or not np.array_equal(np.isnan(yf), np.isnan(rf)):
        return OutputCheck(name, float("inf"), 0.0, False, "non-finite values differ")
    err = float(np.max(np.abs(yf[finite] - rf[finite]), initial=0.0))
    allowed = atol + rtol * float(np.max(np.abs(rf[finite]), initial=0.0))
    return OutputCheck(name, err, allowed, err <= allowed)
