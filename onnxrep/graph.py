"""IR helpers over onnx-graphsurgeon.

onnx-graphsurgeon keeps producer/consumer links on every tensor (``tensor.inputs`` are the
producing nodes, ``tensor.outputs`` the consuming ones), so no rule ever scans the graph to
find them. ``RepGraph`` adds what every rule needs on top: unique names, typed constants,
reading Conv/BatchNormalization parameters, and the one central check that a region may be
replaced (:meth:`RepGraph.escapes`).

Rules never edit a tensor's values in place (an initializer may be shared): they write new
constants. Removed nodes are disconnected at once and dropped from the node list by
:meth:`RepGraph.compact`, which the pass manager calls once per pass.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Union

import numpy as np
import onnx_graphsurgeon as gs

from .kernels import ConvParams, Decline, avgpool_conv, bn_affine

Tensor = Union[gs.Variable, gs.Constant]


def const_value(t: Optional[Tensor]) -> Optional[np.ndarray]:
    """The value of a constant tensor, or None when the tensor is computed at run time."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    return None


def producer(t: Tensor) -> Optional[gs.Node]:
    return t.inputs[0] if t.inputs else None


def static_shape(t: Tensor) -> Optional[List[Union[int, str, None]]]:
    shape = getattr(t, "shape", None)
    return None if shape is None else list(shape)


def channels_of(t: Tensor) -> Optional[int]:
    """The channel count (axis 1) of an activation when it is known statically."""
    shape = static_shape(t)
    if shape is None or len(shape) < 2 or not isinstance(shape[1], int):
        return None
    return shape[1]


def spatial_hw(t: Tensor):
    """(H, W) of an NCHW activation when both are static integers, else None."""
    shape = static_shape(t)
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape[2:]):
        return None
    return int(shape[2]), int(shape[3])


def per_channel(value: np.ndarray, channels: int, rank: int) -> Optional[np.ndarray]:
    """A constant operand of an elementwise op as a per-channel vector of length ``channels``.

    The constant must broadcast to [1, C, 1, ..] against an activation of ``rank`` dims without
    enlarging it (a scalar, [C,1,1], [1,C,1,1], ...). Returns None otherwise, e.g. when it varies
    over H or W or lines up with the last axis instead of the channel axis.
    """
    value = np.asarray(value)
    if value.ndim > rank or rank < 2:
        return None
    shape = (1,) * (rank - value.ndim) + value.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(-1).astype(np.float64), (channels,))


def str_attr(attrs: dict, key: str, default: str) -> str:
    """A string attribute (onnx-graphsurgeon may hold it as bytes)."""
    value = attrs.get(key, default)
    return value.decode() if isinstance(value, bytes) else value


def _ints(attrs: dict, key: str, default: Sequence[int]) -> tuple:
    value = attrs.get(key)
    return tuple(int(v) for v in value) if value is not None else tuple(default)


class RepGraph:
    """A graph being rewritten: onnx-graphsurgeon graph plus name bookkeeping."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self._names = set()
        stack = [graph]
        while stack:  # names inside If/Loop/Scan bodies too: a new name must not shadow them
            g = stack.pop()
            self._names.update(g.tensors().keys())
            for node in g.nodes:
                self._names.add(node.name)
                stack.extend(a for a in node.attrs.values() if isinstance(a, gs.Graph))
        self._output_names = {t.name for t in graph.outputs}

    # ---- names and construction -----------------------------------------------------

    def unique(self, base: str) -> str:
        base = base or "onnxrep"
        name, i = base, 1
        while name in self._names:
            name = f"{base}_{i}"
            i += 1
        self._names.add(name)
        return name

    def constant(self, base: str, values: np.ndarray, dtype) -> gs.Constant:
        return gs.Constant(self.unique(base), np.ascontiguousarray(np.asarray(values).astype(dtype)))

    def variable(self, base: str, like: Tensor) -> gs.Variable:
        """A new intermediate tensor with ``like``'s dtype; its shape is left unknown (the
        exported model gets no value_info for it rather than a possibly wrong one)."""
        return gs.Variable(self.unique(base), dtype=like.dtype)

    def add_node(self, op: str, base: str, inputs, outputs, attrs=None) -> gs.Node:
        node = gs.Node(op=op, name=self.unique(base), attrs=attrs or {}, inputs=list(inputs), outputs=list(outputs))
        self.graph.nodes.append(node)
        return node

    def remove(self, nodes: Iterable[gs.Node]) -> None:
        """Disconnect nodes; they leave the node list at the next :meth:`compact`."""
        for node in nodes:
            node.inputs.clear()
            node.outputs.clear()

    def compact(self) -> None:
        self.graph.nodes = [n for n in self.graph.nodes if n.outputs]

    # ---- queries --------------------------------------------------------------------

    def is_graph_output(self, t: Tensor) -> bool:
        return t.name in self._output_names

    def sole_consumer(self, t: Tensor) -> Optional[gs.Node]:
        """The only consumer of an intermediate tensor that is not a graph output, else None."""
        if self.is_graph_output(t) or len(t.outputs) != 1:
            return None
        return t.outputs[0]

    def escapes(self, region: Sequence[gs.Node], keep: Sequence[Tensor]) -> Optional[str]:
        """Why ``region`` may not be replaced by new nodes producing ``keep``, or None.

        Every tensor the region produces, other than ``keep``, must be consumed only inside the
        region and must not be a graph output. This is the one check all rules rely on.
        """
        inside = {id(n) for n in region}
        kept = {t.name for t in keep}
        for node in region:
            for t in node.outputs:
                if t.name in kept:
                    continue
                if self.is_graph_output(t):
                    return f"tensor '{t.name}' is a graph output"
                for consumer in t.outputs:
                    if id(consumer) not in inside:
                        return f"tensor '{t.name}' is also used by '{consumer.name}'"
        return None

    # ---- typed readers ----------------------------------------------------------------

    def read_conv(self, node: gs.Node) -> Union[ConvParams, str]:
        """The parameters of a 2-D Conv with constant weights, or the reason it has none."""
        if node.op != "Conv":
            return f"'{node.name}' is {node.op}, not Conv"
        if len(node.inputs) < 2 or len(node.outputs) != 1:
            return f"Conv '{node.name}' has an unexpected signature"
        weight = const_value(node.inputs[1])
        if weight is None:
            return f"Conv '{node.name}' weight '{node.inputs[1].name}' is not a constant"
        if weight.ndim != 4:
            return f"Conv '{node.name}' is {weight.ndim - 2}-D; only 2-D convs are fused"
        if not np.issubdtype(weight.dtype, np.floating):
            return f"Conv '{node.name}' has non-float weights ({weight.dtype})"
        bias = None
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
            bias = const_value(node.inputs[2])
            if bias is None:
                return f"Conv '{node.name}' bias '{node.inputs[2].name}' is not a constant"
        attrs = node.attrs
        pads = _ints(attrs, "pads", (0, 0, 0, 0))
        auto_pad = str_attr(attrs, "auto_pad", "NOTSET")
        strides = _ints(attrs, "strides", (1, 1))
        dilations = _ints(attrs, "dilations", (1, 1))
        if auto_pad == "VALID":
            pads = (0, 0, 0, 0)
        elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            hw = spatial_hw(node.inputs[0])
            if hw is None:
                return f"Conv '{node.name}' uses auto_pad={auto_pad} on an input of unknown size"
            pads = _same_pads(hw, weight.shape[2:], strides, dilations, auto_pad == "SAME_UPPER")
        elif auto_pad != "NOTSET":
            return f"Conv '{node.name}' has unknown auto_pad {auto_pad!r}"
        kernel_shape = attrs.get("kernel_shape")
        if kernel_shape is not None and tuple(kernel_shape) != tuple(weight.shape[2:]):
            return f"Conv '{node.name}' kernel_shape does not match its weight"
        cout = weight.shape[0]
        return ConvParams(
            weight=weight,
            bias=np.zeros(cout, dtype=weight.dtype) if bias is None else bias.reshape(cout),
            strides=strides,
            pads=pads,
            dilations=dilations,
            group=int(attrs.get("group", 1)),
        )

    def read_linear(self, node: gs.Node) -> Union[ConvParams, str]:
        """A Conv, or an AveragePool as the depthwise conv it equals (DESIGN 3.7), or a reason."""
        if node.op == "Conv":
            return self.read_conv(node)
        if node.op != "AveragePool":
            return f"'{node.name}' is {node.op}, not a linear op"
        attrs = node.attrs
        kernel = _ints(attrs, "kernel_shape", ())
        channels = channels_of(node.inputs[0])
        if len(kernel) != 2 or channels is None:
            return f"AveragePool '{node.name}' is not a 2-D pool over a known channel count"
        if int(attrs.get("ceil_mode", 0)):
            return f"AveragePool '{node.name}' uses ceil_mode=1"
        if any(d != 1 for d in _ints(attrs, "dilations", (1, 1))):
            return f"AveragePool '{node.name}' is dilated"
        auto_pad = str_attr(attrs, "auto_pad", "NOTSET")
        if auto_pad not in ("NOTSET", "VALID"):
            return f"AveragePool '{node.name}' uses auto_pad={auto_pad}"
        pads = (0, 0, 0, 0) if auto_pad == "VALID" else _ints(attrs, "pads", (0, 0, 0, 0))
        try:
            return avgpool_conv(channels, kernel, _ints(attrs, "strides", (1, 1)), pads,
                                bool(int(attrs.get("count_include_pad", 0))))
        except Decline as exc:
            return f"AveragePool '{node.name}': {exc}"

    def write_conv(self, base: str, params: ConvParams, x: Tensor, y: Tensor, dtype) -> gs.Node:
        """A new Conv node computing ``y`` from ``x`` with ``params`` (values cast to ``dtype``).

        An all-zero bias is left out: it would cost an addition per output for nothing.
        """
        inputs = [x, self.constant(f"{base}.weight", params.weight, dtype)]
        if np.any(np.asarray(params.bias) != 0):
            inputs.append(self.constant(f"{base}.bias", params.bias, dtype))
        attrs = {
            "kernel_shape": list(params.kernel_shape),
            "strides": list(params.strides),
            "pads": list(params.pads),
            "dilations": list(params.dilations),
            "group": int(params.group),
        }
        return self.add_node("Conv", base, inputs, [y], attrs)

    def repad_conv(self, conv: gs.Node, pads, x: Tensor, y: Tensor) -> gs.Node:
        """A copy of ``conv`` reading ``x`` and writing ``y`` with explicit ``pads``; its weight
        tensors are reused untouched (only the geometry changes)."""
        attrs = {k: v for k, v in conv.attrs.items() if k != "auto_pad"}
        attrs["pads"] = [int(p) for p in pads]
        return self.add_node("Conv", conv.name, [x, *conv.inputs[1:]], [y], attrs)

    def read_batchnorm(self, node: gs.Node):
        """(scale, shift) of an inference-mode BatchNormalization, or the reason it has none."""
        if int(node.attrs.get("training_mode", 0)) != 0:
            return f"BatchNormalization '{node.name}' has training_mode=1"
        if any(t.outputs or self.is_graph_output(t) for t in node.outputs[1:]):
            return f"BatchNormalization '{node.name}' uses its running-statistics outputs"
        values = [const_value(t) for t in node.inputs[1:5]]
        for t, v in zip(node.inputs[1:5], values):
            if v is None:
                return f"BatchNormalization '{node.name}' parameter '{t.name}' is not a constant"
        return bn_affine(*values, eps=float(node.attrs.get("epsilon", 1e-5)))


    def read_channel_affine(self, node: gs.Node):
        """A per-channel affine map y = x * scale + shift spelled as one node, or None.

        Recognizes inference BatchNormalization and Mul/Div/Add/Sub of an activation by a
        constant that broadcasts per channel (DESIGN 3.2). Returns (x, scale, shift) with
        float64 vectors over the channels of x.
        """
        if node.op == "BatchNormalization":
            bn = self.read_batchnorm(node)
            return None if isinstance(bn, str) else (node.inputs[0], bn[0], bn[1])
        if node.op not in ("Mul", "Div", "Add", "Sub") or len(node.inputs) != 2:
            return None
        a, b = node.inputs
        va, vb = const_value(a), const_value(b)
        if (va is None) == (vb is None):
            return None
        x, c, const_first = (b, va, True) if va is not None else (a, vb, False)
        channels, shape = channels_of(x), static_shape(x)
        if channels is None or not np.issubdtype(c.dtype, np.floating):
            return None
        vec = per_channel(c, channels, len(shape))
        if vec is None:
            return None
        ones, zeros = np.ones(channels), np.zeros(channels)
        if node.op == "Mul":
            return x, vec, zeros
        if node.op == "Add":
            return x, ones, vec
        if node.op == "Sub":
            return (x, -ones, vec) if const_first else (x, ones, -vec)
        if const_first or np.any(vec == 0):  # c / x is not affine; x / 0 is not finite
            return None
        return x, 1.0 / vec, zeros


def _same_pads(hw, kernel, strides, dilations, upper: bool) -> tuple:
    begin, end = [], []
    for size, k, s, d in zip(hw, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begin.append(small if upper else large)
        end.append(large if upper else small)
    return tuple(begin + end)
