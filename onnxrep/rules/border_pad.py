"""fold_border_pad_into_conv: a Pad whose border value equals the bias of the 1x1 conv before it
moves into that conv.

Before:  x -> Conv1x1(W, b, stride 1) -> Pad(pads P, constant c) -> y      with b[o] == c for all o
After:   x -> Conv1x1(W, b, pads + P) -> y

A stride-1 1x1 conv with padding computes exactly its bias on the padded border, so padding its
output with the value of its bias is the same as padding its input with zeros (docs/rules.md §6: a
1x1 conv commutes with padding when the pad value is its own bias). This is how DBB's
"BN then pad with the BN output of a zero input" appears once the BN is folded; written as
pad(y - v) + v the Sub folds first (bias b - v ~ 0, pad value 0) and the Add after. With the
border inside conv1, a following unpadded KxK composes exactly (compose_sequential_convs).
The bias must match c within float32 rounding (|b - c| <= 1e-6 * max(1, |b|, |c|)), and the
layer after the border must then compose with the 1x1 without raising FLOPs: otherwise the move
would only make the 1x1 run on a larger canvas.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import Decline
from ..graph import producer, spatial_hw, static_shape
from ..kernels import ConvParams, layer_flops, pad_into_conv
from ..passes import Context, Match, Rewrite, Rule
from ..patterns import LINEAR, judge_composition

BIAS_RTOL = 1e-6


@dataclass
class BorderMatch(Match):
    pad: object
    conv: object
    params: ConvParams

    @property
    def removes(self):
        return [self.conv, self.pad]

    @property
    def keeps(self):
        return [self.pad.outputs[0]]


class FoldBorderPadIntoConv(Rule):
    name = "fold_border_pad_into_conv"
    ops = ("Pad",)
    summary = "1x1 Conv -> Pad with the conv's bias as border value -> the conv's own pads"

    def match(self, ctx: Context, node):
        g = ctx.graph
        conv = producer(node.inputs[0])
        if conv is None or conv.op != "Conv":
            return None
        try:
            p = g.read_conv(conv)
        except Decline:
            return None
        if p.kernel_shape != (1, 1) or p.strides != (1, 1):
            return None
        if g.escapes([conv, node], keep=node.outputs):
            return None
        spec = g.read_pad(node)
        try:
            top, left, bottom, right = spec.spatial()
        except Decline as exc:
            raise Decline(f"Pad '{node.name}': {exc}") from None
        if min(top, left, bottom, right) < 0:
            raise Decline(f"Pad '{node.name}' crops (negative pads)")
        value = spec.value
        bias = np.asarray(p.bias, np.float64)
        tol = BIAS_RTOL * max(1.0, float(np.max(np.abs(bias))), abs(value))
        if np.max(np.abs(bias - value)) > tol:
            raise Decline(f"Pad '{node.name}' border value {value:g} is not the bias of Conv '{conv.name}' "
                          f"(max |b - c| {np.max(np.abs(bias - value)):.2e})")
        padded = pad_into_conv(p, top, left, bottom, right)
        try:
            _composes_next(ctx, node, conv, p, padded)
        except Decline as exc:
            raise Decline(f"Pad '{node.name}': {exc}") from None
        return BorderMatch(node, conv, padded)

    def rewrite(self, ctx: Context, m: BorderMatch) -> Rewrite:
        new = ctx.graph.repad_conv(m.conv, m.params.pads, m.conv.inputs[0], m.pad.outputs[0])
        return Rewrite(self.name, m.pad.name, (m.conv.name, m.pad.name), (new.name,),
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
    pad_flops = int(np.prod(static_shape(pad.outputs[0])[1:])) if spatial_hw(pad.outputs[0]) else 0
    before = (layer_flops(p, spatial_hw(conv.outputs[0]) or (1, 1)) + pad_flops
              + layer_flops(p2, spatial_hw(nxt.outputs[0]) or (1, 1), pool=nxt.op == "AveragePool"))
    judge_composition(ctx, padded, p2, nxt.outputs[0], conv.inputs[0], before)
