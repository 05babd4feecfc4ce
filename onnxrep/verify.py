"""Verification of a candidate model against the original with onnxruntime (docs/verification.md).

See docs/verification.md for the reasoning; in short:

* Both models run with every onnxruntime graph optimization disabled, so the runtime's own
  fusions cannot make the reference look like the candidate.
* Criterion, for every compared tensor, draw and channel c (axis 1 when rank >= 2, else the
  whole tensor)::

      max|y_c - ref_c| <= rtol * max|ref_c| + floor,   floor = floor_rel * max|ref|

  ``max|ref|`` is over the whole tensor (at this draw, or at the unit-scale draws when larger),
  so the floor only matters for channels that are (near) zero next to the others; ``atol``
  replaces it by an absolute floor. Non-finite values must match in position and kind; integer
  and bool tensors must match exactly. Defaults follow the computation dtype
  (:func:`computation_dtype`), see :data:`TOLERANCES`.
* Draws: a fixed seed; float inputs cycle through :data:`DRAW_KINDS`; the default count
  (:data:`DEFAULT_DRAWS`) covers each kind once.
* Shapes: the resolved input shapes and, when an input has a dynamic dim, a second shape the
  original accepts (:func:`second_shapes`).
* Tensor by tensor: every float tensor produced by a node of the original is also compared
  wherever the candidate has a tensor of that name, within :func:`default_tensor_budget` of stored
  reference values; the first diverging one in the candidate's node order is reported with the
  node that produces it.
"""

from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper, shape_inference

from . import modelio, store
from .store import StoredModel
from .errors import OnnxrepError, first_line

#: (rtol, floor_rel) by computation dtype. float16: 1e-2 is about ten float16 ulps (eps 2^-10)
#: of headroom for the reference's own branch-by-branch rounding. bfloat16 rounds 8x coarser
#: (eps 2^-7); keeping ten ulps would accept an 8 % error, so it gets 5e-2 (six ulps), which
#: still rejects a channel that is 5 % off. float64 models get the float32 criterion.
TOLERANCES: Dict[str, Tuple[float, float]] = {
    "float64": (1e-4, 1e-6),
    "float32": (1e-4, 1e-6),
    "float16": (1e-2, 1e-3),
    "bfloat16": (5e-2, 5e-3),
}

#: Float input draws, in the order they are used. The first three are the most different from
#: each other (unit scale, weights dominating biases, biases and borders alone), so a small
#: --verify-draws keeps them; the uniform draws drive sign-dependent ops fully on and off.
DRAW_KINDS = ("normal", "large", "zeros", "uniform+", "uniform-")
DEFAULT_DRAWS = len(DRAW_KINDS)
#: Scale of the "large" draw (standard normal times this); float16 overflows above 65504.
LARGE_SCALE = {"float16": 1e2}
LARGE_SCALE_DEFAULT = 1e3
#: The original's own rounding noise (docs/verification.md, "Rounding noise"): measured once,
#: when a check first fails, by running the original with every float tensor a node produces
#: scaled by 1 +- NOISE_AMPLITUDE (a random sign per tensor; a few units in the last place of its
#: dtype), NOISE_REALIZATIONS times. A channel may then also differ by NOISE_FACTOR times the
#: largest change seen there, at most NOISE_CAP x rtol of its magnitude.
NOISE_AMPLITUDE = {"float64": 2.0 ** -50, "float32": 2.0 ** -22, "float16": 2.0 ** -9, "bfloat16": 2.0 ** -6}
NOISE_REALIZATIONS = 2
NOISE_FACTOR = 2.0
NOISE_CAP = 10.0
#: Reference values of intermediate tensors kept for the tensor-by-tensor comparison, over all
#: draws and shapes together: half the model's weights, within these bounds, so that they
#: never dominate the memory a run needs (docs/verification.md). Graph outputs are always
#: compared and not counted.
TENSOR_BUDGET_MIN_BYTES = 64 << 20
TENSOR_BUDGET_MAX_BYTES = 256 << 20


def default_tensor_budget(model: onnx.ModelProto) -> int:
    """The budget for ``model``'s intermediate tensors (see TENSOR_BUDGET_MIN_BYTES)."""
    weights = 0
    for t in model.graph.initializer:
        try:
            size = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        except (KeyError, TypeError, ValueError):  # strings and the like: not weights
            continue
        weights += math.prod(t.dims) * size
    return int(min(TENSOR_BUDGET_MAX_BYTES, max(TENSOR_BUDGET_MIN_BYTES, weights // 2)))

_FLOAT_TYPES = {
    TensorProto.DOUBLE: "float64",
    TensorProto.FLOAT: "float32",
    TensorProto.FLOAT16: "float16",
    TensorProto.BFLOAT16: "bfloat16",
}
_PRECISION = ("bfloat16", "float16", "float32", "float64")  # lowest first
_LIGHT_TENSOR = 4096  # initializers up to this many elements keep their values for inference


@dataclass
class TensorCheck:
    """How one tensor compared, over all draws and shapes (the worst draw is described)."""

    name: str
    #: largest |y - ref| anywhere in the tensor at the draws of unit scale (all but "large",
    #: whose absolute errors grow with its inputs and are judged relatively only)
    max_abs_error: float
    #: allowance of the deciding channel at the deciding draw: rtol * max|ref_c| + floor
    allowed: float
    ok: bool
    note: str = ""
    #: max |y_c - ref_c| of the deciding channel (the one with the largest error / allowed)
    error: float = 0.0
    ratio: float = 0.0  # error / allowed (> 1: fails)
    channel: Optional[int] = None  # None: compared as one (rank < 2)
    draw: str = ""  # kind of the deciding draw
    inputs: str = ""  # input shapes of the deciding draw
    node: Optional[str] = None  # candidate node producing the tensor (None: an initializer)


#: The name used before per-tensor checks existed.
OutputCheck = TensorCheck


@dataclass
class Divergence:
    """A tensor present in both models whose values differ, and the candidate node making it."""

    tensor: str
    node: Optional[str]  # None when the candidate holds the tensor as an initializer
    op_type: Optional[str] = None


@dataclass
class VerifyResult:
    ok: bool
    rtol: float
    #: absolute floor when given (--atol); None: the floor is floor_rel * max|ref| per tensor
    atol: Optional[float]
    draws: int  # draws per input shape
    floor_rel: float = 0.0
    dtype: str = "float32"  # computation dtype the default tolerances were chosen for
    draw_kinds: List[str] = field(default_factory=list)
    #: the input shapes every draw ran at (the resolved ones first)
    shapes: List[Dict[str, List[int]]] = field(default_factory=list)
    outputs: List[TensorCheck] = field(default_factory=list)
    #: tensors compared: graph outputs plus intermediate tensors present in both models
    tensors_compared: int = 0
    #: every tensor that differs, in the candidate's node order (initializers first)
    diverging: List[TensorCheck] = field(default_factory=list)
    first_divergence: Optional[Divergence] = None
    #: the tensor closest to (or furthest over) its tolerance, intermediates included
    worst_tensor: Optional[TensorCheck] = None
    notes: List[str] = field(default_factory=list)

    @property
    def max_abs_error(self) -> float:
        """Largest |y - y_ref| over the graph outputs at the unit-scale draws."""
        return max((o.max_abs_error for o in self.outputs), default=0.0)

    @property
    def max_error_ratio(self) -> float:
        """Largest error / allowed over the graph outputs (1.0: at the tolerance)."""
        return max((o.ratio for o in self.outputs), default=0.0)

    @property
    def max_tensor_ratio(self) -> float:
        """Largest error / allowed over every tensor compared."""
        return self.worst_tensor.ratio if self.worst_tensor is not None else 0.0

    def criterion(self) -> str:
        floor = f"{self.atol:g}" if self.atol is not None else f"{self.floor_rel:g} * max|ref|"
        return f"max|y_c - ref_c| <= {self.rtol:g} * max|ref_c| + {floor} per channel ({self.dtype})"

    def describe(self) -> str:
        """One line: verdict, the deciding tensor, the criterion, draws and shapes."""
        scope = (
            f"{len(self.outputs)} output(s) and {max(self.tensors_compared - len(self.outputs), 0)} "
            f"intermediate tensor(s); {self.criterion()}; {self.draws} draws "
            f"({', '.join(self.draw_kinds)}) at {len(self.shapes)} input shape(s)"
        )
        notes = "".join(f"; {n}" for n in self.notes)
        if not self.outputs and not self.diverging:
            return f"{'verified' if self.ok else 'FAILED verification'}: no outputs compared{notes}"
        if self.ok:
            worst = max(self.outputs, key=lambda o: o.ratio)
            where = f"'{worst.name}'" + (f" channel {worst.channel}" if worst.channel is not None else "")
            return (
                f"verified: {scope}; worst {worst.ratio:.1%} of allowed "
                f"(|error| {worst.error:.2e} on {where}, {worst.draw} draw){notes}"
            )
        bad = self.diverging[0] if self.diverging else next(o for o in self.outputs if not o.ok)
        node = f" (node '{bad.node}')" if bad.node else ""
        chan = f" channel {bad.channel}" if bad.channel is not None else ""
        detail = bad.note or f"max |error| {bad.error:.2e}, allowed {bad.allowed:.2e}"
        at = f", {bad.draw} draw" if bad.draw else ""
        at += f" at {bad.inputs}" if bad.inputs else ""
        count = f"; {len(self.diverging)} tensor(s) differ" if len(self.diverging) > 1 else ""
        return f"FAILED verification: '{bad.name}'{node}{chan}: {detail}{at}{count}; compared {scope}{notes}"


# --------------------------------------------------------------------------------------
# Models, types, inputs
# --------------------------------------------------------------------------------------


def _session(model: Union[onnx.ModelProto, StoredModel], label: str, extra: Sequence[Tuple[str, int]] = (),
             light: Optional[onnx.ModelProto] = None) -> ort.InferenceSession:
    """A session on ``model`` (or on ``light``, a variant of a stored model's light copy) that
    also outputs ``extra`` ((name, elem_type) pairs)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    try:
        if isinstance(model, StoredModel):
            return model.session(opts, _outputs(extra), light)
        return store.session(model, opts, _outputs(extra))
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


def computation_dtype(model: onnx.ModelProto) -> str:
    """The lowest float precision among the model's float initializers, Cast targets, Constant
    values and graph outputs: an fp16 model with fp32 inputs and outputs computes in fp16."""
    seen: Set[int] = {t.data_type for t in model.graph.initializer}
    seen |= {o.type.tensor_type.elem_type for o in model.graph.output}
    for node in _all_nodes(model.graph):
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to":
                seen.add(a.i)
            elif node.op_type == "Constant" and a.name == "value":
                seen.add(a.t.data_type)
    names = {_FLOAT_TYPES[t] for t in seen if t in _FLOAT_TYPES}
    return next((p for p in _PRECISION if p in names), "float32")


def _all_nodes(graph: onnx.GraphProto):
    return (node for g in modelio.graphs(graph) for node in g.node)


def default_tolerances(model: onnx.ModelProto) -> Tuple[float, float]:
    """(rtol, floor_rel) for the model's computation dtype."""
    return TOLERANCES[computation_dtype(model)]


def _tensor_types(model: onnx.ModelProto, shapes: Dict[str, List[int]]) -> Dict[str, Tuple[int, Optional[List[int]]]]:
    """Element type and (concrete, when inference can tell) shape of every tensor of the top
    graph, by ONNX shape inference on a light copy: weights are declared by type and shape only,
    so a large model is never serialized whole."""
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    g = light.graph
    g.node.extend(model.graph.node)
    declared = set()
    for inp in model.graph.input:
        vi = g.input.add()
        vi.CopyFrom(inp)
        declared.add(inp.name)
        if inp.name in shapes and inp.type.HasField("tensor_type"):
            dims = vi.type.tensor_type.shape.dim
            for d, v in zip(dims, shapes[inp.name]):
                d.Clear()
                d.dim_value = int(v)
    g.output.extend(model.graph.output)
    g.value_info.extend(model.graph.value_info)
    for t in model.graph.initializer:
        if int(np.prod(t.dims, dtype=np.int64)) <= _LIGHT_TENSOR and t.data_location != TensorProto.EXTERNAL:
            g.initializer.append(t)
        elif t.name not in declared:
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    try:
        light = shape_inference.infer_shapes(light, data_prop=True)
    except Exception:  # noqa: BLE001 - fall back to whatever the model declares
        pass
    out: Dict[str, Tuple[int, Optional[List[int]]]] = {}
    for vi in list(light.graph.value_info) + list(light.graph.output) + list(light.graph.input):
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or not tt.elem_type:
            continue
        dims = None
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            dims = [d.dim_value for d in tt.shape.dim]
        out[vi.name] = (tt.elem_type, dims)
    for t in model.graph.initializer:
        out[t.name] = (t.data_type, list(t.dims))
    return out


def _input_dependent(model: onnx.ModelProto) -> Set[str]:
    """Tensors of the top graph whose value depends on a graph input (the rest are constants)."""
    init = {t.name for t in model.graph.initializer}
    dynamic = {i.name for i in model.graph.input if i.name not in init}
    for node in model.graph.node:
        has_body = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
        if has_body or any(i in dynamic for i in node.input if i):
            dynamic.update(o for o in node.output if o)
    return dynamic


def _dynamic_dims(model: onnx.ModelProto, shapes: Dict[str, List[int]]) -> List[Tuple[str, int, str]]:
    """(input, axis, dim_param) of every dynamic dim of the inputs being drawn."""
    out = []
    for inp in model.graph.input:
        if inp.name not in shapes or not inp.type.tensor_type.HasField("shape"):
            continue
        for axis, d in enumerate(inp.type.tensor_type.shape.dim):
            if not (d.HasField("dim_value") and d.dim_value > 0):
                out.append((inp.name, axis, d.dim_param))
    return out


def second_shapes(model: onnx.ModelProto, shapes: Dict[str, List[int]]) -> List[Dict[str, List[int]]]:
    """Input shapes to verify at besides ``shapes``, most wanted first, when an input has dynamic
    dims: batch b -> b + 1 with every other dynamic dim d -> d + 1 (odd sizes catch stride and
    padding mistakes), d + 2, 2 d; then d + 1 with the batch kept; then only the batch changed.
    Dims sharing a name change together."""
    dyn = _dynamic_dims(model, shapes)
    if not dyn:
        return []
    spatial = any(axis > 0 for _, axis, _ in dyn)
    plans = [(True, lambda d: d + 1)]
    if spatial:
        plans += [(True, lambda d: d + 2), (True, lambda d: 2 * d), (False, lambda d: d + 1), (True, lambda d: d)]
    else:
        plans += [(True, lambda d: d)]  # batch b + 1 failed: nothing else to vary
    out: List[Dict[str, List[int]]] = []
    for change_batch, grow in plans:
        new = {k: list(v) for k, v in shapes.items()}
        named: Dict[str, int] = {}
        for name, axis, param in dyn:
            old = shapes[name][axis]
            if param and param in named:
                value = named[param]
            elif axis == 0:
                value = old + 1 if change_batch else old
            else:
                value = grow(old)
            if param:
                named[param] = value
            new[name][axis] = value
        if new != shapes and new not in out:
            out.append(new)
    return out


def make_inputs(session: ort.InferenceSession, shapes: Dict[str, List[int]], draws: int, seed: int, label: str,
                large_scale: float = LARGE_SCALE_DEFAULT):
    """``draws`` feeds; float inputs cycle through DRAW_KINDS, integer and bool ones are random."""
    rng = np.random.default_rng(seed)
    feeds = []
    for i in range(draws):
        kind = DRAW_KINDS[i % len(DRAW_KINDS)]
        feed = {}
        for inp in session.get_inputs():
            dtype = _NP_TYPES.get(inp.type)
            if dtype is None:
                raise OnnxrepError(f"{label}: input '{inp.name}' has type {inp.type}, which verification cannot draw")
            shape = shapes[inp.name]
            if np.issubdtype(dtype, np.floating):
                if kind == "normal":
                    x = rng.standard_normal(shape)
                elif kind == "large":
                    x = rng.standard_normal(shape) * large_scale
                elif kind == "zeros":
                    x = np.zeros(shape)
                elif kind == "uniform+":
                    x = rng.uniform(0.0, 1.0, shape)
                else:
                    x = -rng.uniform(0.0, 1.0, shape)
            elif dtype is np.bool_:
                x = rng.integers(0, 2, shape)
            else:
                x = rng.integers(0, 8, shape)
            feed[inp.name] = np.asarray(x).astype(dtype)
        feeds.append(feed)
    return feeds


def _outputs(extra: Sequence[Tuple[str, int]]) -> List[onnx.ValueInfoProto]:
    """Graph outputs for ``extra`` ((name, elem_type) pairs), shapes left to the runtime."""
    return [helper.make_tensor_value_info(name, elem, None) for name, elem in extra]


def _shape_text(shapes: Dict[str, List[int]]) -> str:
    return ", ".join(f"{k}=[{','.join(map(str, v))}]" for k, v in shapes.items())


# --------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------


@dataclass
class _Cmp:
    ok: bool
    ratio: float
    error: float
    allowed: float
    max_abs: float
    channel: Optional[int] = None
    note: str = ""


def compare(y: np.ndarray, ref: np.ndarray, rtol: float, floor_rel: float, atol: Optional[float] = None,
            scale: float = 0.0, noise: Optional[np.ndarray] = None) -> _Cmp:
    """One tensor at one draw: per channel max|y_c - ref_c| <= rtol * max|ref_c| + floor, with
    floor = floor_rel * max(max|ref|, scale) (``scale``: the tensor's magnitude at the unit-scale
    draws), or ``atol`` when given; plus, where ``noise`` (the original's own rounding noise per
    channel, see NOISE_AMPLITUDE) is given, min(NOISE_FACTOR * noise_c, NOISE_CAP * rtol * max|ref_c|)."""
    y, ref = np.asarray(y), np.asarray(ref)
    if y.shape != ref.shape:
        return _Cmp(False, float("inf"), float("inf"), 0.0, float("inf"), note=f"shape {list(y.shape)} != {list(ref.shape)}")
    if y.dtype != ref.dtype:
        return _Cmp(False, float("inf"), float("inf"), 0.0, float("inf"), note=f"dtype {y.dtype} != {ref.dtype}")
    if y.size == 0:
        return _Cmp(True, 0.0, 0.0, 0.0, 0.0)
    if not np.issubdtype(ref.dtype, np.floating):
        same = bool(np.array_equal(y, ref))
        return _Cmp(same, 0.0 if same else float("inf"), 0.0 if same else float("inf"), 0.0,
                    0.0 if same else float("inf"), note="" if same else "integer values differ")
    yf, rf = y.astype(np.float64), ref.astype(np.float64)
    finite = np.isfinite(rf)
    if not finite.all() or not np.isfinite(yf).all():
        if not (np.array_equal(np.isnan(yf), np.isnan(rf)) and np.array_equal(np.isposinf(yf), np.isposinf(rf))
                and np.array_equal(np.isneginf(yf), np.isneginf(rf))):
            return _Cmp(False, float("inf"), float("inf"), 0.0, float("inf"), note="non-finite values differ")
        yf, rf = np.where(finite, yf, 0.0), np.where(finite, rf, 0.0)
    diff, mag = np.abs(yf - rf), np.abs(rf)
    diff_c, mag_c = _channel_max(diff), _channel_max(mag)
    floor = atol if atol is not None else floor_rel * max(float(mag.max()), scale)
    allowed_c = rtol * mag_c + floor
    if noise is not None and noise.shape == allowed_c.shape:
        allowed_c = allowed_c + np.minimum(NOISE_FACTOR * noise, NOISE_CAP * rtol * mag_c)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio_c = np.where(diff_c == 0, 0.0, diff_c / allowed_c)
    k = int(np.argmax(ratio_c))
    ratio = float(ratio_c[k])
    return _Cmp(ratio <= 1.0, ratio, float(diff_c[k]), float(allowed_c[k]), float(diff.max()),
                k if rf.ndim >= 2 else None)


def channel_max_diff(a: np.ndarray, b: np.ndarray) -> Optional[np.ndarray]:
    """max|a_c - b_c| per channel (axis 1 when rank >= 2, else one channel) in float64; inf
    where either is not finite and they differ there; None for non-float or mismatched tensors."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or not np.issubdtype(b.dtype, np.floating) or a.dtype != b.dtype:
        return None
    if a.size == 0:
        return np.zeros(a.shape[1] if a.ndim >= 2 else 1)
    af, bf = a.astype(np.float64), b.astype(np.float64)
    with np.errstate(invalid="ignore"):
        diff = np.where((af == bf) | (np.isnan(af) & np.isnan(bf)), 0.0, np.abs(af - bf))
    return _channel_max(np.where(np.isnan(diff), np.inf, diff))


def _channel_max(x: np.ndarray) -> np.ndarray:
    """max of a non-empty tensor per channel: axis 1 when its rank is at least 2, else one
    channel (0-d too)."""
    if x.ndim >= 2:
        return np.moveaxis(x, 1, 0).reshape(x.shape[1], -1).max(axis=1)
    return x.reshape(1, -1).max(axis=1)


def perturbed(model: onnx.ModelProto, types: Dict[str, Tuple[int, Optional[List[int]]]], amplitude: float,
              seed: int) -> onnx.ModelProto:
    """A copy of ``model`` in which every float tensor a top-graph node produces is multiplied by
    1 + amplitude or 1 - amplitude (a random sign per tensor) under its own name: the original
    with rounding-sized errors everywhere. Outputs of Constant nodes are left alone."""
    rng = np.random.default_rng(seed)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = []
    for node in out.graph.node:
        nodes.append(node)
        if node.op_type == "Constant":
            continue
        for i, name in enumerate(node.output):
            elem = types.get(name, (0, None))[0]
            if not name or elem not in _FLOAT_TYPES:
                continue
            raw, factor = f"{name}__onnxrep_exact", f"{name}__onnxrep_noise"
            node.output[i] = raw
            dtype = helper.tensor_dtype_to_np_dtype(elem)
            value = 1.0 + amplitude * float(rng.choice((-1.0, 1.0)))
            out.graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=dtype), factor)
                                         if elem != TensorProto.BFLOAT16 else
                                         helper.make_tensor(factor, elem, [], [value]))
            nodes.append(helper.make_node("Mul", [raw, factor], [name]))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


# --------------------------------------------------------------------------------------
# The verifier
# --------------------------------------------------------------------------------------

#: Reference values kept in memory up to this many bytes (intermediate tensors over all draws
#: and shapes); beyond it each draw's values wait in a file of a temporary folder and are read
#: back for the draw being compared, so that a check holds one draw's values at a time.
STORED_RUNS_BYTES = 32 << 20


class _RunOnDisk:
    """One draw's reference values (name -> array) in a file (see STORED_RUNS_BYTES). Raw
    bytes, with dtypes and shapes kept here: any dtype (bfloat16 included) reads back as it was."""

    def __init__(self, values: Dict[str, np.ndarray], path: str):
        self.path = path
        self._where: Dict[str, Tuple[int, np.dtype, Tuple[int, ...]]] = {}
        offset = 0
        with open(path, "wb") as f:
            for name, value in values.items():
                value = np.ascontiguousarray(value)
                f.write(value.tobytes())
                self._where[name] = (offset, value.dtype, value.shape)
                offset += value.nbytes

    def drop(self, name: str) -> int:
        """Forget ``name``; the bytes it took (0 when absent)."""
        where = self._where.pop(name, None)
        return 0 if where is None else where[1].itemsize * math.prod(where[2])

    def load(self) -> Dict[str, np.ndarray]:
        out = {}
        with open(self.path, "rb") as f:
            for name, (offset, dtype, shape) in self._where.items():
                f.seek(offset)
                count = math.prod(shape)
                data = f.read(dtype.itemsize * count)
                out[name] = np.frombuffer(data, dtype=dtype, count=count).reshape(shape)
        return out


def _drop(run, name: str) -> int:
    """Remove ``name`` from one draw's values (a dict or a _RunOnDisk); the bytes freed."""
    if isinstance(run, _RunOnDisk):
        return run.drop(name)
    value = run.pop(name, None)
    return 0 if value is None else value.nbytes


def _values(run) -> Dict[str, np.ndarray]:
    return run.load() if isinstance(run, _RunOnDisk) else run



class Verifier:
    """Runs the reference once per draw and shape, keeps its outputs and intermediate tensors,
    and compares candidates against them (``check``)."""

    def __init__(
        self,
        reference: onnx.ModelProto,
        shapes: Dict[str, List[int]],
        label: str,
        rtol: Optional[float] = None,
        atol: Optional[float] = None,
        draws: int = DEFAULT_DRAWS,
        seed: int = 0,
        *,
        compare_tensors: bool = True,
        tensor_budget: Optional[int] = None,
        second_shape: bool = True,
    ):
        """
        Args:
            reference: the original model (not modified).
            shapes: concrete shape of every graph input to draw.
            rtol: relative tolerance per channel (default by computation dtype, see TOLERANCES).
            atol: absolute floor replacing the relative one (floor_rel * max|ref|); None: relative.
            draws: float input draws per shape, cycling through DRAW_KINDS.
            compare_tensors: also compare intermediate tensors present in both models.
            tensor_budget: bytes of intermediate reference values kept for that (default:
                :func:`default_tensor_budget` of the reference).
            second_shape: also verify at a second input shape when an input has dynamic dims.
        """
        if draws < 1:
            raise OnnxrepError(f"{label}: --verify-draws must be at least 1")
        if tensor_budget is None:
            tensor_budget = default_tensor_budget(reference)
        self.dtype = computation_dtype(reference)
        d_rtol, self.floor_rel = TOLERANCES[self.dtype]
        self.rtol = d_rtol if rtol is None else float(rtol)
        self.atol = None if atol is None else float(atol)
        self.label = label
        self.draws = draws
        self.draw_kinds = [DRAW_KINDS[i % len(DRAW_KINDS)] for i in range(draws)]
        self.notes: List[str] = []
        large = LARGE_SCALE.get(self.dtype, LARGE_SCALE_DEFAULT)
        self.draw_kinds_text = [f"large x{large:g}" if k == "large" else k for k in self.draw_kinds]
        self.output_names = [o.name for o in reference.graph.output]
        # kept (not copied) to measure its rounding noise should a check fail: see _measure_noise
        self._reference = reference
        self._seed = seed
        self._noise: Optional[List[List[Dict[str, np.ndarray]]]] = None  # [shape][draw] -> name -> per channel
        self._noise_tried = False

        # Intermediate tensors to compare ("taps"): float node outputs of the reference, in node
        # order, while their values for all draws and shapes fit the budget (static sizes here;
        # tensors inference cannot size are measured as they come, see _trim).
        alternatives = second_shapes(reference, shapes) if second_shape else []
        runs = draws * (2 if alternatives else 1)
        self._dependent = _input_dependent(reference)
        taps: List[Tuple[str, int]] = []
        n_floats, used = 0, 0
        if compare_tensors:
            types = _tensor_types(reference, shapes)
            seen: Set[str] = set(self.output_names)
            for node in reference.graph.node:
                for name in node.output:
                    elem, dims = types.get(name, (0, None))
                    if not name or name in seen or elem not in _FLOAT_TYPES:
                        continue
                    seen.add(name)
                    n_floats += 1
                    size = int(np.prod(dims, dtype=np.int64)) * _itemsize(elem) if dims is not None else 0
                    used += size * (runs if name in self._dependent else 1)
                    if used <= tensor_budget and len(taps) == n_floats - 1:  # a prefix in node order
                        taps.append((name, elem))
        self._tap_types: Dict[str, int] = dict(taps)
        self._taps: List[str] = [n for n, _ in taps]
        self._budget = tensor_budget
        self._stored = 0  # bytes of intermediate reference values kept

        try:
            session = _session(reference, label, taps)
        except OnnxrepError:
            if not taps:
                raise
            session, self._taps, self._tap_types, n_floats = _session(reference, label), [], {}, 0
            self.notes.append("intermediate tensors not compared (onnxruntime cannot output them)")

        self.shapes: List[Dict[str, List[int]]] = []
        self.feeds: List[List[dict]] = []
        #: [shape][draw] -> name -> value (a dict, or a _RunOnDisk: STORED_RUNS_BYTES)
        self._expected: List[list] = []
        self._folder = None  # a temporary folder, once runs are stored on disk
        self._runs_on_disk = 0
        self._constants: Dict[str, np.ndarray] = {}  # input-independent taps, stored once
        #: [shape] -> name -> max|ref| over the unit-scale draws (the floor's reference)
        self._scale: List[Dict[str, float]] = []

        feeds = make_inputs(session, shapes, draws, seed, label, large)
        try:
            self._add_shape(session, shapes, feeds)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            raise OnnxrepError(f"{label}: onnxruntime failed to run the original model ({first_line(exc)})") from None
        failures = []
        for alt in alternatives:
            feeds = make_inputs(session, alt, draws, seed + 1, label, large)
            try:
                self._add_shape(session, alt, feeds)
                break
            except Exception as exc:  # noqa: BLE001 - the original does not accept this shape
                failures.append(f"{_shape_text(alt)} ({first_line(exc)})")
        if alternatives and len(self.shapes) == 1:
            self.notes.append(
                "only one input shape checked although inputs have dynamic dims: the original fails at "
                + "; ".join(failures[:2])
            )
        del session  # the reference is not needed again: release its memory
        if len(self._taps) < n_floats:
            self.notes.append(
                f"tensor budget ({tensor_budget / 2**20:.3g} MiB) reached: {len(self._taps)} of "
                f"{n_floats} intermediate tensors kept for comparison"
            )

    def _add_shape(self, session, shapes: Dict[str, List[int]], feeds: List[dict]) -> None:
        """Run every draw at one input shape and keep what is compared (nothing when it fails).
        When the values kept would exceed STORED_RUNS_BYTES, each draw's values go to disk as
        soon as they are computed, so that at most one draw's values are in memory."""
        names = self.output_names + self._taps
        scale: Dict[str, float] = {}
        runs: list = []
        constants: Dict[str, np.ndarray] = {}
        added = 0  # bytes of intermediate values this shape adds
        for kind, feed in zip(self.draw_kinds, feeds):
            values = dict(zip(names, session.run(names, feed)))
            if kind != "large":
                for name, value in values.items():
                    scale[name] = max(scale.get(name, 0.0), _magnitude(value))
            stored: Dict[str, np.ndarray] = {}
            for name, value in values.items():
                if name in self._tap_types and name not in self._dependent:
                    if name not in self._constants and name not in constants:
                        constants[name] = value
                        added += value.nbytes
                    continue
                stored[name] = value
                if name in self._tap_types:
                    added += value.nbytes
            del values
            if not runs:  # the first draw tells how much every draw adds
                on_disk = self._stored + added * len(feeds) > STORED_RUNS_BYTES
            runs.append(self._to_disk(stored) if on_disk else stored)
            del stored
        self._constants.update(constants)
        self._stored += added
        self._trim(runs)
        self.shapes.append({k: list(v) for k, v in shapes.items()})
        self.feeds.append(feeds)
        self._expected.append(runs)
        self._scale.append(scale)

    def _trim(self, current: list) -> None:
        """Drop the last kept taps (in node order) until the stored values fit the budget."""
        while self._stored > self._budget and self._taps:
            name = self._taps.pop()
            del self._tap_types[name]
            for runs in self._expected + [current]:
                for stored in runs:
                    self._stored -= _drop(stored, name)
            value = self._constants.pop(name, None)
            if value is not None:
                self._stored -= value.nbytes

    def _to_disk(self, run: Dict[str, np.ndarray]):
        """``run`` written to the verifier's temporary folder (``run`` itself when it cannot be)."""
        try:
            if self._folder is None:
                self._folder = store.temporary_folder()
                weakref.finalize(self, self._folder.cleanup)  # removed with the verifier
            self._runs_on_disk += 1
            return _RunOnDisk(run, os.path.join(self._folder.name, f"run-{self._runs_on_disk}.bin"))
        except OSError:  # no room: kept in memory
            return run

    def _measure_noise(self) -> bool:
        """Measure the original's own rounding noise at every draw and shape (NOISE_AMPLITUDE):
        how far its compared tensors move, per channel, when every tensor it computes is off
        by a few units in the last place. Done once; whether it succeeded."""
        self._noise_tried = True
        amplitude = NOISE_AMPLITUDE.get(self.dtype)
        if amplitude is None or not self.feeds:
            return False
        names = self.output_names + self._taps
        taps = [(n, self._tap_types[n]) for n in self._taps]
        noise: List[List[Dict[str, np.ndarray]]] = [[{} for _ in feeds] for feeds in self.feeds]
        held = None
        try:
            types = _tensor_types(self._reference, self.shapes[0])
            held = StoredModel(self._reference)  # the perturbed models differ in their nodes only
            for r in range(NOISE_REALIZATIONS):
                model = perturbed(held.light, types, amplitude, self._seed * NOISE_REALIZATIONS + r)
                session = _session(held, self.label, taps, light=model)
                del model
                for s, (feeds, expected) in enumerate(zip(self.feeds, self._expected)):
                    for d, (feed, run) in enumerate(zip(feeds, expected)):
                        values = dict(zip(names, session.run(names, feed)))
                        for name, ref_value in _values(run).items():
                            diff = channel_max_diff(values[name], ref_value) if name in values else None
                            if diff is not None:
                                prev = noise[s][d].get(name)
                                noise[s][d][name] = diff if prev is None else np.maximum(prev, diff)
                del session
        except Exception as exc:  # noqa: BLE001 - an unmeasured noise only leaves the plain criterion
            self.notes.append(f"the original's rounding noise could not be measured ({first_line(exc)})")
            return False
        finally:
            if held is not None:
                held.close()
        self._noise = noise
        self.notes.append(
            f"a check first failed within rounding: from then on each channel may also differ by "
            f"{NOISE_FACTOR:g}x the original's own rounding noise there (its tensors scaled by "
            f"1 +- {amplitude:.2g}, {NOISE_REALIZATIONS} draws of signs), at most {NOISE_CAP:g}x rtol of "
            f"the channel's magnitude"
        )
        return True

    @property
    def tensors(self) -> List[str]:
        """Names compared when present in a candidate: the outputs, then intermediates."""
        return self.output_names + self._taps

    def check(self, candidate: Union[onnx.ModelProto, StoredModel]) -> VerifyResult:
        """Compare ``candidate`` (a model, or a stored one: its weights are then read from its
        data file by onnxruntime, and never held in memory here) with the reference."""
        held = candidate if isinstance(candidate, StoredModel) else None
        model = held.light if held is not None else candidate
        result = VerifyResult(
            ok=True, rtol=self.rtol, atol=self.atol, draws=self.draws, floor_rel=self.floor_rel, dtype=self.dtype,
            draw_kinds=list(self.draw_kinds_text), shapes=[dict(s) for s in self.shapes], notes=list(self.notes),
        )
        names = [o.name for o in model.graph.output]
        if names != self.output_names:
            result.ok = False
            result.outputs.append(TensorCheck(",".join(names), float("inf"), 0.0, False, "output names changed",
                                              ratio=float("inf")))
            return result

        position: Dict[str, Tuple[int, str, str]] = {}
        for i, node in enumerate(model.graph.node):
            for o in node.output:
                if o:
                    position[o] = (i, node.name, node.op_type)
        initializers = {t.name: t for t in model.graph.initializer}
        outputs = set(self.output_names)
        cand_types = _tensor_types(model, self.shapes[0]) if self._taps else {}
        taps, incomparable = [], []
        for name in self._taps:
            if name in position:
                elem = cand_types.get(name, (self._tap_types[name], None))[0]
                if elem != self._tap_types[name]:
                    incomparable.append(name)
                else:
                    taps.append((name, elem))
        init_taps = [n for n in self._taps if n not in position and n in initializers]

        session = None
        if taps:
            try:
                session = _session(candidate, f"{self.label} (optimized)", taps)
            except OnnxrepError:
                taps = []
                result.notes.append("intermediate tensors not compared (onnxruntime cannot output them)")
        if session is None:
            session = _session(candidate, f"{self.label} (optimized)")
        run_names = self.output_names + [n for n, _ in taps]
        cand_inputs = {i.name for i in session.get_inputs()}

        worst: Dict[str, TensorCheck] = {}
        skipped: Set[str] = set(incomparable)

        def record(name: str, cmp: _Cmp, kind: str, shape_text: str) -> None:
            if name in skipped:
                return
            prev = worst.get(name)
            if prev is None and name not in outputs and cmp.note.startswith(("shape ", "dtype ")):
                skipped.add(name)  # the same name for another tensor from the start: not comparable
                return
            unit = cmp.max_abs if not kind.startswith("large") else 0.0
            if prev is None:
                worst[name] = TensorCheck(name, unit, cmp.allowed, cmp.ok, cmp.note, cmp.error, cmp.ratio,
                                          cmp.channel, kind, shape_text, position.get(name, (None, None))[1])
                return
            prev.max_abs_error = max(prev.max_abs_error, unit)
            if cmp.ratio > prev.ratio or (prev.ok and not cmp.ok):
                prev.allowed, prev.ok, prev.note, prev.error, prev.ratio = cmp.allowed, cmp.ok, cmp.note, cmp.error, cmp.ratio
                prev.channel, prev.draw, prev.inputs = cmp.channel, kind, shape_text

        first_run = True
        for s, (shape, feeds, expected, scale) in enumerate(zip(self.shapes, self.feeds, self._expected, self._scale)):
            shape_text = _shape_text(shape)
            for d, (kind, feed, run) in enumerate(zip(self.draw_kinds_text, feeds, expected)):
                ref = _values(run)
                noise = self._noise[s][d] if self._noise is not None else {}
                missing = cand_inputs - set(feed)
                if missing:
                    result.ok = False
                    result.notes.append(f"the optimized model needs inputs the original does not have: {sorted(missing)}")
                    return result
                try:
                    got = session.run(run_names, {k: v for k, v in feed.items() if k in cand_inputs})
                except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
                    failed = _Cmp(False, float("inf"), float("inf"), 0.0, float("inf"),
                                  note=f"{_RUN_FAILED} ({first_line(exc)})")
                    for name in self.output_names:
                        record(name, failed, kind, shape_text)
                    break
                values = dict(zip(run_names, got))
                values.update((n, held.array(n) if held is not None else numpy_helper.to_array(initializers[n])) for n in init_taps)
                for name, y in values.items():
                    ref_value = ref.get(name)
                    if ref_value is None and first_run:  # input-independent: compared once
                        ref_value = self._constants.get(name)
                    if ref_value is not None:
                        cmp = compare(y, ref_value, self.rtol, self.floor_rel, self.atol, scale.get(name, 0.0),
                                      noise.get(name))
                        record(name, cmp, kind, shape_text)
                first_run = False

        result.outputs = [worst[n] for n in self.output_names if n in worst]
        result.tensors_compared = len(worst)
        result.worst_tensor = max(worst.values(), key=lambda c: c.ratio, default=None)
        if skipped:
            result.notes.append(f"{len(skipped)} same-named tensor(s) of another shape or dtype not compared")
        order = {n: position.get(n, (-1,))[0] for n in worst}
        result.diverging = sorted((c for c in worst.values() if not c.ok), key=lambda c: order[c.name])
        result.ok = not result.diverging and len(result.outputs) == len(self.output_names)
        if (not result.ok and not self._noise_tried and self.atol is None and result.diverging
                and len(result.outputs) == len(self.output_names)
                and all(not c.note and math.isfinite(c.ratio) for c in result.diverging)):
            # a numeric difference only: judge again once the original's own noise is known
            # (the candidate's session goes first: one model in onnxruntime at a time)
            del session
            if self._measure_noise():
                return self.check(candidate)
        first = result.diverging[0] if result.diverging else None
        if first is not None and not first.note.startswith(_RUN_FAILED):
            pos = position.get(first.name)
            result.first_divergence = Divergence(first.name, pos[1] if pos else None, pos[2] if pos else None)
        return result


_RUN_FAILED = "the optimized model fails to run"


def _magnitude(value: np.ndarray) -> float:
    """max|value| over its finite entries (0 for non-float or empty tensors)."""
    value = np.asarray(value)
    if value.size == 0 or not np.issubdtype(value.dtype, np.floating):
        return 0.0
    top = float(np.max(np.abs(value)))
    if np.isfinite(top):
        return top
    a = np.abs(value.astype(np.float64))
    return float(a[np.isfinite(a)].max(initial=0.0))


def _itemsize(elem: int) -> int:
    return {TensorProto.DOUBLE: 8, TensorProto.FLOAT: 4}.get(elem, 2)
