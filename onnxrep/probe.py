"""Running a region of the graph on its own in onnxruntime (for the affine-region fallback).

A region is cut out together with the shape computations that feed it (exporters build
indices and pads from ``Shape`` of some activation); activations it only reads through
``Shape`` become extra inputs fed with zeros of the right shape.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import helper, numpy_helper

from . import store
from .errors import first_line
from .kernels import ConvParams, Decline


def toposort(nodes: List[gs.Node]) -> List[gs.Node]:
    """The nodes in an order where producers come first (Kahn's algorithm on the subset)."""
    ids = {id(n) for n in nodes}
    deps = {id(n): {id(p) for t in n.inputs for p in t.inputs if id(p) in ids and p is not n} for n in nodes}
    done, order = set(), []
    ready = [n for n in nodes if not deps[id(n)]]
    consumers: Dict[int, List[gs.Node]] = {}
    for n in nodes:
        for d in deps[id(n)]:
            consumers.setdefault(d, []).append(n)
    while ready:
        n = ready.pop()
        order.append(n)
        done.add(id(n))
        for c in consumers.get(id(n), ()):
            if id(c) not in done and deps[id(c)] <= done and c not in ready:
                ready.append(c)
    if len(order) != len(nodes):
        raise Decline("the region has a cycle")
    return order


def _inputs_as_zero(model: onnx.ModelProto, tensors) -> None:
    """Replace the graph inputs named like ``tensors`` by scalar zero initializers."""
    names = {t.name: t for t in tensors}
    if not names:
        return
    kept = [i for i in model.graph.input if i.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    for name, t in names.items():
        model.graph.initializer.append(numpy_helper.from_array(np.zeros((), np.dtype(t.dtype)), name))


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4  # probes may fail by design (a region tried at another size)
    return store.session(model, opts)


_QUIET = ort.RunOptions()
_QUIET.log_severity_level = 4


#: Ops whose constant parameters usually depend on the image size (indices, target shapes, ends).
_SIZED = {"Expand", "Reshape", "Slice", "ScatterND", "ScatterElements", "Gather", "Split"}


class Submodel:
    """``y = region(x)`` as a runnable onnxruntime session.

    ``zeros`` are activations the region adds to its result (a residual set aside): they read
    as a scalar 0 here, so the session computes the region's map of ``x`` alone.
    """

    def __init__(self, graph: gs.Graph, nodes: List[gs.Node], x, y, kinds, zeros=()):
        inside = {id(n) for n in nodes}
        support: List[gs.Node] = []
        sources: Dict[str, object] = {}
        seen = set(inside)
        derived: Dict[str, bool] = {}

        def from_region(t, depth=0) -> bool:
            """Whether activation t is x, made in the region, or made from those alone."""
            if t is x or any(id(q) in inside for q in t.inputs):
                return True
            if t.name not in derived:
                p = t.inputs[0] if t.inputs else None
                derived[t.name] = bool(p) and depth < 32 and all(
                    from_region(i, depth + 1) for i in p.inputs if i.name and kinds(i) == "value"
                )
            return derived[t.name]

        stack = [t for n in nodes for t in n.inputs if t.name and kinds(t) == "shape"]
        while stack:
            t = stack.pop()
            p = t.inputs[0] if t.inputs else None
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            support.append(p)
            for i in p.inputs:
                if not i.name or isinstance(i, gs.Constant):
                    continue
                if kinds(i) != "value":
                    stack.append(i)
                elif i is x or any(id(q) in inside for q in i.inputs):
                    continue
                elif from_region(i):
                    stack.append(i)  # e.g. Shape(Slice(region tensor)): run that Slice too
                else:
                    sources[i.name] = i
        self.x, self.y, self.nodes = x, y, list(nodes)
        self.sources = list(sources.values())
        batch = (x.shape or [None])[0]
        self.static_batch = batch if isinstance(batch, int) else None
        self.batch_symbol = batch if isinstance(batch, str) else None
        ordered = toposort(list(nodes) + support)
        sub = gs.Graph(nodes=ordered, inputs=[x] + self.sources + list(zeros), outputs=[y], opset=graph.opset,
                       import_domains=graph.import_domains)
        try:
            model = gs.export_onnx(sub, do_type_check=False)
            model.ir_version = min(model.ir_version, 10)
            _inputs_as_zero(model, zeros)
            self.session = _session(model)
        except Exception as exc:
            raise Decline(f"the region cannot run on its own ({first_line(exc)[:120]})") from None
        self.model = model

    def at_any_size(self) -> Optional["Submodel"]:
        """The same region runnable at other spatial sizes (H and W of x left symbolic, no
        intermediate shapes), or None when that cannot work: it reads other activations'
        shapes, or onnxruntime refuses it. Whether it is still the same map there is for the
        caller to check; sizes baked into the region's constants usually make it fail."""
        if self.sources or any(n.op in _SIZED for n in self.nodes):
            return None
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        del model.graph.value_info[:]
        dims = model.graph.input[0].type.tensor_type.shape.dim
        if len(dims) != 4:
            return None
        dims[2].dim_param, dims[3].dim_param = "onnxrep_h", "onnxrep_w"
        for out in model.graph.output:
            out.type.tensor_type.ClearField("shape")
        try:
            session = _session(model)
        except Exception:
            return None
        other = object.__new__(Submodel)
        other.__dict__.update(self.__dict__)
        other.model, other.session = model, session
        return other

    def _source_feed(self, t, n: int) -> np.ndarray:
        dims = []
        for d in t.shape or []:
            if isinstance(d, int):
                dims.append(d)
            elif d == self.batch_symbol:
                dims.append(n)
            else:
                raise Decline(f"shape source '{t.name}' has an unknown dim '{d}'")
        return np.zeros(dims, dtype=np.dtype(t.dtype))

    def run(self, xs: np.ndarray) -> np.ndarray:
        """The region's output for a batch of inputs (chunked when the batch is static)."""
        step = self.static_batch or len(xs)
        outs = []
        for start in range(0, len(xs), step):
            chunk = xs[start : start + step]
            n = len(chunk)
            if n < step:  # a static batch: fill the last chunk with zero images
                chunk = np.concatenate([chunk, np.zeros((step - n,) + chunk.shape[1:], chunk.dtype)])
            feed = {self.x.name: chunk}
            for s in self.sources:
                feed[s.name] = self._source_feed(s, step)
            try:
                outs.append(self.session.run([self.y.name], feed, _QUIET)[0][:n])
            except Exception as exc:
                raise Decline(f"the region failed on probe inputs ({first_line(exc)[:120]})") from None
        return np.concatenate(outs, axis=0)

    def run_conv(self, xs: np.ndarray, p: ConvParams) -> np.ndarray:
        """A single Conv with parameters ``p`` on ``xs`` (float32, onnxruntime)."""
        w = numpy_helper.from_array(np.asarray(p.weight, np.float32), "w")
        b = numpy_helper.from_array(np.asarray(p.bias, np.float32), "b")
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=list(p.kernel_shape),
                                strides=list(p.strides), pads=list(p.pads), dilations=list(p.dilations), group=p.group)
        g = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [w, b])
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        return _session(model).run(None, {"x": xs})[0]
