"""Model statistics for the report: nodes, Conv count, parameters and FLOPs.

FLOPs are counted at the resolved input shapes (batch 1 unless given): 2 per multiply-add for
Conv, ConvTranspose, Gemm and MatMul (plus one per output element for a bias), one per tap and
output element for pooling, one per output element for every other compute op
(BatchNormalization: two). kernels.layer_flops costs rewrites the same way. Shape-only ops (Shape, Reshape,
Constant, ...) cost nothing. Parameters are the elements of all float initializers and
Constant node values.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import onnx
from onnx import shape_inference

FREE_OPS = {
    "Shape", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Constant", "ConstantOfShape", "Identity",
    "Cast", "CastLike", "Gather", "Slice", "Concat", "Split", "Transpose", "Expand", "Range", "Size",
}
_KEEP_VALUES = 4096  # initializers this small keep their data for shape inference


@dataclass
class ModelStats:
    nodes: int
    convs: int
    params: int
    flops: int
    ops: Dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"nodes": self.nodes, "convs": self.convs, "params": self.params, "flops": self.flops, "ops": self.ops}


def model_stats(
    model: onnx.ModelProto, input_shapes: Dict[str, List[int]], known_shapes: Optional[Dict[str, List[int]]] = None
) -> ModelStats:
    """Statistics at ``input_shapes``; ``known_shapes`` fills tensors shape inference cannot size."""
    graph = model.graph
    ops = Counter(n.op_type for n in graph.node)
    params = sum(int(np.prod(t.dims)) for t in graph.initializer if _is_float(t.data_type))
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and _is_float(attr.t.data_type):
                    params += int(np.prod(attr.t.dims))
    shapes = _shapes(model, input_shapes)
    for name, shape in (known_shapes or {}).items():
        shapes.setdefault(name, shape)
    flops = sum(_node_flops(node, shapes) for node in graph.node)
    return ModelStats(len(graph.node), ops.get("Conv", 0), params, int(flops), dict(sorted(ops.items())))


def _is_float(data_type: int) -> bool:
    return data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


def _shapes(model: onnx.ModelProto, input_shapes: Dict[str, List[int]]) -> Dict[str, List[int]]:
    """Static shapes of every tensor at the resolved input shapes, without copying large weights."""
    shapes: Dict[str, List[int]] = {}
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    g = light.graph
    g.node.extend(model.graph.node)
    for o in model.graph.output:  # names and types only: declared output shapes may be stale
        out = g.output.add()
        out.name = o.name
        if o.type.HasField("tensor_type"):
            out.type.tensor_type.elem_type = o.type.tensor_type.elem_type
        else:
            out.type.CopyFrom(o.type)
    init_names = set()
    for t in model.graph.initializer:
        init_names.add(t.name)
        shapes[t.name] = list(t.dims)
        if np.prod(t.dims) <= _KEEP_VALUES and t.data_location != onnx.TensorProto.EXTERNAL:
            g.initializer.append(t)
        else:  # type and shape only
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    for inp in model.graph.input:
        if inp.name in init_names:
            continue
        shape = input_shapes.get(inp.name)
        elem = inp.type.tensor_type.elem_type
        g.input.append(onnx.helper.make_tensor_value_info(inp.name, elem, shape))
        if shape is not None:
            shapes[inp.name] = list(shape)
    try:
        inferred = shape_inference.infer_shapes(light, data_prop=True)
    except Exception:
        inferred = light
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = [int(d.dim_value) for d in dims]
    return shapes


def _numel(shapes, name) -> int:
    shape = shapes.get(name)
    return int(np.prod(shape)) if shape is not None else 0


def _node_flops(node: onnx.NodeProto, shapes: Dict[str, List[int]]) -> int:
    op = node.op_type
    if op in FREE_OPS or not node.output:
        return 0
    out = _numel(shapes, node.output[0])
    if op == "Conv" and node.input[1] in shapes:
        w = shapes[node.input[1]]
        macs = out * int(np.prod(w[1:]))
        return 2 * macs + (out if len(node.input) > 2 and node.input[2] else 0)
    if op == "ConvTranspose" and node.input[1] in shapes:
        w = shapes[node.input[1]]
        return 2 * _numel(shapes, node.input[0]) * int(np.prod(w[1:]))
    if op in ("Gemm", "MatMul") and node.input[0] in shapes and shapes.get(node.output[0]):
        a = shapes[node.input[0]]
        k = a[0] if op == "Gemm" and _attr(node, "transA", 0) else a[-1]
        return 2 * out * int(k) + (out if op == "Gemm" and len(node.input) > 2 and node.input[2] else 0)
    if op in ("AveragePool", "MaxPool", "LpPool"):
        return out * int(np.prod(_attr(node, "kernel_shape", [1])))
    return elementwise_flops(op, out)


def elementwise_flops(op: str, outputs: int) -> int:
    """FLOPs of an op that is neither a layer nor a pool: none for shape and data-movement ops,
    two per output for BatchNormalization, one per output otherwise."""
    if op in FREE_OPS:
        return 0
    return 2 * outputs if op == "BatchNormalization" else outputs


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default
