"""fold_border_pad_into_conv: a Pad whose border value equals the bias of the 1x1 conv before it
moves into that conv.

Before:  x -> Conv1x1(W, b, stride 1) -> Pad(pads P, constant c) -> y      with b[o] == c for all o
After:   x -> Conv1x1(W, b, pads + P) -> y

A stride-1 1x1 conv with padding computes exactly its bias on the padded border, so padding its
output with the value of its bias is the same as padding its input with zeros (DESIGN 3.6: a
1x1 conv commutes with padding when the pad value is its own bias). This is how DBB's
"BN then pad with the BN output of a zero input" appears once the BN is folded; written as
pad(y - v) + v the Sub folds first (bias b - v ~ 0, pad value 0) and the Add after. With the
border inside conv1, a following unpadded KxK composes exactly (compose_sequential_convs).
The bias must match c within float32 rounding (|b - c| <= 1e-6 * max(1, |b|, |c|)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..graph import producer
from ..kernels import ConvParams, pad_into_conv
from ..passes import Context, Rewrite, Rule
from .pad_conv import _pads_of

BIAS_RTOL = 1e-6


@dataclass
class BorderMatch:
    pad: object
    conv: object
    params: ConvParams


class FoldBorderPadIntoConv(Rule):
    name = "fold_border_pad_into_conv"
    ops = ("Pad",)
    summary = "1x1 Conv -> Pad with the conv's bias as border value -> the conv's own pads"

    def match(self, ctx: Context, node):
        g = ctx.graph
        conv = producer(node.inputs[0])
        if conv is None or conv.op != "Conv":
            return None
        p = g.read_conv(conv)
        if isinstance(p, str) or p.kernel_shape != (1, 1) or p.strides != (1, 1):
            return None
        if g.escapes([conv, node], keep=node.outputs):
            return None
        got = _pads_of(node)
        if isinstance(got, str):
            return got
        pads, value = got
        if len(pads) != 8 or any(pads[i] for i in (0, 1, 4, 5)) or min(pads) < 0:
            return f"Pad '{node.name}' is not a non-negative H/W pad of a 4-D tensor"
        bias = np.asarray(p.bias, np.float64)
        tol = BIAS_RTOL * max(1.0, float(np.max(np.abs(bias))), abs(value))
        if np.max(np.abs(bias - value)) > tol:
            return (f"Pad '{node.name}' border value {value:g} is not the bias of Conv '{conv.name}' "
                    f"(max |b - c| {np.max(np.abs(bias - value)):.2e})")
        return BorderMatch(node, conv, pad_into_conv(p, pads[2], pads[3], pads[6], pads[7]))

    def rewrite(self, ctx: Context, m: BorderMatch) -> Rewrite:
        g = ctx.graph
        new = g.repad_conv(m.conv, m.params.pads, m.conv.inputs[0], m.pad.outputs[0])
        g.remove([m.conv, m.pad])
        return Rewrite(self.name, m.pad.name, (m.conv.name, m.pad.name), (new.name,),
                       f"border {tuple(m.params.pads)} now padded by the 1x1 conv itself")
