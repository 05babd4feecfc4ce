"""fold_bn_into_conv: BatchNormalization after Conv, ConvTranspose, Gemm or MatMul.

Before:  x -> Conv(W, b) -> BatchNormalization(gamma, beta, mean, var, eps) -> y
After:   x -> Conv(W', b') -> y

with sigma = sqrt(var + eps), s = gamma / sigma:
    W' = W * s[:, None, None, None],   b' = (b - mean) * s + beta          (docs/rules.md §1)
ConvTranspose's weight is [Cin, Cout/g, kh, kw]: s goes on axis 1 of each group.
Gemm / MatMul with a constant 2-D weight (rank-2 output, so BN's channel axis is the feature
axis) become one Gemm whose weight columns are scaled.
The conv output must feed only the BN (the central escape check) and BN must be in inference
mode with constant parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import Decline
from ..graph import const_value, producer
from ..kernels import ConvParams, affine_after_conv, affine_after_conv_transpose, affine_after_matmul
from ..passes import Context, Match, Rewrite, Rule


@dataclass
class BnMatch(Match):
    bn: object
    layer: object
    scale: np.ndarray
    shift: np.ndarray
    x: object
    y: object
    dtype: object
    conv: Optional[ConvParams] = None  # Conv
    weight: Optional[np.ndarray] = None  # ConvTranspose / Gemm / MatMul
    bias: Optional[np.ndarray] = None

    @property
    def removes(self):
        return [self.layer, self.bn]

    @property
    def keeps(self):
        return [self.y]


class FoldBnIntoConv(Rule):
    name = "fold_bn_into_conv"
    ops = ("BatchNormalization",)
    summary = "Conv/ConvTranspose/Gemm/MatMul -> BatchNormalization folded into the layer"

    def match(self, ctx: Context, node):
        g = ctx.graph
        layer = producer(node.inputs[0])
        if layer is None or layer.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            return None
        scale, shift = g.read_batchnorm(node)
        m = BnMatch(node, layer, scale, shift, layer.inputs[0], node.outputs[0], None)
        if layer.op == "Conv":
            m.conv = g.read_conv(layer)
            m.dtype = m.conv.weight.dtype
            if m.conv.out_channels != len(scale):
                raise Decline(f"BatchNormalization '{node.name}' has {len(scale)} channels, Conv '{layer.name}' "
                              f"{m.conv.out_channels}")
            return m
        w = const_value(layer.inputs[1])
        if w is None:
            raise Decline(f"{layer.op} '{layer.name}' weight is not a constant")
        m.dtype = w.dtype
        if layer.op == "ConvTranspose":
            group = int(layer.attrs.get("group", 1))
            if len(layer.inputs) > 2 and layer.inputs[2].name:
                m.bias = const_value(layer.inputs[2])
                if m.bias is None:
                    raise Decline(f"ConvTranspose '{layer.name}' bias '{layer.inputs[2].name}' is not a constant")
            if w.ndim < 3 or w.shape[1] * group != len(scale):
                raise Decline(f"ConvTranspose '{layer.name}' output channels do not match the BN")
            m.weight = w
            return m
        if w.ndim != 2 or len(node.inputs[0].shape or ()) != 2:
            raise Decline(f"{layer.op} '{layer.name}' output is not 2-D: BN's channel axis is not its feature axis")
        if layer.op == "Gemm" and int(layer.attrs.get("transA", 0)) not in (0, 1):
            raise Decline(f"Gemm '{layer.name}' has an unexpected transA")
        m.weight, m.bias = g.read_matmul(layer)
        if m.weight.shape[1] != len(scale):
            raise Decline(f"{layer.op} '{layer.name}' has {m.weight.shape[1]} features, the BN {len(scale)}")
        return m

    def rewrite(self, ctx: Context, m: BnMatch) -> Rewrite:
        g = ctx.graph
        layer = m.layer
        if layer.op == "Conv":
            new = g.write_conv(layer.name, affine_after_conv(m.conv, m.scale, m.shift), m.x, m.y, m.dtype)
        elif layer.op == "ConvTranspose":
            group = int(layer.attrs.get("group", 1))
            w, b = affine_after_conv_transpose(m.weight, m.bias, group, m.scale, m.shift)
            new = g.add_node("ConvTranspose", layer.name,
                             [m.x, g.constant(f"{layer.name}.weight", w, m.dtype), g.constant(f"{layer.name}.bias", b, m.dtype)],
                             [m.y], dict(layer.attrs))
        else:
            w, b = affine_after_matmul(m.weight, m.bias, m.scale, m.shift)
            attrs = {"transA": int(layer.attrs.get("transA", 0))} if layer.op == "Gemm" else {}
            new = g.add_node("Gemm", layer.name,
                             [m.x, g.constant(f"{layer.name}.weight", w, m.dtype), g.constant(f"{layer.name}.bias", b, m.dtype)],
                             [m.y], attrs)
        return Rewrite(self.name, m.bn.name, (layer.name, m.bn.name), (new.name,), f"{layer.op} + BN")
