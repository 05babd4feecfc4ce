"""Affine regions of a graph: which ops are affine, how a region grows, what it reads, and
whether it acts on each image of the batch separately (docs/rules.md §10).

Shared by the rules that work on regions rather than on one op (today the affine-region
fallback, ``rules/affine_region.py``). Everything here inspects the graph; nothing changes it.
Whether an op is affine is decided from its op type, attributes and which inputs carry the
activation, never from what probes happen to show.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Set

import numpy as np
import onnx_graphsurgeon as gs

from .errors import Decline
from .graph import const_value, producer, spatial_hw, static_shape, str_attr
from .patterns import JOINS, flatten_add, same_shape
from .probe import toposort

ALL = None  # every input may carry the activation
#: op -> input positions that may depend on the activation (others: constants or shape-derived)
AFFINE_INPUTS: Dict[str, Optional[Set[int]]] = {
    "Conv": {0}, "BatchNormalization": {0}, "AveragePool": {0}, "Identity": {0}, "Neg": {0},
    "Add": ALL, "Sub": ALL, "Concat": ALL, "Mul": ALL, "Div": {0},
    "Pad": {0}, "Slice": {0}, "ScatterND": {0, 2}, "Transpose": {0}, "Expand": {0}, "Reshape": {0},
    "Squeeze": {0}, "Unsqueeze": {0}, "Where": {1, 2}, "Gather": {0}, "Split": {0},
    "ScatterElements": {0, 2},
}

MAX_REGION = 400


class TensorKinds:
    """Classifies tensors: 'const', 'shape' (depends on activations only through Shape) or 'value'."""

    def __init__(self):
        self.memo: Dict[str, str] = {}

    def __call__(self, t) -> str:
        stack = [t]
        while stack:
            cur = stack[-1]
            if cur.name in self.memo:
                stack.pop()
                continue
            if isinstance(cur, gs.Constant):
                self.memo[cur.name] = "const"
                stack.pop()
                continue
            node = producer(cur)
            if node is None:
                self.memo[cur.name] = "value"
                stack.pop()
                continue
            if node.op in ("Shape", "Size"):
                self.memo[cur.name] = "shape"
                stack.pop()
                continue
            pending = [i for i in node.inputs if i.name and i.name not in self.memo]
            if pending:
                stack.extend(pending)
                continue
            kinds = {self.memo[i.name] for i in node.inputs if i.name}
            self.memo[cur.name] = "value" if "value" in kinds else ("shape" if "shape" in kinds else "const")
            stack.pop()
        return self.memo[t.name]


def affine_node(node, kinds) -> bool:
    """Whether ``node`` is affine in its activation inputs and keeps the batch axis, judged
    from its op type, attributes and which inputs carry the activation (never from probes)."""
    allowed = AFFINE_INPUTS.get(node.op, False)
    if allowed is False or (node.domain or "") not in ("", "ai.onnx"):
        return False
    values = [i for i, t in enumerate(node.inputs) if t.name and kinds(t) == "value"]
    if not values:
        return False  # shape or constant computation, not part of the activation path
    if node.op == "Mul" and len(values) > 1:
        return False  # x * x is not affine
    if allowed is not ALL and not set(values) <= allowed:
        return False
    try:
        return _attributes_affine(node)
    except (Decline, TypeError, ValueError, IndexError):
        return False


def _rank(t) -> Optional[int]:
    shape = static_shape(t)
    return None if shape is None else len(shape)


def _const_ints(node, i: int) -> Optional[List[int]]:
    if len(node.inputs) <= i or not node.inputs[i].name:
        return None
    v = const_value(node.inputs[i])
    return None if v is None else [int(a) for a in v.reshape(-1)]


def _attributes_affine(node) -> bool:
    """The attribute conditions under which an allowed op is affine (the batch axis is
    followed separately, over the whole region: :func:`_batch_axis_kept`)."""
    op, attrs = node.op, node.attrs
    if op == "Conv":
        return const_value(node.inputs[1]) is not None and all(const_value(t) is not None for t in node.inputs[2:3] if t.name)
    if op == "BatchNormalization":
        return int(attrs.get("training_mode", 0)) == 0 and all(const_value(t) is not None for t in node.inputs[1:5])
    if op in ("ScatterND", "ScatterElements"):
        # reduction add/mul/max/min turns a write into an accumulation, product or clamp
        return str_attr(attrs, "reduction", "none") == "none"
    if op == "Pad":
        return str_attr(attrs, "mode", "constant") == "constant"
    return True


def batch_axis_kept(nodes, x, y, others=()) -> Optional[str]:
    """Why the region does not act on each image of the batch separately, or None.

    The batch axis is followed from ``x`` (axis 0) through every node: Transpose, Squeeze,
    Unsqueeze, Gather and Expand move it; Slice, Gather, Concat, Split, Pad, Scatter*, a
    Reshape that does not copy it, or a constant that broadcasts over it lose it. The region
    is a per-image convolution only if ``y`` gets it back at axis 0. ``others`` are further
    activations the region reads (residuals added to its result) with the batch on axis 0.
    """
    where: Dict[str, int] = {t.name: 0 for t in (x, *others)}
    ranks: Dict[str, int] = {t.name: _rank(t) for t in (x, *others)}
    for node in toposort(nodes):
        ins = [(i, where[t.name]) for i, t in enumerate(node.inputs) if t.name in where]
        axes = {a for _, a in ins}
        if len(axes) != 1:
            return f"'{node.name}' combines tensors whose batch axes differ"
        b = axes.pop()
        in_ranks = {ranks.get(node.inputs[i].name) for i, _ in ins}
        rank = in_ranks.pop() if len(in_ranks) == 1 else None
        out_rank = _rank(node.outputs[0])
        if out_rank is None and rank is not None:  # made by an earlier rewrite: no shape
            if node.op in _SAME_RANK:
                out_rank = rank
            elif node.op in _ELEMENTWISE:  # broadcasting: the largest operand rank
                others = [_rank(t) for i, t in enumerate(node.inputs) if t.name and t.name not in where]
                out_rank = None if None in others else max([rank] + others)
        out = None if rank is None or out_rank is None else _batch_axis_after(node, b, [i for i, _ in ins], rank, out_rank)
        if out is None:
            return f"'{node.name}' ({node.op}) acts across the batch axis"
        for o in node.outputs:
            where[o.name] = out
            ranks[o.name] = out_rank
    if where.get(y.name) != 0:
        return "the region's output does not keep the batch on axis 0"
    return None


_FULL = 2 ** 31 - 1  # a Slice end at least this large reaches the end of any real axis


def _slice_keeps(node, b: int, rank: int) -> bool:
    """Whether a Slice leaves axis ``b`` whole (not sliced, or sliced 0:end with step 1)."""
    attrs = node.attrs
    if "starts" in attrs:  # opset < 10
        starts, ends = [int(v) for v in attrs["starts"]], [int(v) for v in attrs["ends"]]
        axes = [int(a) for a in attrs.get("axes", range(len(starts)))]
        steps = [1] * len(starts)
    else:
        starts, ends = _const_ints(node, 1), _const_ints(node, 2)
        if starts is None or ends is None:
            return False
        axes = _const_ints(node, 3) if len(node.inputs) > 3 and node.inputs[3].name else list(range(len(starts)))
        steps = _const_ints(node, 4) if len(node.inputs) > 4 and node.inputs[4].name else [1] * len(starts)
        if axes is None or steps is None:
            return False
    for a, start, end, step in zip(axes, starts, ends, steps):
        if a % rank == b and not (start == 0 and end >= _FULL and step == 1):
            return False
    return True


def _same_write_per_image(node, b: int) -> bool:
    """Whether a ScatterND whose constant indices address the batch axis writes the same
    positions with the same constant values in every image (static-batch border writes)."""
    indices, updates = const_value(node.inputs[1]), const_value(node.inputs[2])
    if indices is None or updates is None:
        return False
    k = indices.shape[-1]
    rows = indices.reshape(-1, k)
    vals = updates.reshape(rows.shape[0], -1)
    per_image = []
    for n in np.unique(rows[:, b]):
        sel = rows[:, b] == n
        rest = np.delete(rows[sel], b, axis=1)
        order = np.lexsort(rest.T[::-1]) if rest.size else np.arange(len(rest))
        per_image.append((rest[order], vals[sel][order]))
    shape = static_shape(node.inputs[0])
    if shape is None or not isinstance(shape[b], int) or len(per_image) != shape[b]:
        return False
    first_rows, first_vals = per_image[0]
    return all(np.array_equal(r, first_rows) and np.array_equal(v, first_vals) for r, v in per_image[1:])


_ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Where", "BatchNormalization", "Identity", "Neg")
_SAME_RANK = {"Conv", "AveragePool", "BatchNormalization", "Identity", "Neg", "Pad", "Slice", "ScatterND",
              "ScatterElements", "Transpose", "Concat", "Split"}


def _batch_axis_after(node, b: int, value_inputs: List[int], rank: int, out_rank: int) -> Optional[int]:
    """Where ``node`` puts the batch axis that is at ``b`` in its activation inputs (of rank
    ``rank``), or None when it slices, mixes or loses it."""
    op, attrs = node.op, node.attrs
    if op in ("Conv", "AveragePool"):
        return 0 if b == 0 else None
    if op in _ELEMENTWISE:
        if op == "BatchNormalization" and b != 0:
            return None
        for i, t in enumerate(node.inputs):
            if not t.name or i in value_inputs:
                continue
            shape = static_shape(t)
            if shape is None:
                return None
            k = b - (out_rank - len(shape))  # right-aligned broadcasting
            if op != "BatchNormalization" and 0 <= k < len(shape) and shape[k] != 1:
                return None  # a constant that varies over (or enlarges) the batch
        return b + (out_rank - rank)
    if op == "Transpose":
        perm = attrs.get("perm")
        return None if perm is None else [int(p) for p in perm].index(b)
    if op == "Slice":
        return b if _slice_keeps(node, b, rank) else None
    if op in ("Gather", "Concat", "Split", "ScatterElements"):
        axis = int(attrs.get("axis", 0)) % rank
        if axis == b:
            return None
        if op == "Gather":
            indices = static_shape(node.inputs[1])
            if indices is None:
                return None
            return b if b < axis else b + len(indices) - 1
        return b
    if op == "ScatterND":
        indices = static_shape(node.inputs[1])
        if indices is None or not isinstance(indices[-1], int):
            return None
        k = indices[-1]
        if b >= k and value_inputs == [0]:
            return b  # the indices address only axes before the batch
        if const_value(node.inputs[1]) is not None:
            return b if value_inputs == [0] and _same_write_per_image(node, b) else None
        # Indices computed from shapes alone (dynamo's `y[:N] = u` under a dynamic batch): the
        # write is the same for every batch of a size; that it keeps images apart is checked
        # by probing at two batch sizes and two orders (_recover), and by verification.
        return b
    if op == "Pad":
        pads = [int(p) for p in attrs["pads"]] if "pads" in attrs else _const_ints(node, 1)
        axes = _const_ints(node, 3)
        if pads is None:
            return None
        if axes is not None:
            axes = [a % rank for a in axes]
            n = len(axes)
            return None if b in [a for i, a in enumerate(axes) if pads[i] or pads[i + n]] else b
        return None if pads[b] or pads[b + rank] else b
    if op in ("Squeeze", "Unsqueeze"):
        axes = [int(a) for a in attrs["axes"]] if "axes" in attrs else _const_ints(node, 1)
        if axes is None:
            return None
        if op == "Squeeze":
            axes = sorted(a % rank for a in axes)
            return None if b in axes else b - sum(a < b for a in axes)
        axes = sorted(a % out_rank for a in axes)
        pos = b
        for a in axes:  # inserting axes in increasing order
            if a <= pos:
                pos += 1
        return pos
    if op == "Expand":
        shape = _const_ints(node, 1)
        if shape is None:
            return None
        k = b + (out_rank - rank)
        j = k - (out_rank - len(shape))
        return None if 0 <= j < len(shape) and shape[j] not in (1, -1) else k
    if op == "Reshape":
        shape = _const_ints(node, 1)
        if shape is None or b != 0 or not shape or shape[0] != 0 or int(attrs.get("allowzero", 0)):
            return None
        return 0
    return None


def region_inputs(nodes, kinds) -> List[object]:
    """The activations a region reads (value tensors not produced inside it)."""
    inside = {id(n) for n in nodes}
    found = {t.name: t for n in nodes for t in n.inputs
             if t.name and kinds(t) == "value" and not any(id(p) in inside for p in t.inputs)}
    return list(found.values())


def grow_region(g, anchor, kinds, stop_at_fanout: bool = False) -> List[object]:
    """The region ending at ``anchor``: affine producers added while all their consumers are
    inside (``stop_at_fanout``: also never through a tensor read by several nodes)."""
    region = [anchor]
    inside = {id(anchor)}
    changed = True
    while changed and len(region) < MAX_REGION:
        changed = False
        for node in list(region):
            for t in node.inputs:
                p = producer(t) if t.name else None
                if p is None or id(p) in inside or kinds(t) != "value" or not affine_node(p, kinds):
                    continue
                if stop_at_fanout and len(t.outputs) > 1:
                    continue
                if any(g.is_graph_output(o) or not all(_feeds_only(g, c, inside) for c in o.outputs) for o in p.outputs):
                    continue
                region.append(p)
                inside.add(id(p))
                changed = True
    return region


def _feeds_only(g, node, inside, budget: int = 64) -> bool:
    """Whether ``node`` is in the region, or everything it computes ends up only in the region.

    Exporters read activations through Shape (and Slice -> Shape) to build indices for border
    writes; such readers die with the region and must not stop it from growing.
    """
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if id(n) in inside or id(n) in seen:
            continue
        seen.add(id(n))
        if len(seen) > budget or not n.outputs:
            return False
        for o in n.outputs:
            if g.is_graph_output(o):
                return False
            stack.extend(o.outputs)
    return True


def dead_with(region, y) -> List[object]:
    """Nodes outside the region that read its intermediates (only to feed it, see _feeds_only)."""
    inside = {id(n) for n in region}
    dead, stack = [], [c for n in region for o in n.outputs if o is not y for c in o.outputs if id(c) not in inside]
    seen = set()
    while stack:
        n = stack.pop()
        if id(n) in inside or id(n) in seen:
            continue
        seen.add(id(n))
        dead.append(n)
        stack.extend(c for o in n.outputs for c in o.outputs)
    return dead


def receptive_field(g, nodes, x, y):
    """(extent h, extent w, stride h, stride w, dense) of the region from x to y, from its layers
    alone: extents compose along every path (extent + (k - 1) * stride so far); dense when a
    Conv reads several input channels per output."""
    field = {x.name: (1, 1, 1, 1, False)}
    for node in toposort(nodes):
        ins = [field[t.name] for t in node.inputs if t.name in field]
        if not ins:
            continue
        eh, ew = max(f[0] for f in ins), max(f[1] for f in ins)
        sh, sw = max(f[2] for f in ins), max(f[3] for f in ins)
        mixed = any(f[4] for f in ins)
        if node.op == "Transpose":
            eh = ew = max(eh, ew)
            sh = sw = max(sh, sw)
        elif node.op in ("Conv", "AveragePool"):
            p = g.read_linear(node)
            (kh, kw), (s1, s2) = p.extent, p.strides
            eh, ew = eh + (kh - 1) * sh, ew + (kw - 1) * sw
            sh, sw = sh * s1, sw * s2
            mixed = mixed or (node.op == "Conv" and p.weight.shape[1] > 1)
        for o in node.outputs:
            field[o.name] = (eh, ew, sh, sw, mixed)
    return field.get(y.name, (1, 1, 1, 1, False))


_MOVES_CHANNELS = {"Concat", "Split", "Gather", "Reshape", "Transpose", "Expand", "Squeeze", "Unsqueeze",
                   "ScatterND", "ScatterElements", "Slice"}


def channel_by_channel(g, nodes) -> bool:
    """Whether every op keeps output channel c a function of input channel c alone, as far as
    op types tell (depthwise convs, pools, per-channel elementwise ops): then all channels can
    be probed at once. A guess the probes' acceptance check confirms."""
    for node in nodes:
        if node.op in _MOVES_CHANNELS:
            return False
        if node.op == "Conv":
            p = g.read_linear(node)
            if p.weight.shape[1] != 1 or p.out_channels != p.in_channels:
                return False
    return True


def expected_flops(g, nodes, x, y, c_in: int, c_out: int) -> int:
    """What the fused conv will cost, from the region's layers alone (no probing): dense when
    any layer mixes channels. Exact for real re-parameterizable blocks; it could only
    overestimate a region whose taps cancel."""
    eh, ew, _, _, mixed = receptive_field(g, nodes, x, y)
    ho, wo = spatial_hw(y)
    per_output = c_in if mixed else max(1, c_in // math.gcd(c_in, c_out))
    return 2 * c_out * per_output * eh * ew * ho * wo


def region_strides(g, nodes, x, y):
    """The accumulated stride from x to y (every path must agree), or None. Declines when a
    layer of the region is not 2-D: regions are probed as images (kernels.kernel_from_impulses),
    so 1-D and 3-D convs are left to the specific rules."""
    order = toposort(nodes)
    stride = {x.name: (1, 1)}
    for node in order:
        ins = [stride[t.name] for t in node.inputs if t.name in stride]
        if not ins or any(s != ins[0] for s in ins):
            if ins:
                return None
            continue
        s = ins[0]
        if node.op in ("Conv", "AveragePool"):
            if node.op == "Conv":
                dims = np.ndim(const_value(node.inputs[1])) - 2
            else:
                dims = len(node.attrs.get("kernel_shape", ()))
            k = tuple(int(v) for v in node.attrs.get("strides", (1, 1)))
            if dims != 2 or len(k) != 2:
                raise Decline(f"'{node.name}' is a {dims}-D {node.op}: only 2-D regions are probed")
            s = (s[0] * k[0], s[1] * k[1])
        for o in node.outputs:
            stride[o.name] = s
    return stride.get(y.name)




def set_aside_residuals(g, anchor, nodes, kinds):
    """Split a region that reads several activations at a sum: (nodes, x, residuals) or None.

    When ``anchor`` is the root of an Add/Sub/Sum tree, each operand is computed inside the
    region from some activations. The activation ``x`` most layers are computed from is the
    region's input; operands computed without ``x`` (a residual, a shortcut conv of another
    tensor) are set aside as (tensor, sign) pairs, to be added to the region's conv as they
    are, like ``merge_parallel_add`` sets aside leaves of another input. None when an
    operand mixes ``x`` with another activation, when a residual does not have the result's
    shape (it must not broadcast the sum), or when nothing is set aside.
    """
    if anchor.op not in JOINS:
        return None
    inside = {id(n) for n in nodes}
    joins, operands = _flatten_joins(g, anchor, inside)
    join_ids = {id(j) for j in joins}
    parts = []
    for t, sign in operands:
        sub = _upstream(t, inside, join_ids)
        reads = region_inputs(sub, kinds) if sub else ([t] if kinds(t) == "value" else [])
        parts.append((t, sign, sub, {r.name: r for r in reads}))
    weight: Dict[str, int] = {}
    for _, _, sub, reads in parts:
        for name in reads:
            weight[name] = weight.get(name, 0) + 1 + sum(n.op in ("Conv", "AveragePool") for n in sub)
    if len(weight) < 2:
        return None
    x_name = max(weight, key=lambda name: weight[name])
    main, residuals = [], []
    for t, sign, sub, reads in parts:
        if x_name in reads:
            if len(reads) > 1:
                return None
            main += sub
        elif not reads:
            main += sub
        else:
            if not same_shape(t, anchor.outputs[0]):
                return None
            residuals.append((t, sign, sub))
    if not residuals:
        return None
    region, kept = list(joins), {id(j) for j in joins}
    for n in main:
        if id(n) not in kept:
            region.append(n)
            kept.add(id(n))
    if any(id(n) in kept for _, _, sub in residuals for n in sub):
        return None  # a node both sides need
    x = next(r for _, _, _, reads in parts for name, r in reads.items() if name == x_name)
    return region, x, [(t, sign) for t, sign, _ in residuals]


def _flatten_joins(g, root, inside):
    """The Add/Sub/Sum nodes of the region's tree at ``root`` and its (tensor, sign) operands.

    Unlike merge_parallel_add it also goes through sums that rewrites made, which carry no
    shape: a residual read as 0 leaves the sum of the rest, broadcast as before, and the probes
    compare the recovered conv with the region at the shape the region then has."""
    return flatten_add(g, root, follow=lambda t, child: id(child) in inside)


def _upstream(t, inside, stop):
    """The region nodes ``t`` is computed from (not the join nodes ``stop``)."""
    out, seen, stack = [], set(), [t]
    while stack:
        cur = stack.pop()
        p = producer(cur) if cur.name else None
        if p is None or id(p) not in inside or id(p) in stop or id(p) in seen:
            continue
        seen.add(id(p))
        out.append(p)
        stack.extend(p.inputs)
    return out
