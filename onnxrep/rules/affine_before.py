"""fold_affine_into_next_layer: a per-channel affine op BEFORE a Conv, Gemm or MatMul.

Before:  x -> BatchNormalization / Mul / Add / Sub / Div / Neg (per channel) -> t -> Conv(W, b) -> y
After:   x -> Conv(W', b') -> y

with t = x * s + h per input channel (docs/rules.md §2, kernels.affine_before_conv):
    W'[o, i] = W[o, i] * s[c],   b'[o] = b[o] + sum_{i, taps} W[o, i, taps] * h[c]
for the input channel c that (o, i) reads. Pre-norm blocks (RepLKNet, RepMLP, ConvNeXt-style)
and classifier heads (BN1d -> Linear) export like this. Exact when the conv does not pad, or
when h == 0 (a pure scale commutes with zero padding); a shift before a zero-padded conv would
be wrong on the border, so the rule declines (DBB's BN-and-pad border is fold_border_pad's
business). Gemm / MatMul read a rank-2 input whose features are the channel axis:
W' = s[:, None] * W, b' = b + h @ W, written as one Gemm.

Every reader of t must be such a layer (each gets its own folded copy); otherwise the affine op
stays. A Mul/Div/Add/Sub by a single scalar is left to the runtime: it saves one elementwise op
at most, and it is often the tail of an activation the runtime fuses (GELU's "* 0.5"). Runs after fold_bn_into_conv / fold_affine_into_conv, so a BN between two convs folds into
the conv before it first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np

from ..errors import Decline
from ..graph import const_value, static_shape
from ..kernels import ConvParams, affine_before_conv, affine_before_matmul
from ..passes import Context, Match, Rewrite, Rule


@dataclass
class _Folded:
    layer: object
    conv: ConvParams = None  # for a Conv
    weight: np.ndarray = None  # for Gemm / MatMul: W'[K, M]
    bias: np.ndarray = None
    dtype: object = None


@dataclass
class AffineBeforeMatch(Match):
    node: object
    x: object
    layers: List[_Folded]

    @property
    def removes(self):
        return [self.node] + [f.layer for f in self.layers]

    @property
    def keeps(self):
        return [f.layer.outputs[0] for f in self.layers]


class FoldAffineIntoNextLayer(Rule):
    name = "fold_affine_into_next_layer"
    ops = ("BatchNormalization", "Mul", "Div", "Add", "Sub", "Neg")
    summary = "per-channel BN/Mul/Add/Sub/Div/Neg before an unpadded Conv (or Gemm/MatMul) -> that layer"

    def match(self, ctx: Context, node):
        g = ctx.graph
        affine = g.read_channel_affine(node)
        if affine is None:
            return None
        x, scale, shift = affine
        if node.op in ("Mul", "Div", "Add", "Sub") and all(
                (v := const_value(i)) is None or v.size == 1 for i in node.inputs):
            return None  # a scalar: see the module docstring
        t = node.outputs[0]
        readers = t.outputs
        if not readers or g.pinned(t) or any(r.op not in ("Conv", "Gemm", "MatMul") for r in readers):
            return None
        folded = []
        for layer in readers:
            if layer.inputs[0] is not t or any(i is t for i in layer.inputs[1:]):
                raise Decline(f"'{t.name}' is also a weight of '{layer.name}'")
            folded.append(self._fold(g, layer, scale, shift))
        return AffineBeforeMatch(node, x, folded)

    @staticmethod
    def _fold(g, layer, scale, shift) -> _Folded:
        if layer.op == "Conv":
            p = g.read_conv(layer)
            if p.in_channels != len(scale):
                raise Decline(f"Conv '{layer.name}' reads {p.in_channels} channels, the affine op has {len(scale)}")
            try:
                return _Folded(layer, conv=affine_before_conv(p, scale, shift), dtype=p.weight.dtype)
            except Decline as exc:
                raise Decline(f"Conv '{layer.name}': {exc}") from None
        if len(static_shape(layer.inputs[0]) or ()) != 2:
            raise Decline(f"{layer.op} '{layer.name}' input is not 2-D: its features are not the channel axis")
        if layer.op == "Gemm" and int(layer.attrs.get("transA", 0)):
            raise Decline(f"Gemm '{layer.name}' transposes its input")
        w, bias = g.read_matmul(layer)
        if w.shape[0] != len(scale):
            raise Decline(f"{layer.op} '{layer.name}' has {w.shape[0]} input features, the affine op {len(scale)}")
        weight, bias = affine_before_matmul(w, bias, scale, shift)
        return _Folded(layer, weight=weight, bias=bias, dtype=const_value(layer.inputs[1]).dtype)

    def rewrite(self, ctx: Context, m: AffineBeforeMatch) -> Rewrite:
        g = ctx.graph
        created = []
        for f in m.layers:
            y = f.layer.outputs[0]
            if f.conv is not None:
                new = g.write_conv(f.layer.name, f.conv, m.x, y, f.dtype)
            else:
                new = g.add_node("Gemm", f.layer.name, [m.x, g.constant(f"{f.layer.name}.weight", f.weight, f.dtype),
                                                        g.constant(f"{f.layer.name}.bias", f.bias, f.dtype)], [y])
            created.append(new.name)
        layers = ", ".join(f.layer.op for f in m.layers)
        return Rewrite(self.name, m.node.name, tuple(n.name for n in m.removes), tuple(created),
                       f"{m.node.op} folded into {layers}")
