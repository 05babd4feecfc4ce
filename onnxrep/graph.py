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

import math
import gc
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

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


def _all_finite(values: np.ndarray) -> bool:
    """Whether a float array holds no NaN or infinity, without a temporary as large as it: the
    smallest and largest values are finite exactly then (a NaN makes both NaN)."""
    if values.size == 0:
        return True
    if values.dtype.kind != "f":  # bfloat16 and the like: through float64
        values = values.astype(np.float64)
    return bool(np.isfinite(values.min()) and np.isfinite(values.max()))


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


@dataclass(frozen=True)
class BorderSpec:
    """A constant border written around an N C D1..Dn activation ``x``: a constant-mode Pad, or
    (NCHW only) Concats of constant slabs on H and W (paddle2onnx's spelling of DBB's BN-and-pad).

    ``pads`` are the spatial begins, then ends ((top, left, bottom, right) in 2-D); ``values`` the border value of each channel (float64,
    one per channel, or one for all); ``nodes`` the nodes that write the border and die with it
    (the Pad, or the Concats with the Expand and shape nodes that build their slabs).
    """

    x: object
    pads: Tuple[int, ...]
    values: np.ndarray
    nodes: Tuple[gs.Node, ...]

    def value_for(self, channels: int) -> np.ndarray:
        """The border values as one per channel."""
        return np.broadcast_to(np.asarray(self.values, np.float64).reshape(-1), (channels,))


@dataclass(frozen=True)
class _Dim:
    """A dim of a tensor read through Shape: the size of ``tensor`` on ``axis``."""

    tensor: object
    axis: int


class RepGraph:
    """A graph being rewritten: onnx-graphsurgeon graph plus name bookkeeping."""

    def __init__(self, graph: gs.Graph, resolved: Optional[dict] = None):
        self.graph = graph
        #: tensor name -> concrete shape at the resolved input shapes (batch 1 unless given), for
        #: counting costs only (onnxrep.cost): never for deciding whether a rewrite is exact
        self.resolved = dict(resolved or {})
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
        if is_float_dtype(values.dtype) and not _all_finite(values):
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
        self._released += sum(math.prod(t.shape) * np.dtype(t.dtype).itemsize
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

    def read_border(self, node: gs.Node) -> BorderSpec:
        """The constant border ``node`` writes around an NCHW activation; else Decline.

        A constant-mode Pad with pads on H/W only, none negative. Or the outer Concat of a
        chain of Concats on the spatial axes, each of one activation and constant slabs
        (:meth:`_border_concat`); the chain goes inwards while an operand is such a Concat
        read by nothing else. Every slab of the chain must hold the same value per channel.
        """
        if node.op == "Pad":
            spec = self.read_pad(node)
            try:
                spatial = spec.spatial()
            except Decline as exc:
                raise Decline(f"Pad '{node.name}': {exc}") from None
            if min(spatial) < 0:
                raise Decline(f"Pad '{node.name}' crops (negative pads)")
            return BorderSpec(node.inputs[0], spatial, np.array([spec.value], np.float64), (node,))
        if node.op != "Concat":
            raise Decline(f"'{node.name}' is {node.op}, not a Pad or Concat")
        chain = [node]  # outer to inner: each Concat's activation is the next one's output
        while True:
            a = _border_activation(chain[-1])
            inner = producer(a) if a is not None else None
            # besides the outer Concat, only Shape nodes (sizing its slabs) may read it
            readers = [c for c in a.outputs if c is not chain[-1]]
            if inner is None or inner.op != "Concat" or self.pinned(a) or any(c.op != "Shape" for c in readers):
                break
            chain.append(inner)
        # Read from the inside out: the size of each Concat's activation is then known even
        # where shape inference could not size it (an Expand'ed slab under a dynamic batch).
        x, shape = None, None
        for cur in reversed(chain):
            try:
                a, axis, before, after, vec, slab_nodes, slab_batches = self._border_concat(cur, shape)
            except Decline:
                if cur is node:
                    raise
                x, shape = None, None  # not a border: the border starts at its output
                continue
            if x is None:
                x, pads, nodes, values, batches, shape = a, [0, 0, 0, 0], [], vec, [], list(static_shape(a))
            if not np.array_equal(values, vec):
                raise Decline(f"Concat '{cur.name}': its slabs hold other values than the inner ones")
            pads[axis - 2] += before
            pads[axis] += after
            nodes += [cur] + [n for n in slab_nodes if n not in nodes]
            batches += slab_batches
            shape[axis] = shape[axis] + before + after if isinstance(shape[axis], int) else None
        inside = [x] + [n.outputs[0] for n in nodes if n.op == "Concat"]
        for src in batches:  # a slab batch read through Shape must be the activation's batch
            if not any(src is t for t in inside) and not _same_batch(src, x):
                raise Decline(f"Concat '{node.name}': a slab takes its batch from '{src.name}', "
                              f"not from '{x.name}'")
        return BorderSpec(x, tuple(pads), values, tuple(nodes))

    def _border_concat(self, node: gs.Node, act=None):
        """One Concat of a border: (activation, axis, extent before, extent after, per-channel
        values, slab nodes, tensors the slabs take their batch from); else Decline.

        Every operand but one is a slab: a constant that is constant per channel over its
        extent, or an Expand of such a constant to a shape whose batch is read through Shape
        (:meth:`_shape_elements`). A slab must have the activation's channels and, on the
        other spatial axis, its size (static, or read from the activation itself); a constant
        slab has a static batch, which must be the activation's. ``act`` is the activation's
        shape when the caller knows it better than inference.
        """
        where = f"Concat '{node.name}'"
        if len(node.outputs) != 1 or "axis" not in node.attrs:
            raise Decline(f"{where} has an unexpected signature")
        a = _border_activation(node)
        if a is None:
            raise Decline(f"{where} does not join one activation and constant slabs")
        shape = static_shape(a) if act is None else act
        if shape is None or len(shape) != 4:
            raise Decline(f"{where}: its activation is not a 4-D tensor of known rank")
        axis = int(node.attrs["axis"])
        axis = axis + 4 if axis < 0 else axis
        if axis not in (2, 3):
            raise Decline(f"{where} is on axis {axis}, not a spatial axis")
        channels = shape[1]
        if not isinstance(channels, int):
            raise Decline(f"{where}: the channel count of '{a.name}' is not static")
        position = next(i for i, t in enumerate(node.inputs) if t is a)
        extents, vecs, slab_nodes, batches = [], [], [], []
        for i, t in enumerate(node.inputs):
            if i == position:
                continue
            extent, vec, made_by, batch = self._border_slab(t, a, shape, axis, where)
            extents.append((i, extent))
            if vec is not None:  # an empty slab has no values
                vecs.append(np.broadcast_to(vec, (channels,)))
            slab_nodes += made_by
            batches += [batch] if batch is not None else []
        if not vecs:
            raise Decline(f"{where} has no slab of any extent")
        if any(not np.array_equal(v, vecs[0]) for v in vecs[1:]):
            raise Decline(f"{where}: its slabs hold different values")
        before = sum(e for i, e in extents if i < position)
        after = sum(e for i, e in extents if i > position)
        return a, axis, before, after, vecs[0].astype(np.float64), slab_nodes, batches

    def _border_slab(self, t, a, act, axis: int, where: str):
        """(extent on ``axis``, values per channel, nodes that make it, batch source or None) of
        a slab next to activation ``a`` of shape ``act``."""
        value = const_value(t)
        if value is not None:
            if value.ndim != 4:
                raise Decline(f"{where}: slab '{t.name}' is not 4-D")
            dims = list(value.shape)
            if dims[0] != act[0]:  # a symbolic batch never equals a constant one
                raise Decline(f"{where}: slab '{t.name}' has batch {dims[0]}, the activation {act[0]}")
            made_by, batch = [], None
        else:
            expand = producer(t)
            value = const_value(expand.inputs[0]) if len(expand.inputs) == 2 else None
            if value is None or value.ndim > 4:
                raise Decline(f"{where}: slab '{t.name}' expands a tensor that is not constant")
            elems, made_by = self._shape_elements(expand.inputs[1])
            if len(elems) > 4:
                raise Decline(f"{where}: slab '{t.name}' is expanded to rank {len(elems)}")
            value = value.reshape((1,) * (4 - value.ndim) + value.shape)
            elems = [1] * (4 - len(elems)) + elems
            dims = []
            for v, e in zip(value.shape, elems):  # Expand broadcasts both ways
                if v == 1 or e == v:
                    dims.append(e)
                elif e == 1:
                    dims.append(v)
                else:
                    raise Decline(f"{where}: slab '{t.name}' expands {value.shape} to {elems}")
            batch = dims[0].tensor if isinstance(dims[0], _Dim) and dims[0].axis == 0 else None
            if batch is None and (dims[0] != act[0] or not isinstance(act[0], int)):
                raise Decline(f"{where}: slab '{t.name}' does not take the activation's batch")
            made_by = [expand] + made_by
        if not is_float_dtype(value.dtype):
            raise Decline(f"{where}: slab '{t.name}' is not float")
        if dims[1] != act[1]:
            raise Decline(f"{where}: slab '{t.name}' has {dims[1]} channels, the activation {act[1]}")
        other = 5 - axis  # the spatial axis the concat does not extend
        d = dims[other]
        if isinstance(d, _Dim):
            ok = d.axis == other and (d.tensor is a or (act[other] is not None and static_shape(d.tensor)[other] == act[other]))
        else:
            ok = isinstance(act[other], int) and d == act[other]
        if not ok:
            raise Decline(f"{where}: slab '{t.name}' does not span the activation on axis {other}")
        extent = dims[axis]
        if not isinstance(extent, int) or extent < 0:
            raise Decline(f"{where}: slab '{t.name}' has no static extent on axis {axis}")
        v = np.asarray(value, np.float64)
        if v.size == 0:
            return extent, None, made_by, batch
        if v.shape[0] != 1 and np.any(v != v[:1]):
            raise Decline(f"{where}: slab '{t.name}' differs between images")
        if np.any(v != v[:1, :, :1, :1]):
            raise Decline(f"{where}: slab '{t.name}' is not constant per channel")
        return extent, v[0, :, 0, 0], made_by, batch

    def _shape_elements(self, t, depth: int = 0):
        """The elements of a 1-D shape tensor as ints or dims read through Shape (``_Dim``), and
        the nodes that compute it; Decline when it is computed by anything else.

        Follows Shape, Slice and Gather of constant positions, Concat, Squeeze, Unsqueeze,
        Reshape, Identity, Cast, and Max. ``Max(c, n)`` with c <= 1 is taken as ``n``, the dim:
        for a dim of 0 (an empty batch) the original's slab would keep batch 1 and its Concat
        fail, so no input the original accepts is answered differently.
        """
        value = const_value(t)
        if value is not None:
            if value.ndim > 1 or value.dtype.kind not in "iu":
                raise Decline(f"shape '{t.name}' is not a 1-D integer constant")
            return [int(v) for v in value.reshape(-1)], []
        node = producer(t)
        if node is None or depth > 32:
            raise Decline(f"shape '{t.name}' is not computed from shapes")
        rank = len(static_shape(t) or [0])
        if rank > 1:
            raise Decline(f"shape '{t.name}' is not 1-D")
        op = node.op
        if op == "Shape":
            src = node.inputs[0]
            src_shape = static_shape(src)
            if src_shape is None:
                raise Decline(f"Shape '{node.name}' reads a tensor of unknown rank")
            n = len(src_shape)
            start, end = int(node.attrs.get("start", 0)), int(node.attrs.get("end", n))
            start, end = (max(0, min(n, v + n if v < 0 else v)) for v in (start, end))
            return [src_shape[i] if isinstance(src_shape[i], int) else _Dim(src, i) for i in range(start, end)], [node]
        if op in ("Squeeze", "Unsqueeze", "Reshape", "Identity", "Cast"):
            if op == "Cast" and np.dtype(helper.tensor_dtype_to_np_dtype(int(node.attrs.get("to", 0)))).kind not in "iu":
                raise Decline(f"Cast '{node.name}' is not to an integer type")
            elems, nodes = self._shape_elements(node.inputs[0], depth + 1)
            return elems, nodes + [node]
        if op in ("Slice", "Gather"):
            elems, nodes = self._shape_elements(node.inputs[0], depth + 1)
            consts = [const_value(i) for i in node.inputs[1:] if i.name]
            if any(c is None for c in consts) or len(consts) < (1 if op == "Gather" else 2) \
                    or (op == "Gather" and int(node.attrs.get("axis", 0)) != 0):
                raise Decline(f"{op} '{node.name}' of a shape has positions that are not constant")
            if op == "Gather":
                n = len(elems)
                return [elems[int(i) + n if int(i) < 0 else int(i)] for i in consts[0].reshape(-1)], nodes + [node]
            starts, ends = int(consts[0].reshape(-1)[0]), int(consts[1].reshape(-1)[0])
            if len(consts) > 2 and int(consts[2].reshape(-1)[0]) not in (0, -1):
                raise Decline(f"Slice '{node.name}' of a shape is not on axis 0")
            step = int(consts[3].reshape(-1)[0]) if len(consts) > 3 else 1
            if step < 1:
                raise Decline(f"Slice '{node.name}' of a shape steps backwards")
            return elems[slice(starts, None if ends >= 2 ** 31 - 1 else ends, step)], nodes + [node]
        if op == "Concat":
            if int(node.attrs.get("axis", 0)) not in (0, -1):
                raise Decline(f"Concat '{node.name}' of shapes is not on axis 0")
            elems, nodes = [], [node]
            for i in node.inputs:
                e, n = self._shape_elements(i, depth + 1)
                elems += e
                nodes += n
            return elems, nodes
        if op == "Max" and len(node.inputs) == 2:
            (a, na), (b, nb) = (self._shape_elements(i, depth + 1) for i in node.inputs)
            if len(a) != len(b) and 1 not in (len(a), len(b)):
                raise Decline(f"Max '{node.name}' of shapes of lengths {len(a)} and {len(b)}")
            n = max(len(a), len(b))
            a, b = (a * n if len(a) == 1 else a), (b * n if len(b) == 1 else b)
            return [_max_dim(x, y, node) for x, y in zip(a, b)], na + nb + [node]
        raise Decline(f"shape '{t.name}' is computed by {op}")

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


def _border_activation(node: gs.Node) -> Optional[Tensor]:
    """The one operand of a Concat that is neither a constant nor an Expand, else None."""
    acts = [t for t in node.inputs if const_value(t) is None and (producer(t) is None or producer(t).op != "Expand")]
    return acts[0] if len(acts) == 1 else None


def _same_batch(t, x) -> bool:
    """Whether ``t`` and ``x`` have the same batch by their inferred shapes (one static size, or
    one symbol: shape inference gives equal dims one name)."""
    st, sx = static_shape(t), static_shape(x)
    return bool(st) and bool(sx) and st[0] is not None and st[0] == sx[0]


def _max_dim(a, b, node):
    """``Max`` of two shape elements: ints, or a dim and an int of at most 1."""
    if isinstance(a, int) and isinstance(b, int):
        return max(a, b)
    if isinstance(a, int):
        a, b = b, a
    if isinstance(b, int) and b <= 1:
        return a
    raise Decline(f"Max '{node.name}' of shapes compares two dims")
