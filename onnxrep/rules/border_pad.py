"""fold_border_pad_into_conv: a border whose value equals the bias of the 1x1 conv before it
moves into that conv.

Before:  x -> Conv1x1(W, b, stride 1) -> border (pads P, value c[o] per channel) -> y   with b[o] == c[o]
After:   x -> Conv1x1(W, b, pads + P) -> y

A stride-1 1x1 conv with padding computes exactly its bias on the padded border, so padding its
output with the value of its bias is the same as padding its input with zeros (docs/rules.md §6: a
1x1 conv commutes with padding when the pad value is its own bias). This is how DBB's
"BN then pad with the BN output of a zero input" appears once the BN is folded. The border is
read by ``RepGraph.read_border`` in any of its spellings: a constant Pad (one value for every
channel); pad(y - v) + v, where the Sub folds first (bias b - v ~ 0, pad value 0) and the Add
after; or Concats of constant slabs on H and W, per-channel values, Expand'ed to the input's
batch under a dynamic batch (paddle2onnx). With the border inside conv1, a following unpadded
KxK composes exactly (compose_sequential_convs).
The bias must match c within float32 rounding (|b - c| <= 1e-6 * max(1, |b|, |c|)), and the
layer after the border must then compose with the 1x1 without raising FLOPs: otherwise the move
would only make the 1x1 run on a larger canvas.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import Decline
from ..graph import BorderSpec, const_value, producer, static_shape
from ..cost import elementwise_flops, layer_output_flops, resolved_shape
from ..kernels import ConvParams, pad_into_conv
from ..passes import Context, Match, Rewrite, Rule
from ..patterns import LINEAR, judge_composition

BIAS_RTOL = 1e-6


@dataclass
class BorderMatch(Match):
    pad: object  # the node whose output is the padded tensor (a Pad, or the outer Concat)
    conv: object
    params: ConvParams
    spec: BorderSpec

    @property
    def removes(self):
        return [self.conv, *self.spec.nodes]

    @property
    def keeps(self):
        return [self.pad.outputs[0]]


class FoldBorderPadIntoConv(Rule):
    name = "fold_border_pad_into_conv"
    ops = ("Pad", "Concat")
    summary = "1x1 Conv -> border (Pad, or Concat of constant slabs) with the conv's bias as value -> the conv's own pads"

    def match(self, ctx: Context, node):
        g = ctx.graph
        if node.op == "Concat" and not _outer_border_concat(g, node):
            return None
        spec = g.read_border(node)
        conv = producer(spec.x)
        if conv is None or conv.op != "Conv":
            return None
        try:
            p = g.read_conv(conv)
        except Decline:
            return None
        if p.kernel_shape != (1, 1) or p.strides != (1, 1):
            return None
        if g.escapes([conv, *spec.nodes], keep=node.outputs):
            return None
        bias = np.asarray(p.bias, np.float64)
        value = spec.value_for(len(bias))
        tol = BIAS_RTOL * max(1.0, float(np.max(np.abs(bias))), float(np.max(np.abs(value))))
        err = np.max(np.abs(bias - value))
        if err > tol:
            shown = f"{value[0]:g}" if np.all(value == value[0]) else "per channel"
            raise Decline(f"{node.op} '{node.name}' border value {shown} is not the bias of Conv '{conv.name}' "
                          f"(max |b - c| {err:.2e})")
        padded = pad_into_conv(p, *spec.pads)
        try:
            _composes_next(ctx, node, conv, p, padded)
        except Decline as exc:
            raise Decline(f"{node.op} '{node.name}': {exc}") from None
        return BorderMatch(node, conv, padded, spec)

    def rewrite(self, ctx: Context, m: BorderMatch) -> Rewrite:
        y = m.pad.outputs[0]
        new = ctx.graph.repad_conv(m.conv, m.params.pads, m.conv.inputs[0], y)
        _refine_shape(y, m.spec)
        return Rewrite(self.name, m.pad.name, tuple(n.name for n in m.removes), (new.name,),
                       f"border {tuple(m.params.pads)} now padded by the 1x1 conv itself")


def _composes_next(ctx: Context, pad, conv, p: ConvParams, padded: ConvParams) -> None:
    """Decline unless moving the border into the 1x1 pays.

    On its own the move makes the 1x1 run on the larger canvas; it pays only when the layer
    after the border (past per-channel affine ops) then composes with the 1x1 at no more
    FLOPs than 1x1 + Pad + that layer cost now.
    """
    g = ctx.graph
    t = pad.outputs[0]
    nxt = g.sole_consumer(t)
    while nxt is not None and nxt.op not in LINEAR:
        affine = g.read_channel_affine(nxt)
        if affine is None or affine[0] is not t:
            raise Decline("the border does not lead straight to a conv")
        t = nxt.outputs[0]
        nxt = g.sole_consumer(t)
    if nxt is None or nxt.inputs[0] is not t:
        raise Decline("the border does not lead straight to a conv")
    p2 = g.read_linear(nxt)
    shape = resolved_shape(g, pad.outputs[0])
    pad_flops = elementwise_flops(pad.op, int(np.prod(shape))) if shape is not None else 0
    before = (layer_output_flops(p, conv.outputs[0], "Conv", g) + pad_flops
              + layer_output_flops(p2, nxt.outputs[0], nxt.op, g))
    judge_composition(ctx, padded, p2, nxt.outputs[0], conv.inputs[0], before, build=False)


def _outer_border_concat(g, node) -> bool:
    """A spatial Concat with a constant or Expand operand that is not itself an operand of
    another such Concat (the outer one of a chain anchors the match)."""
    axis = int(node.attrs.get("axis", 1))
    if axis not in (2, 3, -1, -2):
        return False
    if not any(const_value(t) is not None or (producer(t) is not None and producer(t).op == "Expand")
               for t in node.inputs):
        return False
    parent = g.sole_consumer(node.outputs[0])
    return parent is None or parent.op != "Concat" or int(parent.attrs.get("axis", 1)) not in (2, 3, -1, -2)


def _refine_shape(y, spec: BorderSpec) -> None:
    """Give the padded tensor the sizes the border proves (the input's plus the pads) where
    inference left them unknown: under a dynamic batch it cannot size an Expand'ed slab, and
    the layers after the border are sized from this tensor."""
    shape, inner = static_shape(y), static_shape(spec.x)
    if shape is None or inner is None or len(shape) != 4 or len(inner) != 4:
        return
    top, left, bottom, right = spec.pads
    proven = [inner[0], inner[1],
              inner[2] + top + bottom if isinstance(inner[2], int) else None,
              inner[3] + left + right if isinstance(inner[3], int) else None]
    y.shape = [d if isinstance(d, int) or p is None else p for d, p in zip(shape, proven)]
