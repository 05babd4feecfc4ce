"""Graph patterns several rules share: branch leaves, Add trees, sequential composition.

Rules import these (and the graph, kernels and pass-manager layers), never each other.

* :func:`read_leaf` reads one operand of a sum or concat backwards, through per-channel affine
  ops, down to a Conv of some tensor or to that tensor itself (identity / BN-only branches);
* :func:`flatten_add` flattens a tree of Add / Sub / Sum joins into signed operands;
* :func:`covered_by_sibling` tells whether a conv would be absorbed for free by a parallel
  branch (the growth exception of sequential composition);
* :func:`judge_composition` decides whether conv2(conv1(x)) composes exactly and cheaply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

from .errors import Decline
from .graph import RepGraph, channels_of, const_value, producer, spatial_size, static_shape
from .cost import layer_output_flops, resolved_size
from .kernels import ConvParams, affine_after_conv, affine_after_matmul, compose_sequential, dims_str, merge_parallel

LINEAR = ("Conv", "AveragePool")
#: Ops that join parallel branches by a signed sum.
JOINS = ("Add", "Sub", "Sum")


@dataclass
class Leaf:
    """One operand of a sum/concat: an affine chain (nodes) over conv(base) or over base itself."""

    tensor: object
    base: object
    nodes: List[object] = field(default_factory=list)
    conv: Optional[ConvParams] = None  # affine chain already folded in
    scale: Optional[np.ndarray] = None  # for a diagonal (identity / BN-only) leaf
    shift: Optional[np.ndarray] = None
    #: for a Gemm / MatMul leaf on rank-2 features: (W[K, M], b[M]) with the affine chain folded in
    linear: Optional[tuple] = None

    @property
    def kind(self) -> str:
        if self.conv is not None:
            return f"conv{dims_str(self.conv.kernel_shape)}"
        if self.linear is not None:
            return "linear"
        return "bn" if self.nodes else "identity"

    @property
    def conv_node(self):
        return next((n for n in self.nodes if n.op == "Conv"), None)

    @property
    def layer_node(self):
        return next((n for n in self.nodes if n.op in ("Conv", "Gemm", "MatMul")), None)


def same_shape(a, b) -> bool:
    """Equal shapes; two symbolic batch dims count as equal whatever their names (shape
    inference invents names such as 'unk__0' for a batch it carried through some ops)."""
    sa, sb = static_shape(a), static_shape(b)
    if sa is None or sb is None or len(sa) != len(sb):
        return False
    return all(
        x == y or (axis == 0 and isinstance(x, str) and isinstance(y, str))
        for axis, (x, y) in enumerate(zip(sa, sb))
    )


def flatten_add(g: RepGraph, root, follow=None):
    """The join nodes (Add, Sub, Sum) of the tree rooted at ``root`` and its operands as
    (tensor, sign) pairs, left to right: Sub's second operand counts negatively.

    A join is followed into when only its parent reads it and ``follow(t, child)`` holds for
    the tensor ``t`` it computes (default: ``t`` has the parent's shape, no broadcast)."""
    joins, operands, stack = [], [], [(root, 1.0)]
    while stack:
        node, sign = stack.pop()
        joins.append(node)
        for i, t in enumerate(node.inputs):
            s = -sign if node.op == "Sub" and i == 1 else sign
            child = producer(t) if t.name else None
            if (
                child is not None
                and child.op in JOINS
                and g.sole_consumer(t) is node
                and (same_shape(t, node.outputs[0]) if follow is None else follow(t, child))
            ):
                stack.append((child, s))
            else:
                operands.append((t, s))
    return joins, operands


def read_leaf(g: RepGraph, t, sign: float = 1.0) -> Leaf:
    """Walk back from an operand through per-channel affine ops to a Conv or a base tensor;
    ``sign`` (-1 for a subtracted operand) is folded into the leaf's map."""
    if const_value(t) is not None:
        return Leaf(tensor=t, base=None)
    channels = channels_of(t)
    scale, shift = np.full(channels or 1, sign), np.zeros(channels or 1)
    nodes, cur = [], t
    while True:
        node = producer(cur)
        if node is None or g.sole_consumer(cur) is None:
            break
        if node.op == "Conv" and channels is not None:
            try:
                p = g.read_conv(node)
            except Decline:
                break
            if p.out_channels != channels:
                break
            return Leaf(t, node.inputs[0], nodes + [node], conv=affine_after_conv(p, scale, shift))
        if node.op in ("Gemm", "MatMul") and channels is not None and len(static_shape(cur) or ()) == 2 \
                and len(static_shape(node.inputs[0]) or ()) == 2 and int(node.attrs.get("transA", 0)) == 0:
            try:
                w, b = g.read_matmul(node)
            except Decline:
                break
            if w.shape[1] != channels:
                break
            w, b = affine_after_matmul(w, b, scale, shift)
            return Leaf(t, node.inputs[0], nodes + [node], linear=(w, b))
        affine = g.read_channel_affine(node)
        if affine is None or channels is None or len(affine[1]) != channels:
            break
        # y = z*scale + shift with z = x*s1 + h1  ->  y = x*(s1*scale) + (h1*scale + shift)
        x, s1, h1 = affine
        scale, shift = s1 * scale, h1 * scale + shift
        nodes.append(node)
        cur = x
    if static_shape(cur) != static_shape(t):
        return Leaf(tensor=t, base=None)
    return Leaf(t, cur, nodes, scale=scale, shift=shift)


def covered_by_sibling(g: RepGraph, t, base, params: Optional[ConvParams]) -> bool:
    """Whether a conv of ``base`` producing ``t`` would be absorbed by a parallel branch.

    True when ``t`` flows through per-channel affine ops into an Add tree that has another conv
    leaf on ``base`` that merges with ``params`` into a conv no larger than that leaf: merging
    then costs nothing beyond that branch. With ``params`` None: whether any conv leaf on
    ``base`` sits in that Add tree at all (a cheap pre-check).
    """
    while True:
        consumer = g.sole_consumer(t)
        if consumer is None:
            return False
        if consumer.op in JOINS:
            break
        affine = g.read_channel_affine(consumer)
        if affine is None or affine[0] is not t:
            return False
        t = consumer.outputs[0]
    root = consumer
    while True:
        parent = g.sole_consumer(root.outputs[0])
        if parent is None or parent.op not in JOINS or not same_shape(root.outputs[0], parent.outputs[0]):
            break
        root = parent
    _, operands = flatten_add(g, root)
    for operand, sign in operands:
        leaf = read_leaf(g, operand, sign)
        if leaf.conv is None or leaf.base is not base or leaf.tensor is t:
            continue
        if params is None:  # only asked whether such a sibling exists
            return True
        try:  # the merge merge_parallel_add would make, and what it would cost
            merged = merge_parallel([leaf.conv, params], input_size=spatial_size(base))
        except Decline:
            continue
        if merged.weight.size <= leaf.conv.weight.size:
            return True
    return False


def judge_composition(ctx, p1: ConvParams, p2: ConvParams, out, x, before: int, build: bool = True):
    """(fused, note) when conv2(conv1(x)) -> ``out`` composes exactly without costing more
    FLOPs than ``before`` (or the growth is absorbed by a parallel branch); else Decline.

    With ``build`` False the caller only asks whether it would: when the composite's FLOPs
    bounded from the shapes alone do not exceed ``before``, it returns (None, "") without
    building it (large compositions cost seconds), but it still declines where composing would
    not be exact."""
    # The composite can be large (a dense KxK from a depthwise one): rule out growth from its
    # shape alone before building it, unless a parallel branch might absorb it.
    predicted = _predicted_flops(p1, p2, resolved_size(ctx.graph, out))
    if predicted > before and not ctx.allow_growth and not covered_by_sibling(ctx.graph, out, x, None):
        raise Decline(f"composing would raise FLOPs from {before} to about {predicted} (--allow-growth allows it)")
    if not build and (predicted <= before or ctx.allow_growth) and composes_exactly(p1, p2):
        return None, ""
    fused = compose_sequential(p1, p2)
    after = layer_output_flops(fused, out, "Conv", ctx.graph)
    if after <= before or ctx.allow_growth:
        return fused, ""
    if covered_by_sibling(ctx.graph, out, x, fused):
        return fused, " (absorbed by a parallel branch)"
    raise Decline(f"composing would raise FLOPs from {before} to {after} (--allow-growth allows it)")


def _predicted_flops(p1: ConvParams, p2: ConvParams, out_size) -> int:
    """FLOPs of compose_sequential(p1, p2) from the shapes alone (an upper bound: regrouping
    can only make it cheaper)."""
    group = p1.group if p1.group == p2.group else 1
    if any(p2.pads):
        window = p2.kernel_shape
    else:
        window = tuple((l2 - 1) * d2 * s1 + e1 for l2, d2, s1, e1 in zip(p2.kernel_shape, p2.dilations, p1.strides,
                                                                          p1.extent))
    size = out_size or ()
    return 2 * p2.out_channels * (p1.in_channels // group) * math.prod(window) * math.prod(size)


def composes_exactly(p1: ConvParams, p2: ConvParams) -> bool:
    """Whether kernels.compose_sequential accepts the pair (without building the composite)."""
    if p2.in_channels != p1.out_channels or p1.ndim != p2.ndim:
        return False
    if not any(p2.pads):
        return True
    pointwise = all(k == 1 for k in p1.kernel_shape) and all(s == 1 for s in p1.strides)
    return pointwise and not np.any(np.asarray(p1.bias) != 0)
