"""One cost model for the whole product: the rules' growth checks and the report's statistics
(onnxrep/stats.py) count with these functions, so that a rewrite a rule accepts as "not more
expensive" never shows as growth in the report (tests/test_cost.py holds the two together).

FLOPs are of one image at the resolved input shapes (a dynamic batch counts as 1; sizes that
shape inference leaves symbolic come from the shapes resolved once at those input shapes,
``RepGraph.resolved``, or from the layer that makes the tensor): 2 per multiply-add for Conv,
ConvTranspose, Gemm and MatMul plus 1 per output element for a bias; 1 per tap and output
element for pooling; 2 per output element for BatchNormalization; 1 per output element for any
other compute op; nothing for shape and data-movement ops.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

import numpy as np
import onnx

from .errors import Decline
from .graph import spatial_size, static_shape
from .kernels import ConvParams, conv_macs

FREE_OPS = {
    "Shape", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Constant", "ConstantOfShape", "Identity",
    "Cast", "CastLike", "Gather", "Slice", "Concat", "Split", "Transpose", "Expand", "Range", "Size",
}


def conv_flops(p: ConvParams, out_size: Sequence[int], pool: bool = False) -> int:
    """A Conv (or, ``pool``, an AveragePool) producing spatial size ``out_size`` (one int per
    axis, any number of axes): 2 per multiply-add plus 1 per output for a non-zero bias; a pool
    1 per tap and output."""
    macs = conv_macs(p, out_size)
    if pool:
        return macs
    outputs = p.out_channels * math.prod(int(d) for d in out_size)
    return 2 * macs + (outputs if np.any(np.asarray(p.bias) != 0) else 0)


def elementwise_flops(op: str, outputs: int) -> int:
    """An op that is neither a layer nor a pool: nothing for shape and data-movement ops, two
    per output for BatchNormalization, one per output otherwise."""
    if op in FREE_OPS:
        return 0
    return 2 * outputs if op == "BatchNormalization" else outputs


#: Ops whose output has the size of their (first) activation input.
_SAME_SIZE = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "HardSwish", "Gelu", "Erf", "Neg",
              "Identity", "BatchNormalization", "Add", "Sub", "Mul", "Div", "Cast"}


def resolved_shape(g, t, depth: int = 0):
    """The per-image shape [C, ...] of ``t`` for counting, or None.

    Static dims as inferred; else the shape resolved at the resolved input shapes when the
    graph was normalized (``g.resolved``: rewrites keep each surviving tensor's name and value,
    so its entry stays true); else, for a tensor a rewrite made, the size its producer gives
    (a Conv/AveragePool from its input's, an elementwise op its input's)."""
    shape = static_shape(t)
    if shape and all(isinstance(d, int) for d in shape[1:]):
        return [int(d) for d in shape[1:]]
    known = getattr(g, "resolved", None) or {}
    if t.name in known:
        return list(known[t.name][1:])
    node = t.inputs[0] if t.inputs else None
    if node is None or depth > 16 or not node.inputs:
        return None
    if node.op in ("Conv", "AveragePool"):
        inner = resolved_shape(g, node.inputs[0], depth + 1)
        try:
            p = g.read_linear(node)
        except Decline:
            return None
        if inner is None or len(inner) != p.ndim + 1:
            return None
        return [p.out_channels, *p.output_size(*inner[1:])]
    if node.op in _SAME_SIZE and len(node.outputs) == 1:
        return resolved_shape(g, node.inputs[0], depth + 1)
    return None


def resolved_size(g, t):
    """The spatial size of an N C D1..Dn tensor for counting (:func:`resolved_shape`), or None."""
    shape = resolved_shape(g, t)
    return tuple(shape[1:]) if shape is not None and len(shape) >= 2 else None


def layer_output_flops(p: ConvParams, out, op: str, g=None) -> int:
    """A Conv/AveragePool producing the graph tensor ``out`` (sized by :func:`resolved_size`
    with ``g``; a one-pixel output when its size is unknown)."""
    size = resolved_size(g, out) if g is not None else spatial_size(out)
    return conv_flops(p, size if size is not None else (1,) * p.ndim, pool=op == "AveragePool")


def graph_node_flops(g, node) -> int:
    """FLOPs of one node of a RepGraph, counted as :func:`node_flops` counts it in a model.

    Sizes come from :func:`resolved_shape` (a Conv made by an earlier rewrite carries no output
    shape: its size follows from its input's). Declines when a layer's output size cannot be
    known."""
    if node.op in ("Conv", "AveragePool"):
        p = g.read_linear(node)
        size = resolved_size(g, node.outputs[0])
        if size is None or len(size) != p.ndim:
            raise Decline(f"'{node.name}' has an output of unknown size")
        return conv_flops(p, size, pool=node.op == "AveragePool")
    shape = resolved_shape(g, node.outputs[0])
    if shape is not None:
        return elementwise_flops(node.op, int(np.prod(shape)))
    return 0


def _numel(shapes, name) -> int:
    shape = shapes.get(name)
    return int(np.prod(shape)) if shape is not None else 0


def node_flops(node: onnx.NodeProto, shapes: Dict[str, List[int]]) -> int:
    """FLOPs of one node of a ModelProto, with tensor shapes from ``shapes``."""
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


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default
