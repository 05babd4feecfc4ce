"""merge_conv_into_fc_view: a conv on the image view of a tensor, added to an FC (1x1 conv) on
its flat view, becomes part of the FC (RepMLP's locality injection).

Before:  T -> Reshape([M, S*P, 1, 1]) -> Conv1x1(Wf, groups F) -> Reshape([M, S, h, w]) --\\
         T -> Reshape([M, S, h, w]) -> Conv kxk (W, groups G, stride 1, 'same' pads) -------Add -> y
         (each branch optionally followed by the same Reshape R before the Add)
After:   T -> Reshape([M, S*P, 1, 1]) -> Conv1x1(Wf + blocks(W), groups F) -> Reshape -> y

Both views hold each sample's S*h*w values in the same order (a Reshape never moves data), so
on every sample the conv is a linear map of the FC's input vector: per group, the matrix
``kernels.conv_patch_blocks`` finds by convolving unit impulses, zero padding included. It
adds into the FC's matrix where its channels fall inside one of the FC's groups (G a multiple
of F), and its bias, repeated over the P = h*w positions, into the FC's bias (docs/rules.md §13).
The FC's cost is unchanged and the conv's is saved.

Declined by not matching: views of different tensors, an FC that is not 1x1 on a 1x1 image,
a conv that changes the image size; with a reason: groups that do not nest, channels or sizes
that do not agree.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional

import numpy as np

from ..errors import Decline
from ..graph import const_value, producer, static_shape
from ..kernels import ConvParams, conv_patch_blocks
from ..passes import Context, Match, Rewrite, Rule


@dataclass
class FcViewMatch(Match):
    add: object
    outer: tuple  # the Reshapes R before the Add (both, or none)
    q: object  # Reshape of the FC's output to the image view
    fc: object
    conv: object
    merged: ConvParams
    dtype: object

    @property
    def removes(self):
        return [self.add, *self.outer, self.q, self.fc, self.conv]

    @property
    def keeps(self):
        return [self.add.outputs[0]]


def _reshape_target(node) -> Optional[np.ndarray]:
    if node is None or node.op != "Reshape" or len(node.inputs) < 2:
        return None
    target = const_value(node.inputs[1])
    return target if target is not None and target.ndim == 1 else None


def _views(t, depth: int = 8) -> List[object]:
    """``t`` and the tensors it is a Reshape of, nearest first (same data, other shapes)."""
    chain = [t]
    while depth > 0:
        node = producer(chain[-1])
        if node is None or node.op != "Reshape":
            break
        chain.append(node.inputs[0])
        depth -= 1
    return chain


def _dims(t) -> Optional[List[int]]:
    """The static dims of ``t`` after the first (the batch), else None."""
    shape = static_shape(t)
    if shape is None or len(shape) < 2 or not all(isinstance(d, int) for d in shape[1:]):
        return None
    return [int(d) for d in shape[1:]]


class MergeConvIntoFcView(Rule):
    name = "merge_conv_into_fc_view"
    ops = ("Add",)
    summary = ("conv on the [M, S, h, w] view + FC (1x1 conv) on the flat [M, S*h*w, 1, 1] view of one tensor "
               "-> that FC (RepMLP's locality injection)")

    def match(self, ctx: Context, node):
        if len(node.inputs) != 2:
            return None
        a, b = node.inputs
        outer: tuple = ()
        ra, rb = producer(a), producer(b)
        ta, tb = _reshape_target(ra), _reshape_target(rb)
        if ta is not None and tb is not None and np.array_equal(ta, tb) \
                and ra.attrs.get("allowzero", 0) == rb.attrs.get("allowzero", 0):
            outer, a, b = (ra, rb), ra.inputs[0], rb.inputs[0]
        for fc_side, conv_side in ((a, b), (b, a)):
            m = self._match_branches(ctx, node, outer, fc_side, conv_side)
            if m is not None:
                return m
        return None

    def _match_branches(self, ctx: Context, add, outer, fc_side, conv_side):
        g = ctx.graph
        q = producer(fc_side)
        fc = producer(q.inputs[0]) if q is not None and q.op == "Reshape" else None
        conv = producer(conv_side)
        if fc is None or fc.op != "Conv" or conv is None or conv.op != "Conv" or conv is fc:
            return None
        flat, image = fc.inputs[0], conv.inputs[0]
        common = [t for t in _views(flat) if any(t is u for u in _views(image))]
        if not common:
            return None
        flat_dims, image_dims = _dims(flat), _dims(image)
        if flat_dims is None or image_dims is None or len(image_dims) < 2 or any(d != 1 for d in flat_dims[1:]):
            return None
        pf, pc = g.read_conv(fc), g.read_conv(conv)
        if any(k != 1 for k in pf.kernel_shape) or any(s != 1 for s in pf.strides) or any(pf.pads):
            return None
        channels, size = image_dims[0], tuple(image_dims[1:])
        positions = int(np.prod(size, dtype=np.int64))
        cf = flat_dims[0]
        if cf != channels * positions or pf.out_channels != cf or pf.weight.shape[1] * pf.group != cf:
            raise Decline(f"the FC on {cf} values is not square over the {channels} x {list(size)} view")
        if _dims(fc_side) != image_dims or _dims(conv_side) != image_dims:
            raise Decline("the FC's output is not reshaped to the conv's image view")
        if pc.out_channels != channels or pc.weight.shape[1] * pc.group != channels:
            raise Decline(f"the conv does not map the view's {channels} channels to as many")
        if channels % pf.group or pc.group % pf.group:
            raise Decline(f"the conv's {pc.group} groups do not fall inside the FC's {pf.group} groups")
        blocks = conv_patch_blocks(pc, size)  # [G, (S/G) P, (S/G) P]
        w = np.array(pf.weight, np.float64).reshape(cf, cf // pf.group)
        per_conv = (channels // pc.group) * positions
        per_fc = (channels // pf.group) * positions
        for gi in range(pc.group):
            rows = slice(gi * per_conv, (gi + 1) * per_conv)
            start = (gi * per_conv) % per_fc
            w[rows, start:start + per_conv] += blocks[gi]
        bias = np.asarray(pf.bias, np.float64) + np.repeat(np.asarray(pc.bias, np.float64), positions)
        merged = replace(pf, weight=w.reshape(pf.weight.shape), bias=bias)
        return FcViewMatch(add, outer, q, fc, conv, merged, pf.weight.dtype)

    def rewrite(self, ctx: Context, m: FcViewMatch) -> Rewrite:
        g = ctx.graph
        base = m.fc.name
        z = g.variable(f"{base}.out", m.fc.outputs[0])
        created = [g.write_conv(base, m.merged, m.fc.inputs[0], z, m.dtype)]
        out = m.add.outputs[0]
        viewed = g.variable(f"{m.q.name}.out", m.q.outputs[0]) if m.outer else out
        created.append(g.add_node("Reshape", m.q.name, [z, *m.q.inputs[1:]], [viewed], dict(m.q.attrs)))
        if m.outer:
            r = m.outer[0]
            created.append(g.add_node("Reshape", r.name, [viewed, *r.inputs[1:]], [out], dict(r.attrs)))
        k = "x".join(str(v) for v in m.conv.inputs[1].shape[2:]) if m.conv.inputs[1].shape else "?"
        return Rewrite(self.name, m.add.name, tuple(n.name for n in m.removes), tuple(n.name for n in created),
                       f"conv{k} on the image view merged into the FC on the flat view")
