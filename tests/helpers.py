"""Shared test helpers: a small ONNX graph builder, a direct numpy convolution and ORT runs."""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Dict, List, Optional, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

RTOL, ATOL = 1e-4, 1e-5


def conv2d_ref(x, w, b=None, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1):
    """Direct (loop over taps) 2-D convolution in float64, ONNX Conv semantics."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    n, cin, h, wd = x.shape
    cout, cin_g, kh, kw = w.shape
    t, l, bo, r = pads
    xp = np.zeros((n, cin, h + t + bo, wd + l + r))
    xp[:, :, t : t + h, l : l + wd] = x
    sh, sw = strides
    dh, dw = dilations
    ho = (h + t + bo - ((kh - 1) * dh + 1)) // sh + 1
    wo = (wd + l + r - ((kw - 1) * dw + 1)) // sw + 1
    y = np.zeros((n, cout, ho, wo))
    cout_g = cout // group
    for g in range(group):
        xs = xp[:, g * cin_g : (g + 1) * cin_g]
        ws = w[g * cout_g : (g + 1) * cout_g]
        for i, j in itertools.product(range(kh), range(kw)):
            patch = xs[:, :, i * dh : i * dh + (ho - 1) * sh + 1 : sh, j * dw : j * dw + (wo - 1) * sw + 1 : sw]
            y[:, g * cout_g : (g + 1) * cout_g] += np.einsum("nchw,oc->nohw", patch, ws[:, :, i, j])
    if b is not None:
        y += np.asarray(b, np.float64)[None, :, None, None]
    return y


def convnd_ref(x, w, b=None, strides=None, pads=None, dilations=None, group=1):
    """Direct (loop over taps) convolution over any number n of spatial axes in float64, ONNX
    Conv semantics: pads are (begin_1..begin_n, end_1..end_n); strides, dilations one per axis."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    n = x.ndim - 2
    strides = tuple(strides or (1,) * n)
    dilations = tuple(dilations or (1,) * n)
    pads = tuple(pads or (0,) * (2 * n))
    assert w.ndim == n + 2 and len(strides) == len(dilations) == n and len(pads) == 2 * n
    xp = np.pad(x, [(0, 0), (0, 0)] + list(zip(pads[:n], pads[n:])))
    out = [(xp.shape[2 + a] - ((w.shape[2 + a] - 1) * dilations[a] + 1)) // strides[a] + 1 for a in range(n)]
    cout, cin_g = w.shape[:2]
    cout_g = cout // group
    y = np.zeros((x.shape[0], cout) + tuple(out))
    for g in range(group):
        for tap in np.ndindex(*w.shape[2:]):
            window = tuple(slice(t * d, t * d + (o - 1) * s + 1, s) for t, d, o, s in zip(tap, dilations, out, strides))
            patch = xp[(slice(None), slice(g * cin_g, (g + 1) * cin_g)) + window]
            taps = w[(slice(g * cout_g, (g + 1) * cout_g), slice(None)) + tap]
            y[:, g * cout_g : (g + 1) * cout_g] += np.einsum("nc...,oc->no...", patch, taps)
    if b is not None:
        y += np.asarray(b, np.float64).reshape((1, -1) + (1,) * n)
    return y


def convnd_params_ref(x, p):
    """convnd_ref with a kernels.ConvParams."""
    return convnd_ref(x, p.weight, p.bias, p.strides, p.pads, p.dilations, p.group)


def conv_params_ref(x, p):
    """conv2d_ref with a kernels.ConvParams."""
    return conv2d_ref(x, p.weight, p.bias, p.strides, p.pads, p.dilations, p.group)


class GraphBuilder:
    """Builds small ONNX models for tests: ``b = GraphBuilder([1, 4, 8, 8])``, then ops."""

    def __init__(self, input_shape: Sequence, seed: int = 0, dtype=np.float32, input_name: str = "x"):
        self.rng = np.random.default_rng(seed)
        self.dtype = dtype
        self.nodes: List[onnx.NodeProto] = []
        self.inits: List[onnx.TensorProto] = []
        self.inputs = [helper.make_tensor_value_info(input_name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), list(input_shape))]
        self.extra_outputs: List[str] = []
        self.x = input_name
        self._n = itertools.count()

    def name(self, base: str) -> str:
        return f"{base}_{next(self._n)}"

    def const(self, value, base: str = "c") -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def rand(self, *shape, scale: float = 0.5) -> np.ndarray:
        return (self.rng.standard_normal(shape) * scale).astype(self.dtype)

    def node(self, op: str, inputs: Sequence[str], n_out: int = 1, **attrs) -> str:
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=self.name(op), **attrs))
        return outs[0]

    def conv(self, x: str, cin: int, cout: int, k=3, stride=1, pad=None, dilation=1, group=1, bias=True, weight=None):
        kh, kw = (k, k) if isinstance(k, int) else k
        if pad is None:
            pad = (dilation * (kh - 1) // 2, dilation * (kw - 1) // 2, dilation * (kh - 1) // 2, dilation * (kw - 1) // 2)
        elif isinstance(pad, int):
            pad = (pad,) * 4
        w = self.rand(cout, cin // group, kh, kw) if weight is None else weight
        inputs = [x, self.const(w, "w")]
        if bias:
            inputs.append(self.const(self.rand(cout), "b"))
        s = (stride, stride) if isinstance(stride, int) else stride
        d = (dilation, dilation) if isinstance(dilation, int) else dilation
        return self.node("Conv", inputs, kernel_shape=[kh, kw], strides=list(s), pads=list(pad), dilations=list(d), group=group)

    def bn(self, x: str, c: int, **attrs) -> str:
        gamma = self.rng.uniform(0.5, 1.5, c).astype(self.dtype)
        beta = self.rand(c)
        mean = self.rand(c)
        var = self.rng.uniform(0.5, 2.0, c).astype(self.dtype)
        ins = [x] + [self.const(v, n) for v, n in ((gamma, "gamma"), (beta, "beta"), (mean, "mean"), (var, "var"))]
        return self.node("BatchNormalization", ins, epsilon=1e-3, **attrs)

    def add(self, *xs: str) -> str:
        acc = xs[0]
        for x in xs[1:]:
            acc = self.node("Add", [acc, x])
        return acc

    def mark_output(self, name: str) -> None:
        self.extra_outputs.append(name)

    def build(self, output: str, opset: int = 17, output_shape: Optional[Sequence] = None) -> onnx.ModelProto:
        names = [output] + [n for n in self.extra_outputs if n != output]
        graph = helper.make_graph(self.nodes, "test", self.inputs, [], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = min(model.ir_version, 8)
        inferred = {vi.name: vi for vi in onnx.shape_inference.infer_shapes(model).graph.value_info}
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(self.dtype))
        if output_shape is not None:
            inferred[output] = helper.make_tensor_value_info(output, elem, list(output_shape))
        for name in names:
            model.graph.output.append(inferred[name])
        onnx.checker.check_model(model)
        return model


def ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def run(model: onnx.ModelProto, feeds: Dict[str, np.ndarray]) -> List[np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def random_feeds(model: onnx.ModelProto, seed: int = 123, batch: int = 1) -> Dict[str, np.ndarray]:
    """Inputs drawn independently of onnxrep's own verification draws."""
    rng = np.random.default_rng(seed)
    feeds = {}
    init = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in init:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in inp.type.tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        feeds[inp.name] = rng.standard_normal(dims).astype(dtype)
    return feeds


def assert_same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, rtol: float = RTOL, atol: float = ATOL, batch: int = 1):
    """Both models give the same outputs on fresh inputs: max|d| <= atol + rtol * max|ref|."""
    feeds = random_feeds(a, batch=batch)
    for ya, yb in zip(run(a, feeds), run(b, feeds)):
        assert ya.shape == yb.shape
        err = float(np.max(np.abs(ya.astype(np.float64) - yb)))
        allowed = atol + rtol * float(np.max(np.abs(ya)))
        assert err <= allowed, f"max error {err:.3e} > {allowed:.3e}"


def assert_equal_per_channel(a: onnx.ModelProto, b: onnx.ModelProto, feeds, rtol: float = 1e-4):
    """Every output channel (axis 1) of ``b`` equals ``a``'s within ``rtol`` of that channel's own
    largest magnitude, whatever the other channels' scale (rank < 2: the whole tensor)."""
    for ya, yb in zip(run(a, feeds), run(b, feeds)):
        assert ya.shape == yb.shape
        ya, yb = np.asarray(ya, np.float64), np.asarray(yb, np.float64)
        if ya.ndim < 2:
            ya, yb = ya.reshape(1, 1, -1), yb.reshape(1, 1, -1)
        axes = tuple(i for i in range(ya.ndim) if i != 1)
        err = np.abs(ya - yb).max(axis=axes)
        allowed = rtol * np.abs(ya).max(axis=axes) + 1e-12 * float(np.abs(ya).max())
        assert np.all(err <= allowed), f"per-channel errors {err} > allowed {allowed}"
