"""What onnxrep accepts as a model: checks and repairs before onnx-graphsurgeon and onnxruntime
see it (DESIGN 5, "Bad input").

onnx-graphsurgeon, onnxruntime and the rules assume a well-formed model: names that are UTF-8
text, tensor types that exist, initializers whose data fill their shape, every node input
produced somewhere, one writer per tensor, no cycles. A model that breaks one of these gets a
one-line :class:`OnnxrepError` naming the file and the node instead of a traceback from deep
inside a library.

The checks are onnx's own, applied per part (``onnx.checker.check_node`` / ``check_tensor`` /
``check_sparse_tensor`` / ``check_function`` and strict shape inference), plus graph-level checks
written here. ``onnx.checker.check_model`` is not applied to the whole model because it also
rejects models onnxruntime runs and onnxrep rewrites correctly: graph outputs declared without a
shape, nodes stored out of topological order, stale declared shapes of intermediate tensors.

Repair: sparse initializers become ordinary (dense) initializers, because onnx-graphsurgeon and
the rules read dense tensors only. :func:`densify` says what it did, so the caller can report it.
"""

from __future__ import annotations

import heapq
import re
from typing import Iterable, Iterator, List, Optional, Set, Tuple

import numpy as np
import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from onnx import helper, numpy_helper, shape_inference

from .errors import OnnxrepError, first_line

#: A graph input with more elements than this cannot be drawn for verification.
MAX_INPUT_ELEMENTS = 1 << 31

_DEFAULT_DOMAINS = ("", "ai.onnx")
_TYPE_NAMES = {v: k for k, v in onnx.TensorProto.DataType.items()}
#: Element types onnx-graphsurgeon reads besides the ones numpy has.
_NON_NUMPY_TYPES = {
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.FLOAT8E4M3FN,
    onnx.TensorProto.FLOAT8E4M3FNUZ,
    onnx.TensorProto.FLOAT8E5M2,
    onnx.TensorProto.FLOAT8E5M2FNUZ,
}
_LIGHT_TENSOR = 4096  # constants up to this many elements keep their values for shape inference


# --------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------


def show(text) -> str:
    """A name as it can be printed: invalid UTF-8 bytes escaped."""
    if isinstance(text, bytes):
        return text.decode("utf-8", "backslashreplace")
    return text


def node_label(node: onnx.NodeProto, index: int) -> str:
    """``node 'name' (Op)``, or ``node #index (Op)`` when the node has no usable name."""
    op = show(node.op_type)
    domain = show(node.domain)
    if domain not in _DEFAULT_DOMAINS:
        op = f"{domain}:{op}"
    name = node.name
    if name and not isinstance(name, bytes):
        return f"node '{name}' ({op})"
    return f"node #{index} ({op})"


def _repeated(field: FieldDescriptor) -> bool:
    if hasattr(field, "is_repeated"):  # protobuf >= 6 (``label`` is gone)
        return field.is_repeated
    return field.label == FieldDescriptor.LABEL_REPEATED


def _bad_text(msg: Message, path: Tuple = ()) -> Iterator[Tuple[Tuple, str, object]]:
    """(path of (message, field, index), field name, value) for every string field holding
    bytes that are not UTF-8 (protobuf hands those back as ``bytes`` instead of ``str``)."""
    for field, value in msg.ListFields():
        repeated = _repeated(field)
        if field.type == FieldDescriptor.TYPE_STRING:
            for i, v in enumerate(value if repeated else [value]):
                if isinstance(v, bytes):
                    yield path, f"{field.name}[{i}]" if repeated else field.name, v
        elif field.type == FieldDescriptor.TYPE_MESSAGE and not field.message_type.GetOptions().map_entry:
            for i, v in enumerate(value if repeated else [value]):
                yield from _bad_text(v, path + ((msg, field.name, i if repeated else None),))


def check_text(model: onnx.ModelProto, label: str) -> None:
    """Every string field (names, op types, domains, doc strings, metadata) is UTF-8 text."""
    for path, field, value in _bad_text(model):
        where = ""
        for parent, name, index in reversed(path):
            child = getattr(parent, name)
            child = child[index] if index is not None else child
            if isinstance(child, onnx.NodeProto):
                where = node_label(child, index if index is not None else 0) + ": "
                break
        chain = ".".join(f"{name}[{index}]" if index is not None else name for _, name, index in path)
        field_path = f"{chain}.{field}" if chain else field
        raise OnnxrepError(f"{label}: {where}{field_path} is not UTF-8 text ('{show(value)}')")


# --------------------------------------------------------------------------------------
# Graph walking
# --------------------------------------------------------------------------------------


def _subgraphs(node: onnx.NodeProto) -> Iterator[Tuple[str, onnx.GraphProto]]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH or attr.HasField("g"):
            yield attr.name, attr.g
        for g in attr.graphs:
            yield attr.name, g


def _all_nodes(graph: onnx.GraphProto, where: str = "") -> Iterator[Tuple[str, int, onnx.NodeProto]]:
    """(prefix, index, node) for every node, subgraphs included; prefix locates a subgraph."""
    for i, node in enumerate(graph.node):
        yield where, i, node
        for name, sub in _subgraphs(node):
            yield from _all_nodes(sub, f"{where}{node_label(node, i)} > {name} > ")


def _model_nodes(model: onnx.ModelProto) -> Iterator[Tuple[str, int, onnx.NodeProto]]:
    yield from _all_nodes(model.graph)
    for f in model.functions:
        yield from _all_nodes(onnx.GraphProto(node=f.node), f"function '{f.domain}:{f.name}' > ")


def _type_name(elem_type: int) -> str:
    return _TYPE_NAMES.get(elem_type, str(elem_type))


# --------------------------------------------------------------------------------------
# Operators and attributes
# --------------------------------------------------------------------------------------


def check_ops(model: onnx.ModelProto, label: str, opset: int) -> None:
    """Every default-domain op exists at the model's opset (exporters can leave framework ops,
    such as tf2onnx's ``StatefulPartitionedCall``, unconverted in the default domain)."""
    local = {(f.domain, f.name) for f in model.functions}
    for where, i, node in _all_nodes(model.graph):
        if node.domain not in _DEFAULT_DOMAINS or (node.domain, node.op_type) in local:
            continue
        op = node.op_type
        if not op:
            raise OnnxrepError(f"{label}: {where}{node_label(node, i)}: node has no op_type")
        if not onnx.defs.has(op):
            raise OnnxrepError(
                f"{label}: {where}{node_label(node, i)}: '{op}' is not an ONNX operator (at opset {opset} or any "
                "other); the exporter left it unconverted"
            )
        try:
            onnx.defs.get_schema(op, opset, "")
        except onnx.defs.SchemaError:
            since = min(s.since_version for s in onnx.defs.get_all_schemas_with_history() if s.name == op and not s.domain)
            raise OnnxrepError(
                f"{label}: {where}{node_label(node, i)}: '{op}' exists from opset {since} on; the model imports opset {opset}"
            ) from None


def check_attributes(model: onnx.ModelProto, label: str) -> None:
    """Attributes onnx-graphsurgeon can carry: string values that are UTF-8 text, lists that
    are not empty (an empty list cannot be written back without its type)."""
    for where, i, node in _model_nodes(model):
        for attr in node.attribute:
            texts = [attr.s] if attr.type == onnx.AttributeProto.STRING else list(attr.strings)
            for s in texts:
                try:
                    s.decode("utf-8")
                except UnicodeDecodeError:
                    raise OnnxrepError(
                        f"{label}: {where}{node_label(node, i)}: attribute '{attr.name}' holds binary bytes "
                        f"({show(s[:16])}), not text; onnxrep cannot carry such an attribute"
                    ) from None
            lists = {
                onnx.AttributeProto.INTS: attr.ints,
                onnx.AttributeProto.FLOATS: attr.floats,
                onnx.AttributeProto.STRINGS: attr.strings,
            }
            if attr.type in lists and not lists[attr.type] and not attr.ref_attr_name:
                raise OnnxrepError(
                    f"{label}: {where}{node_label(node, i)}: attribute '{attr.name}' is an empty list; "
                    "leave it out or give its values"
                )


# --------------------------------------------------------------------------------------
# Types and tensors
# --------------------------------------------------------------------------------------


def _check_type(tp: onnx.TypeProto, what: str, label: str) -> None:
    kind = tp.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        t = getattr(tp, kind)
        if t.elem_type not in _TYPE_NAMES:
            raise OnnxrepError(f"{label}: {what} has element type {t.elem_type}, which is not an ONNX type")
        if t.HasField("shape"):
            for axis, d in enumerate(t.shape.dim):
                if d.HasField("dim_value") and d.dim_value < 0:
                    raise OnnxrepError(f"{label}: {what} has negative size {d.dim_value} at axis {axis}")
    elif kind == "sequence_type":
        _check_type(tp.sequence_type.elem_type, what, label)
    elif kind == "optional_type":
        _check_type(tp.optional_type.elem_type, what, label)
    elif kind == "map_type":
        _check_type(tp.map_type.value_type, what, label)


def _check_value_infos(graph: onnx.GraphProto, label: str, where: str) -> None:
    for kind, infos in (("input", graph.input), ("output", graph.output), ("value_info", graph.value_info)):
        for vi in infos:
            _check_type(vi.type, f"{where}graph {kind} '{vi.name}'", label)
    inits = {t.name for t in graph.initializer} | {s.values.name for s in graph.sparse_initializer}
    for vi in graph.input:
        if vi.name not in inits and vi.type.WhichOneof("value") is None:
            raise OnnxrepError(f"{label}: {where}graph input '{vi.name}' has no type")


_T = onnx.TensorProto
#: Bytes per element in raw_data, for the types whose storage is not bit-packed.
_RAW_ITEMSIZE = {
    _T.FLOAT: 4, _T.UINT8: 1, _T.INT8: 1, _T.UINT16: 2, _T.INT16: 2, _T.INT32: 4, _T.INT64: 8, _T.BOOL: 1,
    _T.FLOAT16: 2, _T.DOUBLE: 8, _T.UINT32: 4, _T.UINT64: 8, _T.COMPLEX64: 8, _T.COMPLEX128: 16,
    _T.BFLOAT16: 2, _T.FLOAT8E4M3FN: 1, _T.FLOAT8E4M3FNUZ: 1, _T.FLOAT8E5M2: 1, _T.FLOAT8E5M2FNUZ: 1,
}


def _data_size_error(t: onnx.TensorProto) -> Optional[str]:
    """Why ``t``'s data does not fill its shape exactly, or None."""
    count = int(np.prod([int(d) for d in t.dims], dtype=object)) if t.dims else 1
    if t.HasField("raw_data"):
        itemsize = _RAW_ITEMSIZE.get(t.data_type)
        if itemsize is not None and len(t.raw_data) != count * itemsize:
            return f"raw data has {len(t.raw_data)} bytes, its shape {list(t.dims)} and type need {count * itemsize}"
        return None
    field = helper.tensor_dtype_to_field(t.data_type)
    per = 2 if t.data_type in (_T.COMPLEX64, _T.COMPLEX128) else 1
    if t.data_type in _RAW_ITEMSIZE or t.data_type == _T.STRING:
        n = len(getattr(t, field))
        if n != count * per:
            return f"holds {n} values in {field}, its shape {list(t.dims)} needs {count * per}"
    return None


def _check_tensor(t: onnx.TensorProto, what: str, label: str, ctx) -> None:
    if t.data_type not in _TYPE_NAMES or t.data_type == onnx.TensorProto.UNDEFINED:
        raise OnnxrepError(f"{label}: {what} has element type {t.data_type}, which is not an ONNX type")
    for axis, d in enumerate(t.dims):
        if d < 0:
            raise OnnxrepError(f"{label}: {what} has negative size {d} at axis {axis}")
    if t.data_location == onnx.TensorProto.EXTERNAL:
        raise OnnxrepError(f"{label}: {what}: its external data was not loaded")
    if t.data_type not in _NON_NUMPY_TYPES:
        try:
            helper.tensor_dtype_to_np_dtype(t.data_type)
        except Exception:
            raise OnnxrepError(f"{label}: {what} has element type {_type_name(t.data_type)}, which onnxrep cannot read") from None
    try:
        onnx.checker.check_tensor(t, ctx)
    except Exception as exc:
        raise OnnxrepError(f"{label}: {what}: {_checker_message(exc)}") from None
    error = _data_size_error(t)
    if error:
        raise OnnxrepError(f"{label}: {what}: {error}")


def check_tensors(model: onnx.ModelProto, label: str) -> None:
    """Declared types exist; initializers (and Constant values) have a readable element type
    and exactly the data their shape needs; sparse initializers are consistent."""
    ctx = _checker_context(model)
    graphs: List[Tuple[str, onnx.GraphProto]] = [("", model.graph)]
    graphs += [(f"{w}{node_label(n, i)} > {name} > ", g) for w, i, n in _all_nodes(model.graph) for name, g in _subgraphs(n)]
    for where, graph in graphs:
        _check_value_infos(graph, label, where)
        for t in graph.initializer:
            _check_tensor(t, f"{where}initializer '{t.name}'", label, ctx)
        for s in graph.sparse_initializer:
            what = f"{where}sparse initializer '{s.values.name}'"
            _check_tensor(s.values, what, label, ctx)
            try:
                onnx.checker.check_sparse_tensor(s, ctx)
            except Exception as exc:
                raise OnnxrepError(f"{label}: {what}: {_checker_message(exc)}") from None
    for where, i, node in _model_nodes(model):
        for attr in node.attribute:
            tensors = [attr.t] if attr.HasField("t") else list(attr.tensors)
            for t in tensors:
                _check_tensor(t, f"{where}{node_label(node, i)}: attribute '{attr.name}'", label, ctx)


# --------------------------------------------------------------------------------------
# Graph structure
# --------------------------------------------------------------------------------------


def check_graph(graph: onnx.GraphProto, label: str, outer: Iterable[str] = (), where: str = "") -> None:
    """Names are given and unique where they must be; every node input is produced by a node,
    an initializer, a graph input or (in a subgraph) the enclosing graph; every graph output is
    produced; the nodes form no cycle. Subgraphs are checked with their outer scope."""
    inputs = [i.name for i in graph.input]
    inits = [t.name for t in graph.initializer] + [s.values.name for s in graph.sparse_initializer]
    for kind, names in (("graph input", inputs), ("initializer", inits), ("graph output", [o.name for o in graph.output])):
        for i, n in enumerate(names):
            if not n:
                raise OnnxrepError(f"{label}: {where}{kind} #{i} has an empty name")
    if not graph.output:
        raise OnnxrepError(f"{label}: {where}the graph declares no outputs")
    for kind, names in (("graph input", inputs), ("initializer", inits)):
        seen: Set[str] = set()
        for n in names:
            if n in seen:
                raise OnnxrepError(f"{label}: {where}{kind} '{n}' is declared twice")
            seen.add(n)
    sources = set(inputs) | set(inits)
    producer = {}
    for i, node in enumerate(graph.node):
        for out in node.output:
            if not out:
                continue
            if out in sources:
                raise OnnxrepError(f"{label}: {where}{node_label(node, i)}: writes '{out}', which is a graph input or initializer")
            if out in producer:
                j = producer[out]
                raise OnnxrepError(
                    f"{label}: {where}{node_label(node, i)}: writes '{out}', which {node_label(graph.node[j], j)} "
                    "writes too (a tensor must have one producer)"
                )
            producer[out] = i
    visible = sources | set(producer) | set(outer)
    for i, node in enumerate(graph.node):
        for name in node.input:
            if name and name not in visible:
                raise OnnxrepError(
                    f"{label}: {where}{node_label(node, i)}: input '{name}' is not produced by any node, "
                    "initializer or graph input"
                )
    for o in graph.output:
        if o.name not in visible:
            raise OnnxrepError(f"{label}: {where}graph output '{o.name}' is not produced by any node, initializer or input")
    _topological_order(graph, label, where)
    for i, node in enumerate(graph.node):
        for name, sub in _subgraphs(node):
            check_graph(sub, label, visible, f"{where}{node_label(node, i)} > {name} > ")


def _producers(graph: onnx.GraphProto):
    return {out: i for i, node in enumerate(graph.node) for out in node.output if out}


def _topological_order(graph: onnx.GraphProto, label: str, where: str = "") -> List[int]:
    """Indices of the nodes in an order that computes every input before it is read (the stored
    order when that already does); an error naming a node on a cycle when there is none."""
    nodes = graph.node
    producer = _producers(graph)
    deps = [{producer[n] for n in node.input if n in producer} | _implicit_deps(node, producer) for node in nodes]
    consumers: List[List[int]] = [[] for _ in nodes]
    for i, d in enumerate(deps):
        for j in d:
            consumers[j].append(i)
    missing = [len(d) for d in deps]
    ready = [i for i, m in enumerate(missing) if m == 0]
    heapq.heapify(ready)
    order: List[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for c in consumers[i]:
            missing[c] -= 1
            if missing[c] == 0:
                heapq.heappush(ready, c)
    if len(order) < len(nodes):
        i = next(i for i, m in enumerate(missing) if m)
        raise OnnxrepError(f"{label}: {where}{node_label(nodes[i], i)}: is part of a cycle (its inputs depend on its own outputs)")
    return order


def _implicit_deps(node: onnx.NodeProto, producer) -> Set[int]:
    """Producers of outer-scope tensors a node's subgraphs read."""
    deps: Set[int] = set()
    for _, sub in _subgraphs(node):
        for _, _, inner in _all_nodes(sub):
            deps |= {producer[n] for n in inner.input if n in producer}
    return deps


# --------------------------------------------------------------------------------------
# onnx's own checks
# --------------------------------------------------------------------------------------


def _checker_context(model: onnx.ModelProto):
    ctx = onnx.checker.C.CheckerContext()
    ctx.ir_version = model.ir_version
    ctx.opset_imports = {("" if d.domain == "ai.onnx" else d.domain): d.version for d in model.opset_import}
    return ctx


def check_model_header(model: onnx.ModelProto, label: str) -> None:
    """IR version and opset imports onnxruntime and onnx accept."""
    if model.ir_version < 3:
        raise OnnxrepError(f"{label}: IR version {model.ir_version} is not supported (3..{onnx.IR_VERSION})")
    if model.ir_version > onnx.IR_VERSION:
        raise OnnxrepError(
            f"{label}: IR version {model.ir_version} is newer than the installed onnx supports ({onnx.IR_VERSION})"
        )
    seen = {}
    for imp in model.opset_import:
        domain = "" if imp.domain == "ai.onnx" else imp.domain
        if domain in seen:
            raise OnnxrepError(f"{label}: opset of domain '{imp.domain}' is imported twice ({seen[domain]} and {imp.version})")
        if imp.version < 1:
            raise OnnxrepError(f"{label}: opset {imp.version} of domain '{imp.domain}' is not a valid version")
        seen[domain] = imp.version


def check_nodes(model: onnx.ModelProto, label: str) -> None:
    """``onnx.checker.check_node`` on every node (schema: inputs, outputs, attribute names and
    types), and ``check_function`` on model-local functions. A subgraph is checked node by node
    (its outer-scope references are check_graph's job), so graph attributes are emptied first."""
    ctx = _checker_context(model)
    for where, i, node in _all_nodes(model.graph):
        if any(True for _ in _subgraphs(node)):
            node = _without_subgraphs(node)
        try:
            onnx.checker.check_node(node, ctx)
        except Exception as exc:
            raise OnnxrepError(f"{label}: {where}{node_label(node, i)}: {_checker_message(exc)}") from None
    for f in model.functions:
        where = f"function '{f.domain}:{f.name}' > "
        body = onnx.GraphProto(node=f.node)
        body.input.extend(onnx.ValueInfoProto(name=n) for n in f.input)
        body.output.extend(onnx.ValueInfoProto(name=n) for n in f.output)
        check_graph(body, label, where=where)
        try:
            onnx.checker.check_function(f, ctx)
        except Exception as exc:
            raise OnnxrepError(f"{label}: function '{f.domain}:{f.name}': {_checker_message(exc)}") from None


def _without_subgraphs(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    empty = onnx.GraphProto(name="subgraph")
    for attr in copy.attribute:
        if attr.HasField("g"):
            attr.g.CopyFrom(empty)
        for g in attr.graphs:
            g.CopyFrom(empty)
    return copy


_TENSOR_NAME = re.compile(r"\s*\(\s*tensor name: [^)]*\)")


def _checker_message(exc: BaseException) -> str:
    """onnx.checker's first line without what the caller's message says already (the node or
    tensor it is about)."""
    text = first_line(exc)
    short = _TENSOR_NAME.sub("", text.split("==> Context:")[0]).replace("TensorProto ", "", 1).strip()
    return short or text


_INFERENCE_NODE = re.compile(r"\(op_type:([^,]*), node name: (.*?)\): (.*)")


def check_inference(model: onnx.ModelProto, label: str) -> None:
    """Strict ONNX shape inference: catches inconsistent models (a conv weight of the wrong
    rank, attributes that do not fit the input) before the rules read them. Type constraints
    of the op schemas are not enforced: onnxrep also rewrites models outside them (bfloat16
    convs, with verification off), and onnxruntime judges what it can run. Runs on a light
    copy: declared shapes of intermediate tensors and outputs are left out (they are metadata,
    not truth), large initializers are declared by type and shape only, so the cost does not
    grow with the weights."""
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    g = model.graph
    inits = {t.name for t in g.initializer} | {s.values.name for s in g.sparse_initializer}
    light.graph.node.extend(g.node[i] for i in _topological_order(g, label))
    light.graph.input.extend(i for i in g.input if i.name not in inits)
    for o in g.output:
        vi = light.graph.output.add()
        vi.CopyFrom(o)
        if vi.type.HasField("tensor_type"):
            vi.type.tensor_type.ClearField("shape")
    for t in g.initializer:
        if int(np.prod(t.dims, dtype=object)) <= _LIGHT_TENSOR:
            light.graph.initializer.append(t)
        else:
            light.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    for s in g.sparse_initializer:
        light.graph.input.append(helper.make_tensor_value_info(s.values.name, s.values.data_type, list(s.dims)))
    try:
        shape_inference.infer_shapes(light, check_type=False, strict_mode=True)
    except Exception as exc:
        text = first_line(exc)
        m = _INFERENCE_NODE.search(text)
        if m:
            op, name, detail = m.groups()
            detail = detail.strip()
            raise OnnxrepError(f"{label}: node '{name}' ({op}): {detail}") from None
        raise OnnxrepError(f"{label}: shape inference fails: {text}") from None


def check_convs(model: onnx.ModelProto, label: str) -> None:
    """Conv and ConvTranspose whose stored weights and bias agree with each other and with the
    attributes (onnxruntime refuses such a model at run time; the conv algebra must never
    read it). Weights computed in the graph are checked by shape inference only."""
    consts = {t.name: t for t in model.graph.initializer}
    for i, node in enumerate(model.graph.node):
        if node.op_type not in ("Conv", "ConvTranspose") or node.domain not in _DEFAULT_DOMAINS:
            continue
        where = f"{label}: {node_label(node, i)}"
        attrs = {a.name: a for a in node.attribute}
        group = attrs["group"].i if "group" in attrs else 1
        if group < 1:
            raise OnnxrepError(f"{where}: group is {group}; it must be at least 1")
        w = consts.get(node.input[1]) if len(node.input) > 1 else None
        if w is None:
            continue
        dims = [int(d) for d in w.dims]
        if len(dims) < 3:
            raise OnnxrepError(f"{where}: weight '{w.name}' has shape {dims}; a convolution weight has rank 3 or more")
        if dims[0] % group:
            raise OnnxrepError(f"{where}: weight '{w.name}' has {dims[0]} channels on axis 0, not a multiple of group {group}")
        kernel = attrs["kernel_shape"].ints if "kernel_shape" in attrs else dims[2:]
        if list(kernel) != dims[2:]:
            raise OnnxrepError(f"{where}: kernel_shape {list(kernel)} does not match weight '{w.name}' of shape {dims}")
        out_channels = dims[0] if node.op_type == "Conv" else dims[1] * group
        b = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if b is not None and [int(d) for d in b.dims] != [out_channels]:
            raise OnnxrepError(
                f"{where}: bias '{b.name}' has shape {[int(d) for d in b.dims]}; weight '{w.name}' needs [{out_channels}]"
            )


def check_input_sizes(model: onnx.ModelProto, label: str) -> None:
    """Graph inputs small enough to draw verification inputs for."""
    inits = {t.name for t in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits or not inp.type.tensor_type.HasField("shape"):
            continue
        dims = [d.dim_value for d in inp.type.tensor_type.shape.dim if d.HasField("dim_value")]
        size = int(np.prod(dims, dtype=object)) if dims else 1
        if size > MAX_INPUT_ELEMENTS:
            raise OnnxrepError(
                f"{label}: input '{inp.name}' has {size} elements at its declared shape; onnxrep cannot "
                f"draw inputs that large to verify the result (limit {MAX_INPUT_ELEMENTS})"
            )


def check_model(model: onnx.ModelProto, label: str, opset: int) -> None:
    """Everything above, cheapest and most specific first (text before anything prints a name)."""
    check_model_header(model, label)
    check_ops(model, label, opset)
    check_attributes(model, label)
    check_tensors(model, label)
    check_graph(model.graph, label)
    check_nodes(model, label)
    check_convs(model, label)
    check_inference(model, label)
    check_input_sizes(model, label)


# --------------------------------------------------------------------------------------
# Repairs
# --------------------------------------------------------------------------------------


def dense_tensor(sparse: onnx.SparseTensorProto) -> onnx.TensorProto:
    """The dense TensorProto a SparseTensorProto stands for (same name and element type)."""
    values = numpy_helper.to_array(sparse.values).reshape(-1)
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
    dims = [int(d) for d in sparse.dims]
    dense = np.zeros(dims, dtype=values.dtype)
    if indices.size:
        if indices.ndim == 1:  # linearized indices
            dense.reshape(-1)[indices] = values
        else:  # [NNZ, rank] coordinates
            dense[tuple(indices.T)] = values
    return numpy_helper.from_array(dense, sparse.values.name)


def densify(model: onnx.ModelProto, label: str, in_place: bool = False) -> Tuple[onnx.ModelProto, Optional[str]]:
    """The model with its top-level sparse initializers turned into ordinary initializers.

    Returns (model, warning): the same object and None when there was nothing to do, else the
    model (``model`` itself with ``in_place``, a copy otherwise) and a sentence saying what was
    changed.
    """
    sparse = list(model.graph.sparse_initializer)
    if not sparse:
        return model, None
    ctx = _checker_context(model)
    dense = []
    for s in sparse:
        what = f"sparse initializer '{show(s.values.name)}'"
        try:
            onnx.checker.check_sparse_tensor(s, ctx)
            dense.append(dense_tensor(s))
        except Exception as exc:
            raise OnnxrepError(f"{label}: {what}: {first_line(exc)}") from None
    out = model
    if not in_place:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    del out.graph.sparse_initializer[:]
    out.graph.initializer.extend(dense)
    names = ", ".join(f"'{t.name}'" for t in dense[:3]) + (", ..." if len(dense) > 3 else "")
    return out, f"{len(dense)} sparse initializer(s) ({names}) were stored as dense initializers"
