"""fold_affine_into_conv: per-channel Mul/Div/Add/Sub by a constant after a Conv.

Before:  x -> Conv(W, b) -> Mul(s) / Add(t) / Sub(t) / Div(s) / Neg -> y      (s, t: [1,C,1,1] or scalar)
After:   x -> Conv(W', b') -> y

y = conv(x) * s + t  gives  W' = W * s[:, None, None, None],  b' = b * s + t  (docs/rules.md §2).
OREPA / MobileOne scaling layers export like this. A constant that varies over H or W, lines up
with the width axis, or divides the constant by the activation is not per-channel affine and the
rule declines by not matching.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import Decline
from ..graph import producer
from ..kernels import ConvParams, affine_after_conv
from ..passes import Context, Match, Rewrite, Rule


@dataclass
class AffineMatch(Match):
    node: object
    conv: object
    params: ConvParams  # the conv with the affine map folded in
    x: object
    y: object

    @property
    def removes(self):
        return [self.conv, self.node]

    @property
    def keeps(self):
        return [self.y]


class FoldAffineIntoConv(Rule):
    name = "fold_affine_into_conv"
    ops = ("Mul", "Div", "Add", "Sub", "Neg")
    summary = "per-channel constant Mul/Div/Add/Sub (or Neg) after Conv -> Conv weights and bias"

    def match(self, ctx: Context, node):
        g = ctx.graph
        affine = g.read_channel_affine(node)
        if affine is None:
            return None
        x, scale, shift = affine
        conv = producer(x)
        if conv is None or conv.op != "Conv":
            return None
        reason = g.escapes([conv, node], keep=node.outputs)
        if reason:
            raise Decline(f"Conv '{conv.name}' output escapes: {reason}")
        p = g.read_conv(conv)
        if p.out_channels != len(scale):
            raise Decline(f"'{node.name}' constant does not match Conv '{conv.name}' channels")
        return AffineMatch(node, conv, affine_after_conv(p, scale, shift), conv.inputs[0], node.outputs[0])

    def rewrite(self, ctx: Context, m: AffineMatch) -> Rewrite:
        new = ctx.graph.write_conv(m.conv.name, m.params, m.x, m.y, m.conv.inputs[1].values.dtype)
        return Rewrite(self.name, m.node.name, (m.conv.name, m.node.name), (new.name,), f"Conv + {m.node.op}")
