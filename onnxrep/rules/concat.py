"""Depth concat and horizontal merging of parallel convs on one input.

merge_parallel_concat (docs/rules.md §5)
    Before:  y = Concat(axis=1)[BN(conv3x3(x)), BN(conv1x1(x)), conv1x3(x), ...]
    After:   y = Conv(x, W = concat_Cout(kernels placed in the union window), b = concat(b))
    Consecutive Concat operands that are convs (or identity / BN-only branches) of the same
    input merge into one conv; other operands stay and are concatenated around it. Misaligned
    branches (union window larger than the largest kernel) decline unless ``allow_growth``.

merge_horizontal_convs (late; TVM CombineParallelConv2D, TensorRT)
    Before:  x -> Conv_a -> ...;  x -> Conv_b -> ...;  x -> Conv_c -> ...   (outputs go apart)
    After:   x -> Conv(W = concat_Cout(W_a, W_b, W_c)) -> Split(axis=1) -> a, b, c
    Only convs with identical windows (same kernel, stride, pads, dilation, groups 1) combine,
    so FLOPs do not change, and only three or more at once, so the node count drops.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List

import numpy as np

from ..errors import Decline
from ..graph import spatial_size
from ..kernels import ConvParams, concat_parallel, diagonal_conv
from ..passes import Context, Match, Rewrite, Rule
from ..patterns import Leaf, read_leaf


@dataclass
class ConcatMatch(Match):
    node: object
    runs: List[List[Leaf]]  # runs of operands merged into one conv each
    starts: List[int]  # operand index where each run starts
    params: List[ConvParams]
    dtype: object

    @property
    def removes(self):
        return [self.node] + [n for run in self.runs for leaf in run for n in leaf.nodes]

    @property
    def keeps(self):
        return [self.node.outputs[0]]


def _concat_axis(node) -> int:
    axis = int(node.attrs.get("axis", 1))
    rank = len(node.outputs[0].shape or ())
    return axis + rank if axis < 0 else axis


class MergeParallelConcat(Rule):
    name = "merge_parallel_concat"
    ops = ("Concat",)
    summary = "Concat(axis=1) of parallel convs of one input -> one Conv"

    def match(self, ctx: Context, node):
        g = ctx.graph
        if _concat_axis(node) != 1 or len(node.outputs[0].shape or ()) not in (3, 4, 5):  # 1-D, 2-D, 3-D convs
            return None
        leaves = [read_leaf(g, t) for t in node.inputs]
        runs, current = [], []
        for leaf in leaves:
            if current and (leaf.base is None or leaf.base is not current[0].base):
                runs.append(current)
                current = []
            if leaf.base is not None:
                current.append(leaf)
        if current:
            runs.append(current)
        runs = [r for r in runs if len(r) >= 2 and any(leaf.conv is not None for leaf in r)]
        if not runs:
            return None
        position = {id(leaf): i for i, leaf in enumerate(leaves)}
        params, reasons, kept = [], [], []
        for run in runs:
            try:
                ndim = len(node.outputs[0].shape) - 2
                branches = [leaf.conv if leaf.conv is not None else diagonal_conv(leaf.scale, leaf.shift, 1, ndim)
                            for leaf in run]
                fused = concat_parallel(branches, ctx.allow_growth, spatial_size(run[0].base))
            except Decline as exc:
                reasons.append(f"operands on '{run[0].base.name}': {exc}")
                continue
            # Same output pixels for every branch: MACs compare as weight sizes. Identity and
            # BN-only operands cost none before; grouped branches may only merge densely.
            before = sum(leaf.conv.weight.size for leaf in run if leaf.conv is not None)
            if fused.weight.size > before and not ctx.allow_growth:
                reasons.append(
                    f"operands on '{run[0].base.name}': one conv would need {fused.weight.size} weights per "
                    f"output pixel, the branches {before}: more MACs (--allow-growth allows it)"
                )
                continue
            params.append(fused)
            kept.append((position[id(run[0])], run))
        if not kept:
            raise Decline("; ".join(reasons))
        conv = next(leaf.conv_node for _, run in kept for leaf in run if leaf.conv_node is not None)
        m = ConcatMatch(node, [run for _, run in kept], [start for start, _ in kept], params,
                        conv.inputs[1].values.dtype)
        return m  # the pass manager checks that nothing escapes

    def rewrite(self, ctx: Context, m: ConcatMatch) -> Rewrite:
        g = ctx.graph
        out = m.node.outputs[0]
        operands = list(m.node.inputs)
        replaced = [n.name for n in m.removes]
        whole = len(m.runs) == 1 and len(m.runs[0]) == len(operands)
        created, new_inputs, i = [], [], 0
        starts = {start: (run, p) for start, run, p in zip(m.starts, m.runs, m.params)}
        while i < len(operands):
            hit = starts.get(i)
            if hit is None:
                new_inputs.append(operands[i])
                i += 1
                continue
            run, p = hit
            y = out if whole else g.variable(f"{m.node.name}.merged", out)
            created.append(g.write_conv(f"{m.node.name}.conv", p, run[0].base, y, m.dtype).name)
            new_inputs.append(y)
            i += len(run)
        if not whole:
            created.append(g.add_node("Concat", m.node.name, new_inputs, [out], {"axis": 1}).name)
        detail = "; ".join("+".join(leaf.kind for leaf in run) for run in m.runs)
        return Rewrite(self.name, m.node.name, tuple(replaced), tuple(created), detail)


@dataclass
class HorizontalMatch(Match):
    x: object
    convs: List[object]
    outs: List[object]
    params: ConvParams
    dtype: object

    @property
    def removes(self):
        return list(self.convs)

    @property
    def keeps(self):
        return list(self.outs)


class MergeHorizontalConvs(Rule):
    name = "merge_horizontal_convs"
    ops = ("Conv",)
    summary = "3+ convs with identical windows on one input -> one Conv + Split (off by default: --enable)"
    late = True
    #: One conv + Split measured slower than the separate convs in onnxruntime on one CPU thread
    #: (inception_v3: 1.041x with it, 0.998x without, BENCHMARKS.md).
    default = False
    min_convs = 3

    def match(self, ctx: Context, node):
        g = ctx.graph
        x = node.inputs[0]
        # Only main-graph readers: a Conv inside an If/Loop body must stay there.
        siblings = [c for c in g.consumers(x) if c.op == "Conv" and c.inputs[0] is x]
        if len(siblings) < self.min_convs or node is not siblings[0]:
            return None
        read = []
        for c in siblings:
            try:
                p = g.read_conv(c)
            except Decline:
                continue
            if p.group == 1:
                read.append((c, p))
        if not read:
            return None
        key = lambda p: (p.kernel_shape, p.strides, p.pads, p.dilations)
        first = max({key(p) for _, p in read}, key=lambda k: sum(key(p) == k for _, p in read))
        same = [(c, p) for c, p in read if key(p) == first]
        if len(same) < self.min_convs:
            raise Decline(f"fewer than {self.min_convs} convs on '{x.name}' share one window")
        dtypes = {c.inputs[1].values.dtype for c, _ in same}
        if len(dtypes) != 1:
            return None
        # Identical windows: the weights stack along Cout as they are (dilation kept).
        first_p = same[0][1]
        fused = replace(first_p, weight=np.concatenate([np.asarray(p.weight, np.float64) for _, p in same]),
                        bias=np.concatenate([np.asarray(p.bias, np.float64) for _, p in same]))
        convs = [c for c, _ in same]
        return HorizontalMatch(x, convs, [c.outputs[0] for c in convs], fused, dtypes.pop())

    def rewrite(self, ctx: Context, m: HorizontalMatch) -> Rewrite:
        g = ctx.graph
        sizes = [int(c.inputs[1].values.shape[0]) for c in m.convs]
        base = m.convs[0].name
        y = g.variable(f"{base}.combined", m.outs[0])
        conv = g.write_conv(f"{base}.combined", m.params, m.x, y, m.dtype)
        opset = int(g.graph.opset or 13)
        if opset >= 13:
            split = g.add_node("Split", f"{base}.split", [y, g.constant(f"{base}.split_sizes", np.array(sizes), np.int64)], m.outs, {"axis": 1})
        else:
            split = g.add_node("Split", f"{base}.split", [y], m.outs, {"axis": 1, "split": sizes})
        return Rewrite(self.name, base, tuple(c.name for c in m.convs), (conv.name, split.name),
                       f"{len(m.convs)} convs on '{m.x.name}' -> conv + Split {sizes}")
