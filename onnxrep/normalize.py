"""Loading, validation and normalization before the rules run.

Normalization makes every exporter dialect look alike to the rules (docs/rules.md §9):

* shape inference, so rules can compare shapes and channel counts;
* ``CastLike(v, x)`` becomes ``Cast(v, to=dtype(x))``: it depends on x only through its dtype.
  ``dynamo=True, optimize=False`` builds each conv's zero bias as
  ``Expand(CastLike(0, x), Shape(W))`` and border values as ``CastLike(expand, x)``;
* constant folding (onnx-graphsurgeon evaluating with onnxruntime, no size limit), which turns
  those chains, Shape/Expand chains under static shapes and kernels computed from parameters
  (OREPA) into initializers;
* removal of Identity nodes that are not needed to keep a graph input or output name.
"""

from __future__ import annotations

import math
import contextlib
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, shape_inference
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues
from onnx_graphsurgeon.logger import G_LOGGER

from . import inputs
from .errors import OnnxrepError, first_line
from .modelio import uses_external_data


#: Highest default-domain opset onnxrep accepts (what the installed onnx knows).
MAX_OPSET = onnx.defs.onnx_opset_version()
MIN_OPSET = 7

log = logging.getLogger("onnxrep")


@contextlib.contextmanager
def quiet_graphsurgeon():
    """onnx-graphsurgeon's own log (warnings about dtypes, folding) off for the duration, then
    back to what the caller had: no process-wide change."""
    before = G_LOGGER.severity
    G_LOGGER.severity = G_LOGGER.ERROR
    try:
        yield
    finally:
        G_LOGGER.severity = before


def load_model(path: str, warnings: Optional[List[str]] = None) -> Tuple[onnx.ModelProto, bool]:
    """Read an ONNX file, external data included, with a one-line error for anything else.

    Returns the model and whether its tensors were stored as external data. Sparse
    initializers are made dense (onnx-graphsurgeon and the rules read dense tensors only); a
    sentence saying so is appended to ``warnings`` when given, for the caller's report.
    """
    if not os.path.exists(path):
        raise OnnxrepError(f"{path}: no such file")
    if os.path.isdir(path):
        raise OnnxrepError(f"{path}: is a directory, not an ONNX file")
    if os.path.getsize(path) == 0:
        raise OnnxrepError(f"{path}: empty file")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf raises several types for garbage input
        raise OnnxrepError(f"{path}: not a readable ONNX model ({first_line(exc)})") from None
    if not model.graph.node and not model.graph.output:
        raise OnnxrepError(f"{path}: not an ONNX model (no graph)")
    inputs.check_text(model, path)
    external = uses_external_data(model)
    if external:
        try:
            onnx.load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
        except Exception as exc:
            raise OnnxrepError(f"{path}: cannot read its external data ({first_line(exc)})") from None
    model, note = inputs.densify(model, path, in_place=True)
    if note and warnings is not None:
        warnings.append(note)
    return model, external


def validate(model: onnx.ModelProto, label: str) -> None:
    """Reject models onnxrep cannot handle faithfully, naming the file and node.

    Besides the checks here, :func:`onnxrep.inputs.check_model` rejects what onnx-graphsurgeon,
    onnxruntime or the rules would choke on (invalid text, types or tensor data, dangling or
    duplicated tensors, cycles, ops unknown at the model's opset, schema violations).
    """
    inputs.check_text(model, label)
    opset = default_opset(model)
    if opset is None:
        raise OnnxrepError(f"{label}: model imports no default-domain opset")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise OnnxrepError(f"{label}: opset {opset} is not supported (supported: {MIN_OPSET}..{MAX_OPSET})")
    for node in model.graph.node:
        if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "training_mode" and attr.i != 0:
                    raise OnnxrepError(
                        f"{label}: node '{node.name}': BatchNormalization has training_mode=1; "
                        "export the model in eval() mode"
                    )
    inputs.check_model(model, label, opset)


def default_opset(model: onnx.ModelProto) -> Optional[int]:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return None


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """The model as an onnx-graphsurgeon graph with inferred shapes and named nodes.

    Shapes declared for intermediate tensors and outputs (value_info, graph outputs) are
    metadata, often stale (an export traced at one size): they are dropped, and every shape
    is inferred from the graph inputs alone, so that neither a rule nor constant folding
    (Shape of a tensor whose declared size is static) can bake a size into a model whose
    input dims are dynamic.
    """
    model, _ = inputs.densify(model, "<model>")  # a ModelProto given to optimize() is never modified
    graph = gs.import_onnx(model)
    forget_declared_shapes(graph)
    infer_shapes(graph)
    used = {n.name for n in graph.nodes if n.name}
    counter = 0
    for node in graph.nodes:
        if not node.name:
            while f"{node.op}_{counter}" in used:
                counter += 1
            node.name = f"{node.op}_{counter}"
            used.add(node.name)
    return graph


def forget_declared_shapes(graph: gs.Graph) -> None:
    """Clear the shape of every main-graph tensor that is not a graph input (dtypes stay)."""
    inputs = {t.name for t in graph.inputs}
    for name, t in graph.tensors().items():
        if isinstance(t, gs.Variable) and name not in inputs:
            t.shape = None


_LIGHT_TENSOR = 4096  # constants up to this many elements keep their values for inference


def infer_shapes(graph: gs.Graph) -> None:
    """Run ONNX shape inference and write the shapes onto the graph's tensors.

    Inference runs on a light copy: small constants (shapes, pads, axes) keep their values,
    weights are declared by type and shape only, so large models are never serialized whole.
    Tensors inference cannot size keep the shape they had.
    """
    tensors = graph.tensors()
    inferred = _infer_light(graph)
    if inferred is None:  # keep going with the shapes we have
        return
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        t = tensors.get(vi.name)
        ttype = vi.type.tensor_type
        if not isinstance(t, gs.Variable):
            continue
        # the dtype counts even where the shape is unknown (a Reshape to a computed shape):
        # CastLike folds on it
        if t.dtype is None and ttype.elem_type:
            t.dtype = helper.tensor_dtype_to_np_dtype(ttype.elem_type)
        if ttype.HasField("shape"):
            t.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in ttype.shape.dim]


def _infer_light(graph: gs.Graph, input_shapes: Optional[Dict[str, List[int]]] = None) -> Optional[onnx.ModelProto]:
    """ONNX shape inference on a light copy of ``graph`` (see infer_shapes), the graph inputs
    declared at ``input_shapes`` where given; None when inference fails."""
    tensors = graph.tensors()
    light = onnx.ModelProto()
    light.ir_version = 10
    light.opset_import.extend(graph.import_domains or [helper.make_opsetid("", graph.opset)])
    light.graph.node.extend(OnnxExporter.export_node(n) for n in graph.nodes)
    for t in graph.inputs:
        vi = OnnxExporter.export_value_info_proto(t, False)
        if input_shapes and t.name in input_shapes and vi.type.HasField("tensor_type"):
            vi = helper.make_tensor_value_info(t.name, vi.type.tensor_type.elem_type, list(input_shapes[t.name]))
        light.graph.input.append(vi)
    light.graph.output.extend(OnnxExporter.export_value_info_proto(t, False) for t in graph.outputs)
    for name, t in tensors.items():
        if not isinstance(t, gs.Constant) or not name:
            continue
        if math.prod(t.shape) <= _LIGHT_TENSOR:  # t.shape leaves a lazy weight unread
            light.graph.initializer.append(OnnxExporter.export_tensor_proto(t))
        else:
            elem = helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype))
            light.graph.input.append(helper.make_tensor_value_info(name, elem, list(t.shape)))
    try:
        return shape_inference.infer_shapes(light, data_prop=True)
    except Exception as exc:
        log.debug("shape inference failed: %s", exc)
        return None


def normalize(graph: gs.Graph) -> gs.Graph:
    """The graph in the canonical form the rules expect (see module docstring).

    Shapes are inferred again after folding: pads and shapes that were computed in the graph
    are constants now, so intermediate shapes that inference could not size become known.
    Returns the graph (the same object).
    """
    _typed_constants(graph)
    for _ in range(8):
        before = len(graph.nodes)
        _castlike_to_cast(graph)
        _static_shape_slices(graph)
        graph.toposort()
        if _foldable(graph):
            _fold(graph)
        _remove_identities(graph)
        graph.toposort()
        # what was folded (a Pad's computed pads) sizes the tensors after it, whose Shapes
        # fold in the next round (RT-DETR's position embedding): to a fixpoint, so that a
        # second run has nothing left to fold
        infer_shapes(graph)
        if len(graph.nodes) == before:
            break
    return graph


#: Ops whose values are sequences or optionals: constant folding skips them (it can only hold
#: tensors), and whatever reads them stays unfolded too.
_NOT_FOLDED = {"SplitToSequence", "SequenceConstruct", "SequenceInsert", "SequenceErase", "SequenceEmpty",
               "Optional", "OptionalGetElement", "OptionalHasElement"}


def _fold(graph: gs.Graph) -> None:
    """Constant folding with onnxruntime, no size limit, never over sequence values.

    Folding is an improvement, not a requirement: if it fails, the graph keeps the nodes it
    could not fold (every tensor it did replace was computed, so the graph stays equal).
    """
    try:
        graph.fold_constants(fold_shapes=True, error_ok=True, size_threshold=None,
                             should_exclude_node=lambda node: node.op in _NOT_FOLDED)
    except Exception as exc:  # onnx-graphsurgeon outside its own error guard
        log.debug("constant folding stopped: %s", first_line(exc))
    graph.cleanup(remove_unused_graph_inputs=False)


def _typed_constants(graph: gs.Graph) -> None:
    """``Constant(value_float(s)/value_int(s))`` as initializers of the type ONNX gives them
    (float32, int64); read naively, a Python list of floats becomes a float64 tensor."""
    kinds = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}
    outputs = {t.name for t in graph.outputs}
    for node in graph.nodes:
        if node.op != "Constant" or len(node.outputs) != 1 or len(node.attrs) != 1:
            continue
        (key, value), = node.attrs.items()
        if key in kinds and node.outputs[0].name not in outputs:
            _to_constant(node, np.asarray(value, dtype=kinds[key]))
    graph.cleanup(remove_unused_graph_inputs=False)


def _foldable(graph: gs.Graph) -> bool:
    """Whether constant folding could change anything (it copies the whole graph to find out)."""
    for node in graph.nodes:
        if node.op in ("Shape", "Size", "Constant") or all(isinstance(t, gs.Constant) for t in node.inputs if t.name):
            return True
    return False


def _static_shape_slices(graph: gs.Graph) -> None:
    """``Shape(x, start, end)`` (opset 15) whose dims in that range are static becomes a constant;
    constant folding only folds a Shape when all of x's dims are (a dynamic batch stops it)."""
    outputs = {t.name for t in graph.outputs}
    for node in graph.nodes:
        if node.op != "Shape" or len(node.inputs) != 1 or len(node.outputs) != 1 or node.outputs[0].name in outputs:
            continue
        shape = node.inputs[0].shape
        if shape is None:
            continue
        n = len(shape)
        start, end = int(node.attrs.get("start", 0)), int(node.attrs.get("end", n))
        start, end = (max(0, min(n, v + n if v < 0 else v)) for v in (start, end))
        dims = list(shape[start:end])
        if (start, end) == (0, n) or not all(isinstance(d, int) and d >= 0 for d in dims):
            continue  # the whole shape is constant folding's (fold_shapes)
        _to_constant(node, np.array(dims, dtype=np.int64))
    graph.cleanup(remove_unused_graph_inputs=False)


def _castlike_to_cast(graph: gs.Graph) -> None:
    for node in graph.nodes:
        if node.op != "CastLike" or len(node.inputs) != 2:
            continue
        src, like = node.inputs
        if like.dtype is None:
            continue
        dtype = like.dtype
        try:
            to = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        except Exception:
            continue
        node.op = "Cast"
        node.attrs = {"to": int(to)}
        node.inputs.pop()  # drop `like`: only its dtype mattered


def _remove_identities(graph: gs.Graph) -> None:
    outputs = {t.name for t in graph.outputs}
    inputs = {t.name for t in graph.inputs}
    for node in list(graph.nodes):
        if node.op != "Identity" or not node.outputs:
            continue
        src, dst = node.inputs[0], node.outputs[0]
        if dst.name not in outputs:
            for consumer in list(dst.outputs):
                _replace_input(consumer, dst, src)
            node.outputs.clear()
            node.inputs.clear()
        elif (
            src.inputs
            and src.name not in outputs
            and src.name not in inputs
            and len(src.outputs) == 1
            and not isinstance(src, gs.Constant)
        ):
            # Let src's producer write the output name directly.
            prod = src.inputs[0]
            node.outputs.clear()
            node.inputs.clear()
            prod.outputs[prod.outputs.index(src)] = dst
    graph.cleanup(remove_unused_graph_inputs=False)


def _to_constant(node: gs.Node, values: np.ndarray) -> None:
    """Its one output's readers read a constant of that name and value instead; the node is
    disconnected (cleanup removes it)."""
    out = node.outputs[0]
    const = gs.Constant(out.name, values)
    for consumer in list(out.outputs):
        _replace_input(consumer, out, const)
    node.outputs.clear()


def _replace_input(node: gs.Node, old, new) -> None:
    for i, t in enumerate(node.inputs):
        if t is old:
            node.inputs[i] = new


def export(graph: gs.Graph, original: onnx.ModelProto, consume: bool = False) -> onnx.ModelProto:
    """Back to a ModelProto with the original's opsets, IR version and metadata.

    Weights go into the model one at a time (onnx-graphsurgeon's own export builds a list of
    every initializer, copies it into a GraphProto, then that into a ModelProto: three copies
    of the weights at once). With ``consume``, each rewritten weight's array is dropped from
    the graph once it is in the model, so the weights are held about once while exporting; the
    graph is not usable afterwards.
    """
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = _graph_to_model(graph, consume)
    model.ir_version = original.ir_version
    del model.opset_import[:]
    model.opset_import.extend(original.opset_import)
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, field, getattr(original, field))
    del model.metadata_props[:]
    model.metadata_props.extend(original.metadata_props)
    model.graph.doc_string = original.graph.doc_string
    model.graph.name = original.graph.name
    del model.functions[:]
    model.functions.extend(original.functions)
    _forget_invented_dims(model)
    _keep_declared_output_dims(model, original)
    return model


def _graph_to_model(graph: gs.Graph, consume: bool) -> onnx.ModelProto:
    """The top graph as a ModelProto (nodes, inputs, outputs, value_info, initializers), built
    in place: what onnx-graphsurgeon's export_onnx produces, without its copies of the weights."""
    model = onnx.ModelProto()
    g = model.graph
    g.node.extend(OnnxExporter.export_node(n) for n in graph.nodes)
    g.input.extend(OnnxExporter.export_value_info_proto(t, False) for t in graph.inputs)
    g.output.extend(OnnxExporter.export_value_info_proto(t, False) for t in graph.outputs)
    tensors = graph.tensors()
    io = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
    for name, t in tensors.items():
        if isinstance(t, gs.Constant):
            values = t._values
            if isinstance(values, SparseValues):
                g.sparse_initializer.append(OnnxExporter.export_sparse_tensor_proto(t))
            elif isinstance(values, LazyValues):  # an untouched weight: the original's tensor, copied once
                dst = g.initializer.add()
                dst.CopyFrom(values.tensor)
                dst.name = name
            else:
                proto = OnnxExporter.export_tensor_proto(t)
                g.initializer.append(proto)
                del proto
                if consume:
                    t._values = np.zeros(0, dtype=t.dtype)  # the model holds it now
        elif name not in io and (t.dtype is not None or t.shape is not None):
            g.value_info.append(OnnxExporter.export_value_info_proto(t, False))
    return model


def _forget_invented_dims(model: onnx.ModelProto) -> None:
    """Drop the names shape inference invents for dims it cannot size ('unk__3'): two tensors
    sharing one would tell onnxruntime they have equal sizes, which inference does not know
    (it gives every element of a sequence of unequal tensors the same name)."""
    for vi in list(model.graph.value_info) + list(model.graph.output):
        if not vi.type.HasField("tensor_type"):
            continue
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param.startswith("unk__"):
                d.ClearField("dim_param")


def _keep_declared_output_dims(model: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """Output shapes of the result: the inferred ones, except that a declared symbolic name is
    kept where inference agrees the dim is dynamic (so 'batch' stays 'batch'), and a declared
    static dim is kept where inference could not size it and every input is static (then the
    one input size there is, verification checks the output at). An output inference could not
    size at all under dynamic inputs keeps the declared rank and symbolic names, sizes unknown:
    a graph output must have a shape (onnx.checker)."""
    static_inputs = all(
        d.HasField("dim_value") for i in original.graph.input for d in i.type.tensor_type.shape.dim
    )
    declared = {o.name: o for o in original.graph.output}
    for out in model.graph.output:
        old = declared.get(out.name)
        if old is None or not old.type.tensor_type.HasField("shape"):
            continue
        new_t = out.type.tensor_type
        old_dims = old.type.tensor_type.shape.dim
        if not new_t.HasField("shape"):
            if static_inputs:
                new_t.shape.CopyFrom(old.type.tensor_type.shape)
            else:  # the declared rank and names, sizes unknown (a graph output needs a shape)
                for old_d in old_dims:
                    new = new_t.shape.dim.add()
                    if old_d.HasField("dim_param"):
                        new.dim_param = old_d.dim_param
            continue
        if len(new_t.shape.dim) != len(old_dims):
            continue
        for new, old_d in zip(new_t.shape.dim, old_dims):
            if new.HasField("dim_value"):
                continue
            if old_d.HasField("dim_param") and (new.HasField("dim_param") or not new.HasField("dim_value")):
                new.dim_param = old_d.dim_param
            elif old_d.HasField("dim_value") and not new.HasField("dim_param") and static_inputs:
                new.dim_value = old_d.dim_value


def tensor_shapes(graph: gs.Graph, model: onnx.ModelProto, input_shapes: Dict[str, List[int]]) -> Dict[str, List[int]]:
    """Concrete shapes of the graph's activations at the resolved input shapes, for counting.

    Cheapest first, each step only while some activation is still unsized:
    1. symbolic dims resolved from the input shapes;
    2. shape inference again with the inputs at their concrete sizes (symbols that inference
       invented, such as a Resize's output batch 'unk__0', are not the inputs' symbols);
    3. inference on a copy whose shape computations are folded into constants (an Expand to a
       shape read through Shape and Max under a dynamic batch, which inference cannot follow).
    """
    out = _symbolic_resolved(graph, model, input_shapes)
    if not _unsized(graph, out):
        return out
    inferred = _infer_light(graph, input_shapes)
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) if inferred else []:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        if vi.name not in out and vi.type.tensor_type.HasField("shape") and None not in dims:
            out[vi.name] = dims
    unsized = _unsized(graph, out)
    if not unsized:
        return out
    try:
        copy = graph.copy()
        for t in copy.inputs:
            if t.name in input_shapes:
                t.shape = list(input_shapes[t.name])
        forget_declared_shapes(copy)
        infer_shapes(copy)
        if _foldable(copy):
            _fold(copy)
        infer_shapes(copy)
    except Exception as exc:  # counting is best effort
        log.debug("shapes at the resolved input shapes: %s", first_line(exc))
        return out
    tensors = copy.tensors()
    for name in unsized:
        t = tensors.get(name)
        shape = getattr(t, "shape", None)
        if shape is not None and all(isinstance(d, int) for d in shape):
            out[name] = [int(d) for d in shape]
    return out


def _unsized(graph: gs.Graph, sized: Dict[str, List[int]]) -> List[str]:
    return [n for n, t in graph.tensors().items() if isinstance(t, gs.Variable) and n not in sized]


def _symbolic_resolved(graph: gs.Graph, model: onnx.ModelProto, input_shapes: Dict[str, List[int]]) -> Dict[str, List[int]]:
    symbols: Dict[str, int] = {}
    for inp in model.graph.input:
        for d, v in zip(inp.type.tensor_type.shape.dim, input_shapes.get(inp.name, [])):
            if d.dim_param:
                symbols[d.dim_param] = v
    out: Dict[str, List[int]] = {}
    for name, t in graph.tensors().items():
        shape = getattr(t, "shape", None)
        if shape is None or isinstance(t, gs.Constant):
            continue
        dims = [d if isinstance(d, int) else symbols.get(d) for d in shape]
        if all(isinstance(d, int) for d in dims):
            out[name] = dims
    return out


def resolve_input_shapes(
    model: onnx.ModelProto, overrides: Optional[Dict[str, Sequence[int]]], label: str
) -> Dict[str, List[int]]:
    """Concrete shapes for every graph input.

    Static dims are kept; ``overrides`` (from ``--input-shape``) win; a dynamic batch axis
    (axis 0) defaults to 1. Any other dynamic dim without an override is an error.
    """
    overrides = dict(overrides or {})
    init = {i.name for i in model.graph.initializer}
    shapes: Dict[str, List[int]] = {}
    for inp in model.graph.input:
        if inp.name in init:
            continue
        if not inp.type.HasField("tensor_type"):
            raise OnnxrepError(f"{label}: input '{inp.name}' is not a tensor; onnxrep handles tensor inputs only")
        dims = list(inp.type.tensor_type.shape.dim)
        if inp.name in overrides:
            shape = [int(d) for d in overrides.pop(inp.name)]
            if inp.type.tensor_type.HasField("shape"):
                if len(shape) != len(dims):
                    raise OnnxrepError(f"{label}: --input-shape {inp.name} has rank {len(shape)}, model says {len(dims)}")
                for axis, (d, v) in enumerate(zip(dims, shape)):
                    if d.HasField("dim_value") and d.dim_value != v:
                        raise OnnxrepError(
                            f"{label}: --input-shape {inp.name} axis {axis} is {v}, model fixes it to {d.dim_value}"
                        )
            shapes[inp.name] = shape
            continue
        if not inp.type.tensor_type.HasField("shape"):
            raise OnnxrepError(f"{label}: input '{inp.name}' has no shape; pass --input-shape {inp.name}=...")
        shape = []
        for axis, d in enumerate(dims):
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(int(d.dim_value))
            elif axis == 0:
                shape.append(1)
            else:
                name = d.dim_param or "?"
                template = ",".join(
                    str(x.dim_value) if x.HasField("dim_value") and x.dim_value > 0 else "1" if i == 0 else x.dim_param or "?"
                    for i, x in enumerate(dims)
                )
                raise OnnxrepError(
                    f"{label}: input '{inp.name}' has dynamic dim '{name}' at axis {axis}; "
                    f"pass --input-shape {inp.name}={template} with concrete sizes for the named dims"
                )
        shapes[inp.name] = shape
    if overrides:
        raise OnnxrepError(f"{label}: --input-shape names unknown input(s): {', '.join(overrides)}")
    return shapes
