"""merge_parallel_add: parallel branches on one input joined by Add (or Sub, Sum) become one Conv.

Before (RepVGG):  y = BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x)     (Add tree of any shape)
After:            y = Conv(x, W, b)

The tree may mix Add, Sub (RIFormer's conv(t) - t) and variadic Sum (tf2onnx's AddN);
a subtracted operand enters with its kernel and bias negated.

The Add tree is flattened into its leaves. Each leaf is read backwards as a chain of per-channel
affine ops (BatchNormalization; Mul/Div/Add/Sub by a per-channel constant) over either a Conv
of some tensor x, or over x itself (identity and BN-only branches). Leaves with the same x are
merged:

* a conv leaf is its conv with the affine chain folded in (docs/rules.md §1, §2);
* an identity / BN-only leaf is the 1x1 "diagonal" conv with kernel scale[o] at
  W[o, o mod (C/g)] in the group layout of its sibling convs (docs/rules.md §3);
* all are placed in the union window and summed (docs/rules.md §4, kernels.merge_parallel).

Per-channel constant leaves are folded into the bias. Leaves with other inputs (e.g. a branch
with a Relu inside) stay and are added to the merged conv's output. The rule declines when no
group of leaves shares an input with a conv among them, when strides/groups/shapes differ, when
the fusion needs a negative pad, when the union window would grow the largest kernel (unless
``allow_growth``); the pass manager refuses it when an intermediate tensor escapes the region.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional

import numpy as np

from ..cost import conv_flops, elementwise_flops, graph_node_flops, resolved_shape, resolved_size
from ..errors import Decline
from ..graph import const_value, per_channel, spatial_size, static_shape
from ..kernels import ConvParams, diagonal_conv, dims_str, merge_parallel
from ..passes import Context, Match, Rewrite, Rule
from ..patterns import JOINS, Leaf, flatten_add, read_leaf, same_shape


@dataclass
class Merge:
    base: object
    leaves: List[Leaf]
    params: Optional[ConvParams]  # the merged conv, or
    dtype: object
    linear: Optional[tuple] = None  # the merged Gemm: (W[K, M], b[M])

    @property
    def out_channels(self) -> int:
        return self.params.out_channels if self.params is not None else self.linear[0].shape[1]

    def add_bias(self, vec) -> None:
        if self.params is not None:
            self.params = replace(self.params, bias=self.params.bias + vec)
        else:
            self.linear = (self.linear[0], self.linear[1] + vec)


@dataclass
class AddMatch(Match):
    root: object
    adds: List[object]  # the join nodes: Add, Sub, Sum
    merges: List[Merge]
    rest: List[tuple]  # (tensor, sign) added (+1) or subtracted (-1) unchanged
    flops: Optional[tuple] = None  # (before, after) when every size is known

    @property
    def removes(self):
        return list(self.adds) + [n for m in self.merges for leaf in m.leaves for n in leaf.nodes]

    @property
    def keeps(self):
        return [self.root.outputs[0]]


class MergeParallelAdd(Rule):
    name = "merge_parallel_add"
    ops = JOINS
    summary = "parallel conv / identity / BN branches of one input joined by Add/Sub/Sum -> one Conv"

    def match(self, ctx: Context, node):
        g = ctx.graph
        out = node.outputs[0]
        parent = g.sole_consumer(out)
        if parent is not None and parent.op in JOINS and same_shape(out, parent.outputs[0]):
            return None  # the root of this tree of joins anchors the match
        adds, operands = flatten_add(g, node)
        if any(const_value(t) is not None for t, _ in operands) and len(operands) == 2:
            return None  # a bias Add: fold_affine_into_conv's business
        leaves = [read_leaf(g, t, sign) for t, sign in operands]
        signs = {id(leaf): sign for leaf, (_, sign) in zip(leaves, operands)}
        groups: Dict[str, List[Leaf]] = {}
        for leaf in leaves:
            if leaf.base is not None:
                groups.setdefault(leaf.base.name, []).append(leaf)
        constants = [(t, sign) for t, sign in operands if const_value(t) is not None]
        merges, reasons = [], []
        for members in groups.values():
            convs = [m for m in members if m.linear is None]  # conv and identity/BN-only leaves
            linears = [m for m in members if m.conv is None]  # Gemm/MatMul and identity/BN-only leaves
            try:
                if len(convs) >= 2 and any(m.conv is not None for m in convs):
                    merges.append(_merge(ctx, convs))
                elif len(linears) >= 2 and any(m.linear is not None for m in linears):
                    merges.append(_merge_linear(linears))
            except Decline as exc:
                reasons.append(f"branches on '{members[0].base.name}': {exc}")
        if not merges:
            if reasons:
                raise Decline("; ".join(reasons))
            names = sorted({leaf.base.name if leaf.base is not None else leaf.tensor.name for leaf in leaves})
            raise Decline(f"no two branches share an input with a conv or linear layer among them "
                          f"(inputs: {', '.join(names)})")
        merged_ids = {id(leaf) for m in merges for leaf in m.leaves}
        rest = [(leaf.tensor, signs[id(leaf)]) for leaf in leaves
                if id(leaf) not in merged_ids and const_value(leaf.tensor) is None]
        # Constant leaves join the first merged conv's bias when they are per-channel.
        first = merges[0]
        for c, sign in constants:
            vec = per_channel(const_value(c), first.out_channels, len(static_shape(out) or ()))
            if vec is None:
                rest.append((c, sign))
            else:
                first.add_bias(sign * vec)
        m = AddMatch(node, adds, merges, rest)  # the pass manager checks that nothing escapes
        m.flops = _predicted_flops(g, m, out)
        return m

    def rewrite(self, ctx: Context, m: AddMatch) -> Rewrite:
        g = ctx.graph
        out = m.root.outputs[0]
        replaced = [n.name for n in m.removes]
        terms, created = [], []
        only = len(m.merges) == 1 and not m.rest
        for mg in m.merges:
            y = out if only else g.variable(f"{m.root.name}.merged", out)
            if mg.params is not None:
                created.append(g.write_conv(f"{m.root.name}.conv", mg.params, mg.base, y, mg.dtype).name)
            else:
                w, b = mg.linear
                created.append(g.add_node("Gemm", f"{m.root.name}.gemm", [
                    mg.base, g.constant(f"{m.root.name}.weight", w, mg.dtype), g.constant(f"{m.root.name}.bias", b, mg.dtype)],
                    [y]).name)
            terms.append(y)
        terms = [(t, 1.0) for t in terms] + list(m.rest)  # merged convs carry their signs
        acc = terms[0][0]
        for i, (t, sign) in enumerate(terms[1:], start=1):
            y = out if i == len(terms) - 1 else g.variable(f"{m.root.name}.sum", out)
            created.append(g.add_node("Add" if sign > 0 else "Sub", m.root.name, [acc, t], [y]).name)
            acc = y
        detail = "; ".join(
            "+".join(leaf.kind for leaf in mg.leaves)
            + (f" -> conv{dims_str(mg.params.kernel_shape)}" if mg.params is not None else " -> Gemm")
            for mg in m.merges
        )
        return Rewrite(self.name, m.root.name, tuple(replaced), tuple(created), detail, flops=m.flops)


def _predicted_flops(g, m: AddMatch, out) -> Optional[tuple]:
    """(before, after) FLOPs with onnxrep.cost, or None when a size is not static."""
    size, shape = resolved_size(g, out), resolved_shape(g, out)
    if size is None or shape is None:
        return None
    try:
        before = sum(graph_node_flops(g, n) for n in m.removes)
    except Decline:
        return None
    outputs = int(np.prod(shape))
    terms = len(m.merges) + len(m.rest)
    if any(mg.params is None for mg in m.merges):
        return None
    after = sum(conv_flops(mg.params, size) for mg in m.merges) + (terms - 1) * elementwise_flops("Add", outputs)
    return before, after


def _merge_linear(leaves: List[Leaf]) -> Merge:
    """Gemm/MatMul leaves (and identity / per-feature leaves) of one rank-2 input summed:
    x @ (sum W_i) + sum b_i, an identity-like leaf adding diag(scale) and its shift."""
    first = next(leaf for leaf in leaves if leaf.linear is not None)
    k, m = first.linear[0].shape
    w, b = np.zeros((k, m)), np.zeros(m)
    for leaf in leaves:
        if leaf.linear is not None:
            if leaf.linear[0].shape != (k, m):
                raise Decline(f"linear branches of shapes {first.linear[0].shape} and {leaf.linear[0].shape}")
            w, b = w + leaf.linear[0], b + leaf.linear[1]
        else:
            if k != m or len(leaf.scale) != m:
                raise Decline(f"an identity branch next to a {k}x{m} linear layer")
            w, b = w + np.diag(leaf.scale), b + leaf.shift
    dtype = first.layer_node.inputs[1].values.dtype
    return Merge(first.base, leaves, None, dtype, linear=(w, b))


def _merge(ctx: Context, leaves: List[Leaf]) -> Merge:
    convs = [leaf for leaf in leaves if leaf.conv is not None]
    group = convs[0].conv.group
    ndim = convs[0].conv.ndim
    params = [
        leaf.conv if leaf.conv is not None else diagonal_conv(leaf.scale, leaf.shift, group, ndim) for leaf in leaves
    ]
    fused = merge_parallel(params, allow_growth=ctx.allow_growth, input_size=spatial_size(leaves[0].base))
    # All branches produce the same pixels, so MACs compare as weight sizes; identity and BN-only
    # branches cost none. A dilated kernel placed densely pays for its holes.
    before = sum(leaf.conv.weight.size for leaf in convs)
    if fused.weight.size > before and not ctx.allow_growth:
        raise Decline(
            f"one conv would need {fused.weight.size} weights per output pixel, the branches {before}: "
            "more MACs (--allow-growth allows it)"
        )
    return Merge(leaves[0].base, leaves, fused, convs[0].conv_node.inputs[1].values.dtype)
