"""IR helpers over onnx-graphsurgeon.

onnx-graphsurgeon keeps producer/consumer links on every tensor (``tensor.inputs`` are the
producing nodes, ``tensor.outputs`` the consuming ones), so no rule ever scans the graph to
find them. ``RepGraph`` adds what every rule needs on top: unique names, typed constants,
typed readers of the ops rules fold (each returns the op's parameters or raises the one
:class:`~onnxrep.errors.Decline` with a reason), and the central checks the pass manager runs
around every rewrite (:meth:`RepGraph.check_replaceable`, :meth:`RepGraph.apply`).

Only nodes of the main graph are ever matched or replaced. A node inside an If/Loop/Scan body
that reads an outer tensor shows up among that tensor's consumers (onnx-graphsurgeon links
them), and counts as a consumer outside every match: it pins the tensor like a graph output.

Rules never edit a tensor's values in place (an initializer may be shared): they write new
constants. Removed nodes are disconnected by the pass manager and dropped from the node list
by :meth:`RepGraph.compact`, which it calls once per pass.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx_graphsurgeon as gs

from .errors import Decline

#: Bytes of constants left without a consumer by rewrites after which the cycle collector runs.
#: onnx-graphsurgeon's tensors and nodes reference themselves (through their input and output
#: lists), so a replaced weight is not freed when its last reader goes but only when Python's
#: cycle collector next looks at the generation it has aged into, which on a large model can be
#: after every rewrite is done: the old and new weights of the whole model would then be in
#: memory together (docs/architecture.md, "Memory").
COLLECT_BYTES = 64 << 20
from .kernels import ConvParams, avgpool_conv, bn_affine

Tensor = Union[gs.Variable, gs.Constant]

#: The numbers of spatial axes a Conv or AveragePool may have to be folded (Conv1d, Conv2d, Conv3d).
SPATIAL_DIMS = (1, 2, 3)


def const_value(t: Optional[Tensor]) -> Optional[np.ndarray]:
    """The value of a constant tensor, or None when the tensor is computed at run time."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    return None


def is_float_dtype(dtype) -> bool:
    """Whether a numpy dtype is a floating type (bfloat16 from ml_dtypes included)."""
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        return False
    return np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"


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


def spatial_size(t: Tensor) -> Optional[Tuple[int, ...]]:
    """The spatial size of an N C D1..Dn activation (n >= 1: 1-D, 2-D, 3-D convs) when every
    spatial dim is a static integer, else None."""
    shape = static_shape(t)
    if shape is None or len(shape) < 3 or not all(isinstance(d, int) for d in shape[2:]):
        return None
    return tuple(int(d) for d in shape[2:])


def spatial_hw(t: Tensor):
    """(H, W) of an NCHW activation when both are static integers, else None (also for a
    tensor of any other rank: for code that handles 2-D images only)."""
    size = spatial_size(t)
    return size if size is not None and len(size) == 2 else None


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
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            raise Decline(f"attribute '{key}' is not text") from None
    return value


def _ints(attrs: dict, key: str, default: Sequence[int]) -> tuple:
    value = attrs.get(key)
    return tuple(int(v) for v in value) if value is not None else tuple(default)


def _has_input(node: gs.Node, i: int) -> bool:
    return len(node.inputs) > i and node.inputs[i] is not None and bool(node.inputs[i].name)


@dataclass(frozen=True)
class PadSpec:
    """A constant-mode Pad: ``pads`` over every axis ([begins..., ends...]) and its value."""

    pads: Tuple[int, ...]
    value: float

    @property
    def rank(self) -> int:
        return len(self.pads) // 2

    def spatial(self) -> Tuple[int, ...]:
        """The spatial pads (begins, then ends: (top, left, bottom, right) for a 4-D tensor) of a
        pad on an N C D1..Dn tensor that leaves batch and channels alone, else Decline."""
        p, r = self.pads, self.rank
        if r < 3:
            raise Decline(f"the Pad is on a rank-{r} tensor, not N C D1..Dn")
        if any(p[i] for i in (0, 1, r, r + 1)):
            raise Decline("the Pad pads the batch or channel axis")
        return tuple(p[2:r]) + tuple(p[r + 2 :])


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
        self._main = {id(n) for n in graph.nodes}
        self._released = 0  # bytes of constants orphaned since the last collection

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
        """A new constant tensor with ``values`` cast to ``dtype``.

        Folded values that are not finite (a zero variance with epsilon 0, an overflow when
        casting back to float16) decline the rewrite instead of entering the model.
        """
        values = np.ascontiguousarray(np.asarray(values).astype(dtype))
        if is_float_dtype(values.dtype) and not np.all(np.isfinite(values.astype(np.float64))):
            raise Decline(f"folded values for '{base}' are not finite in {np.dtype(dtype).name}")
        return gs.Constant(self.unique(base), values)

    def variable(self, base: str, like: Tensor) -> gs.Variable:
        """A new intermediate tensor with ``like``'s dtype; its shape is left unknown (the
        exported model gets no value_info for it rather than a possibly wrong one)."""
        return gs.Variable(self.unique(base), dtype=like.dtype)

    def add_node(self, op: str, base: str, inputs, outputs, attrs=None) -> gs.Node:
        node = gs.Node(op=op, name=self.unique(base), attrs=attrs or {}, inputs=list(inputs), outputs=list(outputs))
        self.graph.nodes.append(node)
        self._main.add(id(node))
        return node

    def compact(self) -> None:
        self.graph.nodes = [n for n in self.graph.nodes if n.outputs]
        self._main = {id(n) for n in self.graph.nodes}

    # ---- queries --------------------------------------------------------------------

    def is_graph_output(self, t: Tensor) -> bool:
        return t.name in self._output_names

    def in_main_graph(self, node: gs.Node) -> bool:
        """A live node of the main graph (not removed, not inside an If/Loop/Scan body)."""
        return id(node) in self._main and bool(node.outputs)

    def consumers(self, t: Tensor) -> List[gs.Node]:
        """The main-graph nodes that read ``t`` (subgraph readers are left out)."""
        return [c for c in t.outputs if id(c) in self._main]

    def pinned(self, t: Tensor) -> bool:
        """Whether ``t`` must survive whatever reads it in the main graph: a graph output, or
        read inside an If/Loop/Scan body."""
        return self.is_graph_output(t) or any(id(c) not in self._main for c in t.outputs)

    def sole_consumer(self, t: Tensor) -> Optional[gs.Node]:
        """The only consumer of an intermediate tensor, a main-graph node, else None."""
        if self.is_graph_output(t) or len(t.outputs) != 1 or id(t.outputs[0]) not in self._main:
            return None
        return t.outputs[0]

    def escapes(self, region: Sequence[gs.Node], keep: Sequence[Tensor]) -> Optional[str]:
        """Why ``region`` may not be replaced by new nodes producing ``keep``, or None.

        Every node must be a live main-graph node; every tensor the region produces, other
        than ``keep``, must be consumed only inside the region (never inside an If/Loop/Scan
        body) and must not be a graph output; every kept tensor must be one of its outputs.
        """
        inside = {id(n) for n in region}
        kept = {t.name for t in keep}
        produced = set()
        for node in region:
            if not self.in_main_graph(node):
                return f"node '{node.name}' is not a live node of the main graph"
            for t in node.outputs:
                produced.add(t.name)
                if t.name in kept:
                    continue
                if self.is_graph_output(t):
                    return f"tensor '{t.name}' is a graph output"
                for consumer in t.outputs:
                    if id(consumer) not in self._main:
                        return f"tensor '{t.name}' is read inside a subgraph (by '{consumer.name}')"
                    if id(consumer) not in inside:
                        return f"tensor '{t.name}' is also used by '{consumer.name}'"
        missing = kept - produced
        if missing:
            return f"kept tensor '{sorted(missing)[0]}' is not produced by the matched nodes"
        return None

    def check_replaceable(self, region: Sequence[gs.Node], keep: Sequence[Tensor]) -> None:
        """:meth:`escapes` as a check: raises Decline with the reason."""
        if not region:
            raise Decline("the match replaces no node")
        reason = self.escapes(region, keep)
        if reason:
            raise Decline(f"cannot replace the matched nodes: {reason}")

    def apply(self, build: Callable, region: Sequence[gs.Node], keep: Sequence[Tensor]):
        """Run a rule's ``build`` (which adds the replacement nodes), then remove ``region``.

        Afterwards every kept tensor must have exactly one producer, a new node, and every new
        node must read only live tensors. If ``build`` raises or these fail, the new nodes are
        dropped and ``region`` is restored, so the graph is as it was; the error propagates.
        Returns what ``build`` returned.
        """
        start = len(self.graph.nodes)
        saved = [(n, list(n.inputs), list(n.outputs)) for n in region]
        try:
            result = build()
            new = self.graph.nodes[start:]
            for node in region:
                node.inputs.clear()
                node.outputs.clear()
            self._check_replacement(new, keep)
        except BaseException:
            for node in self.graph.nodes[start:]:
                node.inputs.clear()
                node.outputs.clear()
            del self.graph.nodes[start:]
            for node, inputs, outputs in saved:
                if not node.outputs:
                    node.inputs.extend(inputs)
                    node.outputs.extend(outputs)
            raise
        self._released += sum(int(np.prod(t.shape, dtype=np.int64)) * np.dtype(t.dtype).itemsize
                              for _, inputs, _ in saved for t in inputs if isinstance(t, gs.Constant) and not t.outputs)
        if self._released >= COLLECT_BYTES:
            gc.collect()  # see COLLECT_BYTES
            self._released = 0
        return result

    def _check_replacement(self, new: Sequence[gs.Node], keep: Sequence[Tensor]) -> None:
        ids = {id(n) for n in new}
        for t in keep:
            if len(t.inputs) != 1 or id(t.inputs[0]) not in ids:
                raise Decline(f"the replacement does not produce '{t.name}' exactly once")
        graph_inputs = {t.name for t in self.graph.inputs}
        for node in new:
            for t in node.inputs:
                if isinstance(t, gs.Constant) or not t.name or t.name in graph_inputs:
                    continue
                if len(t.inputs) != 1 or not self.in_main_graph(t.inputs[0]):
                    raise Decline(f"the replacement reads '{t.name}', which nothing live produces")

    # ---- typed readers ----------------------------------------------------------------

    def read_conv(self, node: gs.Node) -> ConvParams:
        """The parameters of a 1-D, 2-D or 3-D Conv with constant float weights; Decline otherwise.

        Pads, strides and dilations are read per spatial axis (defaults 0, 1, 1); auto_pad SAME_*
        is resolved per axis from a static input size."""
        if node.op != "Conv":
            raise Decline(f"'{node.name}' is {node.op}, not Conv")
        if len(node.inputs) < 2 or len(node.outputs) != 1:
            raise Decline(f"Conv '{node.name}' has an unexpected signature")
        weight = const_value(node.inputs[1])
        if weight is None:
            raise Decline(f"Conv '{node.name}' weight '{node.inputs[1].name}' is not a constant")
        n = weight.ndim - 2
        if n not in SPATIAL_DIMS:
            raise Decline(f"Conv '{node.name}' is {n}-D; only 1-D, 2-D and 3-D convs are fused")
        if not is_float_dtype(weight.dtype):
            raise Decline(f"Conv '{node.name}' has non-float weights ({weight.dtype})")
        bias = None
        if _has_input(node, 2):
            bias = const_value(node.inputs[2])
            if bias is None:
                raise Decline(f"Conv '{node.name}' bias '{node.inputs[2].name}' is not a constant")
            if bias.size != weight.shape[0]:
                raise Decline(f"Conv '{node.name}' bias has {bias.size} values for {weight.shape[0]} outputs")
        attrs = node.attrs
        group = int(attrs.get("group", 1))
        if group < 1 or weight.shape[0] % group:
            raise Decline(f"Conv '{node.name}' has {weight.shape[0]} outputs in {group} groups")
        channels = channels_of(node.inputs[0])
        if channels is not None and channels != weight.shape[1] * group:
            raise Decline(f"Conv '{node.name}' weight does not match its {channels} input channels")
        pads = _ints(attrs, "pads", (0,) * (2 * n))
        auto_pad = str_attr(attrs, "auto_pad", "NOTSET")
        strides = _ints(attrs, "strides", (1,) * n)
        dilations = _ints(attrs, "dilations", (1,) * n)
        if len(pads) != 2 * n or len(strides) != n or len(dilations) != n:
            raise Decline(f"Conv '{node.name}' has malformed pads, strides or dilations for a {n}-D conv")
        rank = len(static_shape(node.inputs[0]) or ())
        if rank and rank != n + 2:
            raise Decline(f"Conv '{node.name}' has a {n}-D kernel on a rank-{rank} input")
        if min(strides) < 1 or min(dilations) < 1 or min(pads) < 0:
            raise Decline(f"Conv '{node.name}' has non-positive strides/dilations or negative pads")
        if auto_pad == "VALID":
            pads = (0,) * (2 * n)
        elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            # Which side gets the odd pad depends on the input size: only a static size fixes it.
            size = spatial_size(node.inputs[0])
            if size is None or len(size) != n:
                raise Decline(f"Conv '{node.name}' uses auto_pad={auto_pad} on an input of dynamic size")
            pads = _same_pads(size, weight.shape[2:], strides, dilations, auto_pad == "SAME_UPPER")
        elif auto_pad != "NOTSET":
            raise Decline(f"Conv '{node.name}' has unknown auto_pad {auto_pad!r}")
        kernel_shape = attrs.get("kernel_shape")
        if kernel_shape is not None and tuple(kernel_shape) != tuple(weight.shape[2:]):
            raise Decline(f"Conv '{node.name}' kernel_shape does not match its weight")
        cout = weight.shape[0]
        return ConvParams(
            weight=weight,
            bias=np.zeros(cout, dtype=weight.dtype) if bias is None else bias.reshape(cout),
            strides=strides,
            pads=pads,
            dilations=dilations,
            group=group,
        )

    def read_linear(self, node: gs.Node) -> ConvParams:
        """A Conv, or an AveragePool as the depthwise conv it equals (docs/rules.md §7); else Decline."""
        if node.op == "Conv":
            return self.read_conv(node)
        if node.op != "AveragePool":
            raise Decline(f"'{node.name}' is {node.op}, not a linear op")
        attrs = node.attrs
        kernel = _ints(attrs, "kernel_shape", ())
        channels = channels_of(node.inputs[0])
        n = len(kernel)
        if n not in SPATIAL_DIMS or channels is None:
            raise Decline(f"AveragePool '{node.name}' is not a 1-D, 2-D or 3-D pool over a known channel count")
        rank = len(static_shape(node.inputs[0]) or ())
        if rank and rank != n + 2:
            raise Decline(f"AveragePool '{node.name}' has a {n}-D window on a rank-{rank} input")
        if int(attrs.get("ceil_mode", 0)):
            raise Decline(f"AveragePool '{node.name}' uses ceil_mode=1")
        if any(d != 1 for d in _ints(attrs, "dilations", (1,) * n)):
            raise Decline(f"AveragePool '{node.name}' is dilated")
        auto_pad = str_attr(attrs, "auto_pad", "NOTSET")
        if auto_pad not in ("NOTSET", "VALID"):
            raise Decline(f"AveragePool '{node.name}' uses auto_pad={auto_pad}")
        pads = (0,) * (2 * n) if auto_pad == "VALID" else _ints(attrs, "pads", (0,) * (2 * n))
        strides = _ints(attrs, "strides", (1,) * n)
        if len(pads) != 2 * n or len(strides) != n:
            raise Decline(f"AveragePool '{node.name}' has malformed pads or strides for a {n}-D pool")
        if min(strides) < 1 or min(pads) < 0:
            raise Decline(f"AveragePool '{node.name}' has non-positive strides or negative pads")
        try:
            return avgpool_conv(channels, kernel, strides, pads, bool(int(attrs.get("count_include_pad", 0))))
        except Decline as exc:
            raise Decline(f"AveragePool '{node.name}': {exc}") from None

    def read_pad(self, node: gs.Node) -> PadSpec:
        """Pads and value of a constant-mode Pad of any opset, with constant operands; else Decline."""
        mode = str_attr(node.attrs, "mode", "constant")
        if mode != "constant":
            raise Decline(f"Pad '{node.name}' uses mode {mode!r}")
        rank = len(static_shape(node.inputs[0]) or ())
        if "pads" in node.attrs:  # opset < 11
            pads = [int(p) for p in node.attrs["pads"]]
            value = float(node.attrs.get("value", 0.0))
        else:
            pads_t = const_value(node.inputs[1]) if _has_input(node, 1) else None
            if pads_t is None:
                raise Decline(f"Pad '{node.name}' pads are not constant")
            pads = [int(p) for p in pads_t.reshape(-1)]
            value = 0.0
            if _has_input(node, 2):
                v = const_value(node.inputs[2])
                if v is None:
                    raise Decline(f"Pad '{node.name}' constant_value is not constant")
                value = float(np.asarray(v, np.float64).reshape(-1)[0]) if np.asarray(v).size else 0.0
            if _has_input(node, 3):
                axes = const_value(node.inputs[3])
                if axes is None:
                    raise Decline(f"Pad '{node.name}' axes are not constant")
                if not rank:
                    raise Decline(f"Pad '{node.name}' has axes but its input rank is unknown")
                axes = [int(a) % rank for a in axes.reshape(-1)]
                if len(pads) != 2 * len(axes):
                    raise Decline(f"Pad '{node.name}' has {len(pads)} pads for {len(axes)} axes")
                full = [0] * (2 * rank)
                for i, a in enumerate(axes):
                    full[a], full[a + rank] = pads[i], pads[i + len(axes)]
                pads = full
        if len(pads) % 2 or (rank and len(pads) != 2 * rank):
            raise Decline(f"Pad '{node.name}' has {len(pads)} pads for a rank-{rank} input")
        return PadSpec(tuple(pads), value)

    def read_matmul(self, node: gs.Node) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """(W[K, M], bias[M] or None), float64, of ``y = x @ W + bias`` for a Gemm (alpha, beta and
        transB applied) or MatMul with a constant 2-D weight; Decline otherwise."""
        if node.op not in ("Gemm", "MatMul") or len(node.inputs) < 2:
            raise Decline(f"'{node.name}' is {node.op}, not Gemm/MatMul")
        w = const_value(node.inputs[1])
        if w is None:
            raise Decline(f"{node.op} '{node.name}' weight is not a constant")
        if w.ndim != 2 or not is_float_dtype(w.dtype):
            raise Decline(f"{node.op} '{node.name}' weight is not a 2-D float matrix")
        w = np.asarray(w, dtype=np.float64)
        if node.op == "MatMul":
            return w, None
        if int(node.attrs.get("transB", 0)):
            w = w.T
        w = w * float(node.attrs.get("alpha", 1.0))
        if not _has_input(node, 2):
            return w, None
        c = const_value(node.inputs[2])
        if c is None:
            raise Decline(f"Gemm '{node.name}' bias is not a constant")
        if c.size not in (1, w.shape[1]) or c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1):
            raise Decline(f"Gemm '{node.name}' bias is not per-feature")
        bias = np.asarray(c, np.float64) * float(node.attrs.get("beta", 1.0))
        return w, np.broadcast_to(bias, (1, w.shape[1])).reshape(-1)

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

    def read_batchnorm(self, node: gs.Node) -> Tuple[np.ndarray, np.ndarray]:
        """(scale, shift) per channel of an inference-mode BatchNormalization; else Decline.

        ``spatial=0`` (opsets 7-8) keeps one parameter per activation; it folds only when every
        parameter is constant over the non-channel axes.
        """
        if int(node.attrs.get("training_mode", 0)) != 0:
            raise Decline(f"BatchNormalization '{node.name}' has training_mode=1")
        if len(node.inputs) < 5:
            raise Decline(f"BatchNormalization '{node.name}' has {len(node.inputs)} inputs, not 5")
        if any(t.outputs or self.is_graph_output(t) for t in node.outputs[1:]):
            raise Decline(f"BatchNormalization '{node.name}' uses its running-statistics outputs")
        values = []
        for t in node.inputs[1:5]:
            v = const_value(t)
            if v is None:
                raise Decline(f"BatchNormalization '{node.name}' parameter '{t.name}' is not a constant")
            if not is_float_dtype(v.dtype):
                raise Decline(f"BatchNormalization '{node.name}' parameter '{t.name}' is not float")
            values.append(np.asarray(v, np.float64))
        channels = channels_of(node.inputs[0]) or values[0].reshape(-1).shape[0]
        if int(node.attrs.get("spatial", 1)) == 0:
            flat = []
            for t, v in zip(node.inputs[1:5], values):
                v = v.reshape(v.shape[0], -1) if v.ndim else v.reshape(1, 1)
                if np.any(v != v[:, :1]):
                    raise Decline(f"BatchNormalization '{node.name}' (spatial=0): '{t.name}' varies over space")
                flat.append(v[:, 0])
            values = flat
        for t, v in zip(node.inputs[1:5], values):
            if v.size not in (1, channels) or v.ndim > 1:
                raise Decline(f"BatchNormalization '{node.name}' parameter '{t.name}' is not per channel")
        values = [np.broadcast_to(v.reshape(-1), (channels,)) for v in values]
        scale, shift = bn_affine(*values, eps=float(node.attrs.get("epsilon", 1e-5)))
        if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(shift))):
            raise Decline(f"BatchNormalization '{node.name}' is not finite as scale and shift "
                          "(zero variance with epsilon 0?)")
        return scale, shift

    def read_channel_affine(self, node: gs.Node):
        """A per-channel affine map y = x * scale + shift spelled as one node, or None.

        Recognizes inference BatchNormalization, Neg, and Mul/Div/Add/Sub of an activation by a
        constant that broadcasts per channel (docs/rules.md §2). Returns (x, scale, shift) with
        float64 vectors over the channels of x. A pattern query: it never raises.
        """
        if node.op == "BatchNormalization":
            try:
                bn = self.read_batchnorm(node)
            except Decline:
                return None
            return node.inputs[0], bn[0], bn[1]
        if node.op == "Neg" and len(node.inputs) == 1:
            channels = channels_of(node.inputs[0])
            if channels is None or not is_float_dtype(node.inputs[0].dtype):
                return None
            return node.inputs[0], -np.ones(channels), np.zeros(channels)
        if node.op not in ("Mul", "Div", "Add", "Sub") or len(node.inputs) != 2:
            return None
        a, b = node.inputs
        va, vb = const_value(a), const_value(b)
        if (va is None) == (vb is None):
            return None
        x, c, const_first = (b, va, True) if va is not None else (a, vb, False)
        channels, shape = channels_of(x), static_shape(x)
        if channels is None or not is_float_dtype(c.dtype):
            return None
        vec = per_channel(c, channels, len(shape))
        if vec is None or not np.all(np.isfinite(vec)):
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
