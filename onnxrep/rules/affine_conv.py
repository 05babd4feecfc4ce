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
from typing import Optional

from ..errors import Decline
from ..graph import producer, static_shape
from ..kernels import ConvParams, affine_after_conv, affine_after_matmul
from ..passes import Context, Match, Rewrite, Rule


@dataclass
class AffineMatch(Match):
    node: object
    conv: object  # the Conv, Gemm or MatMul
    params: Optional[ConvParams]  # the conv with the affine map folded in, or
    x: object
    y: object
    linear: Optional[tuple] = None  # the Gemm's (W[K, M], b[M]) with it folded in

    @property
    def removes(self):
        return [self.conv, self.node]

    @property
    def keeps(self):
        return [self.y]


class FoldAffineIntoConv(Rule):
    name = "fold_affine_into_conv"
    ops = ("Mul", "Div", "Add", "Sub", "Neg")
    summary = "per-channel constant Mul/Div/Add/Sub (or Neg) after Conv, or Gemm/MatMul of rank 2 -> its weights and bias"

    def match(self, ctx: Context, node):
        g = ctx.graph
        affine = g.read_channel_affine(node)
        if affine is None:
            return None
        x, scale, shift = affine
        conv = producer(x)
        if conv is None or conv.op not in ("Conv", "Gemm", "MatMul"):
            return None
        if conv.op != "Conv":  # y = x @ W + b over rank-2 features: the channel axis is the feature axis
            if len(static_shape(x) or ()) != 2 or len(static_shape(conv.inputs[0]) or ()) != 2:
                return None
            if conv.op == "Gemm" and int(conv.attrs.get("transA", 0)):
                return None
            w, b = g.read_matmul(conv)
            if w.shape[1] != len(scale):
                raise Decline(f"'{node.name}' constant does not match {conv.op} '{conv.name}' features")
            return AffineMatch(node, conv, None, conv.inputs[0], node.outputs[0],
                               linear=affine_after_matmul(w, b, scale, shift))
        p = g.read_conv(conv)
        if p.out_channels != len(scale):
            raise Decline(f"'{node.name}' constant does not match Conv '{conv.name}' channels")
        return AffineMatch(node, conv, affine_after_conv(p, scale, shift), conv.inputs[0], node.outputs[0])

    def rewrite(self, ctx: Context, m: AffineMatch) -> Rewrite:
        g = ctx.graph
        dtype = m.conv.inputs[1].values.dtype
        if m.params is not None:
            new = g.write_conv(m.conv.name, m.params, m.x, m.y, dtype)
        else:
            w, b = m.linear
            new = g.add_node("Gemm", m.conv.name, [m.x, g.constant(f"{m.conv.name}.weight", w, dtype),
                                                   g.constant(f"{m.conv.name}.bias", b, dtype)], [m.y])
        return Rewrite(self.name, m.node.name, (m.conv.name, m.node.name), (new.name,), f"{m.conv.op} + {m.node.op}")
