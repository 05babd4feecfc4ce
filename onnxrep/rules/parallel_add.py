"""merge_parallel_add: parallel branches on one input joined by Add become one Conv.

Before (RepVGG):  y = BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x)     (Add tree of any shape)
After:            y = Conv(x, W, b)

The Add tree is flattened into its leaves. Each leaf is read backwards as a chain of per-channel
affine ops (BatchNormalization; Mul/Div/Add/Sub by a per-channel constant) over either a Conv
of some tensor x, or over x itself (identity and BN-only branches). Leaves with the same x are
merged:

* a conv leaf is its conv with the affine chain folded in (DESIGN 3.1, 3.2);
* an identity / BN-only leaf is the 1x1 "diagonal" conv with kernel scale[o] at
  W[o, o mod (C/g)] in the group layout of its sibling convs (DESIGN 3.3);
* all are placed in the union window and summed (DESIGN 3.4, kernels.merge_parallel).

Per-channel constant leaves are folded into the bias. Leaves with other inputs (e.g. a branch
with a Relu inside) stay and are added to the merged conv's output. The rule declines when no
group of leaves shares an input with a conv among them, when strides/groups/shapes differ, when
the fusion needs a negative pad, when the union window would grow the largest kernel (unless
``allow_growth``), or when an intermediate tensor escapes the region.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional

import numpy as np

from ..graph import channels_of, const_value, per_channel, producer, spatial_hw, static_shape
from ..kernels import ConvParams, Decline, affine_after_conv, diagonal_conv, merge_parallel
from ..passes import Context, Rewrite, Rule


@dataclass
class Leaf:
    """One operand of the sum: affine chain (nodes) over conv(base) or over base itself."""

    tensor: object
    base: object
    nodes: List[object] = field(default_factory=list)
    conv: Optional[ConvParams] = None  # affine chain already folded in
    scale: Optional[np.ndarray] = None  # for a diagonal (identity / BN-only) leaf
    shift: Optional[np.ndarray] = None

    @property
    def kind(self) -> str:
        if self.conv is not None:
            kh, kw = self.conv.kernel_shape
            return f"conv{kh}x{kw}"
        return "bn" if self.nodes else "identity"


@dataclass
class Merge:
    base: object
    leaves: List[Leaf]
    params: ConvParams
    dtype: object


@dataclass
class AddMatch:
    root: object
    adds: List[object]
    merges: List[Merge]
    rest: List[object]  # tensors added unchanged to the merged result


class MergeParallelAdd(Rule):
    name = "merge_parallel_add"
    ops = ("Add",)
    summary = "parallel conv / identity / BN branches of one input joined by Add -> one Conv"

    def match(self, ctx: Context, node):
        g = ctx.graph
        out = node.outputs[0]
        parent = g.sole_consumer(out)
        if parent is not None and parent.op == "Add" and _same_shape(out, parent.outputs[0]):
            return None  # the root of this Add tree anchors the match
        adds, operands = _flatten(g, node)
        if any(const_value(t) is not None for t in operands) and len(operands) == 2:
            return None  # a bias Add: fold_affine_into_conv's business
        leaves = [_read_leaf(g, t) for t in operands]
        groups: Dict[str, List[Leaf]] = {}
        for leaf in leaves:
            if leaf.base is not None:
                groups.setdefault(leaf.base.name, []).append(leaf)
        constants = [t for t in operands if const_value(t) is not None]
        merges, reasons = [], []
        for members in groups.values():
            if len(members) < 2 or all(m.conv is None for m in members):
                continue
            try:
                merges.append(_merge(ctx, members))
            except Decline as exc:
                reasons.append(f"branches on '{members[0].base.name}': {exc}")
        if not merges:
            if reasons:
                return "; ".join(reasons)
            names = sorted({leaf.base.name if leaf.base is not None else leaf.tensor.name for leaf in leaves})
            return f"no two branches share an input with a conv among them (inputs: {', '.join(names)})"
        merged_ids = {id(leaf) for m in merges for leaf in m.leaves}
        rest = [leaf.tensor for leaf in leaves if id(leaf) not in merged_ids and const_value(leaf.tensor) is None]
        # Constant leaves join the first merged conv's bias when they are per-channel.
        first = merges[0]
        for c in constants:
            vec = per_channel(const_value(c), first.params.out_channels, len(static_shape(out) or ()))
            if vec is None:
                rest.append(c)
            else:
                first.params = replace(first.params, bias=first.params.bias + vec)
        region = list(adds) + [n for m in merges for leaf in m.leaves for n in leaf.nodes]
        reason = g.escapes(region, keep=[out])
        if reason:
            return f"branch output escapes: {reason}"
        return AddMatch(node, adds, merges, rest)

    def rewrite(self, ctx: Context, m: AddMatch) -> Rewrite:
        g = ctx.graph
        out = m.root.outputs[0]
        replaced = [n.name for n in m.adds] + [n.name for mg in m.merges for leaf in mg.leaves for n in leaf.nodes]
        g.remove(m.adds + [n for mg in m.merges for leaf in mg.leaves for n in leaf.nodes])
        terms, created = [], []
        only = len(m.merges) == 1 and not m.rest
        for mg in m.merges:
            y = out if only else g.variable(f"{m.root.name}.merged", out)
            created.append(g.write_conv(f"{m.root.name}.conv", mg.params, mg.base, y, mg.dtype).name)
            terms.append(y)
        terms += m.rest
        acc = terms[0]
        for i, t in enumerate(terms[1:], start=1):
            y = out if i == len(terms) - 1 else g.variable(f"{m.root.name}.sum", out)
            created.append(g.add_node("Add", m.root.name, [acc, t], [y]).name)
            acc = y
        detail = "; ".join(
            "+".join(leaf.kind for leaf in mg.leaves) + f" -> conv{mg.params.kernel_shape[0]}x{mg.params.kernel_shape[1]}"
            for mg in m.merges
        )
        return Rewrite(self.name, m.root.name, tuple(replaced), tuple(created), detail)


def _same_shape(a, b) -> bool:
    """Equal shapes; two symbolic batch dims count as equal whatever their names (shape
    inference invents names such as 'unk__0' for a batch it carried through some ops)."""
    sa, sb = static_shape(a), static_shape(b)
    if sa is None or sb is None or len(sa) != len(sb):
        return False
    return all(
        x == y or (axis == 0 and isinstance(x, str) and isinstance(y, str))
        for axis, (x, y) in enumerate(zip(sa, sb))
    )


def _flatten(g, root):
    """The Add nodes of the tree rooted at ``root`` and its operand tensors, left to right."""
    adds, operands, stack = [], [], [root]
    while stack:
        node = stack.pop()
        adds.append(node)
        for t in node.inputs:
            child = producer(t)
            if (
                child is not None
                and child.op == "Add"
                and g.sole_consumer(t) is node
                and _same_shape(t, node.outputs[0])
            ):
                stack.append(child)
            else:
                operands.append(t)
    return adds, operands


def _read_leaf(g, t) -> Leaf:
    """Walk back from an operand through per-channel affine ops to a Conv or a base tensor."""
    if const_value(t) is not None:
        return Leaf(tensor=t, base=None)
    channels = channels_of(t)
    scale, shift = np.ones(channels or 1), np.zeros(channels or 1)
    nodes, cur = [], t
    while True:
        node = producer(cur)
        if node is None or g.sole_consumer(cur) is None:
            break
        if node.op == "Conv" and channels is not None:
            p = g.read_conv(node)
            if isinstance(p, str):
                break
            return Leaf(t, node.inputs[0], nodes + [node], conv=affine_after_conv(p, scale, shift))
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


def _merge(ctx: Context, leaves: List[Leaf]) -> Merge:
    convs = [leaf for leaf in leaves if leaf.conv is not None]
    group = convs[0].conv.group
    params = [
        leaf.conv if leaf.conv is not None else diagonal_conv(leaf.scale, leaf.shift, group) for leaf in leaves
    ]
    fused = merge_parallel(params, allow_growth=ctx.allow_growth, input_hw=spatial_hw(leaves[0].base))
    # All branches produce the same pixels, so MACs compare as weight sizes; identity and BN-only
    # branches cost none. A dilated kernel placed densely pays for its holes.
    before = sum(leaf.conv.weight.size for leaf in convs)
    if fused.weight.size > before and not ctx.allow_growth:
        raise Decline(
            f"one conv would need {fused.weight.size} weights per output pixel, the branches {before}: "
            "more MACs (--allow-growth allows it)"
        )
    dtype = next(n for n in convs[0].nodes if n.op == "Conv").inputs[1].values.dtype
    return Merge(leaves[0].base, leaves, fused, dtype)


def covered_by_sibling(g, t, base, params: Optional[ConvParams]) -> bool:
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
        if consumer.op == "Add":
            break
        affine = g.read_channel_affine(consumer)
        if affine is None or affine[0] is not t:
            return False
        t = consumer.outputs[0]
    root = consumer
    while True:
        parent = g.sole_consumer(root.outputs[0])
        if parent is None or parent.op != "Add" or not _same_shape(root.outputs[0], parent.outputs[0]):
            break
        root = parent
    _, operands = _flatten(g, root)
    for operand in operands:
        leaf = _read_leaf(g, operand)
        if leaf.conv is None or leaf.base is not base or leaf.tensor is t:
            continue
        if params is None:  # only asked whether such a sibling exists
            return True
        try:  # the merge merge_parallel_add would make, and what it would cost
            merged = merge_parallel([leaf.conv, params], input_hw=spatial_hw(base))
        except Decline:
            continue
        if merged.weight.size <= leaf.conv.weight.size:
            return True
    return False
