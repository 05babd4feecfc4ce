"""fold_bn_into_conv: BatchNormalization after Conv, ConvTranspose, Gemm or MatMul.

Before:  x -> Conv(W, b) -> BatchNormalization(gamma, beta, mean, var, eps) -> y
After:   x -> Conv(W', b') -> y

with sigma = sqrt(var + eps), s = gamma / sigma:
    W' = W * s[:, None, None, None],   b' = (b - mean) * s + beta          (DESIGN 3.1)
ConvTranspose's weight is [Cin, Cout/g, kh, kw]: s goes on axis 1 of each group.
Gemm / MatMul with a constant 2-D weight (rank-2 output, so BN's channel axis is the feature
axis) become one Gemm whose weight columns are scaled.
The conv output must feed only the BN (the central escape check) and BN must be in inference
mode with constant parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..graph import const_value, producer
from ..kernels import affine_after_conv, affine_after_conv_transpose, affine_after_matmul
from ..passes import Context, Rewrite, Rule


@dataclass
class BnMatch:
    bn: object
    layer: object
    scale: np.ndarray
    shift: np.ndarray


class FoldBnIntoConv(Rule):
    name = "fold_bn_into_conv"
    ops = ("BatchNormalization",)
    summary = "Conv/ConvTranspose/Gemm/MatMul -> BatchNormalization folded into the layer"

    def match(self, ctx: Context, node):
        g = ctx.graph
        layer = producer(node.inputs[0])
        if layer is None or layer.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            return None
        bn = g.read_batchnorm(node)
        if isinstance(bn, str):
            return bn
        reason = g.escapes([layer, node], keep=node.outputs[:1])
        if reason:
            return f"{layer.op} '{layer.name}' output escapes: {reason}"
        if layer.op == "Conv":
            p = g.read_conv(layer)
            if isinstance(p, str):
                return p
        else:
            w = const_value(layer.inputs[1])
            if w is None:
                return f"{layer.op} '{layer.name}' weight is not a constant"
            if layer.op in ("Gemm", "MatMul") and (w.ndim != 2 or len(node.inputs[0].shape or ()) != 2):
                return f"{layer.op} '{layer.name}' output is not 2-D: BN's channel axis is not its feature axis"
            if layer.op == "Gemm" and len(layer.inputs) > 2 and layer.inputs[2].name:
                c = const_value(layer.inputs[2])
                features = w.shape[0] if int(layer.attrs.get("transB", 0)) else w.shape[1]
                if c is None:
                    return f"Gemm '{layer.name}' bias is not a constant"
                if c.size not in (1, features) or c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1):
                    return f"Gemm '{layer.name}' bias is not per-feature"
        return BnMatch(node, layer, *bn)

    def rewrite(self, ctx: Context, m: BnMatch) -> Rewrite:
        g = ctx.graph
        layer, y = m.layer, m.bn.outputs[0]
        x = layer.inputs[0]
        dtype = layer.inputs[1].values.dtype
        if layer.op == "Conv":
            p = affine_after_conv(g.read_conv(layer), m.scale, m.shift)
            new = g.write_conv(layer.name, p, x, y, dtype)
        elif layer.op == "ConvTranspose":
            bias = const_value(layer.inputs[2]) if len(layer.inputs) > 2 and layer.inputs[2].name else None
            group = int(layer.attrs.get("group", 1))
            w, b = affine_after_conv_transpose(layer.inputs[1].values, bias, group, m.scale, m.shift)
            new = g.add_node("ConvTranspose", layer.name,
                             [x, g.constant(f"{layer.name}.weight", w, dtype), g.constant(f"{layer.name}.bias", b, dtype)],
                             [y], dict(layer.attrs))
        else:
            w, bias = _as_matmul(layer)
            w, b = affine_after_matmul(w, bias, m.scale, m.shift)
            attrs = {"transA": int(layer.attrs.get("transA", 0))} if layer.op == "Gemm" else {}
            new = g.add_node("Gemm", layer.name,
                             [x, g.constant(f"{layer.name}.weight", w, dtype), g.constant(f"{layer.name}.bias", b, dtype)],
                             [y], attrs)
        g.remove([layer, m.bn])
        return Rewrite(self.name, m.bn.name, (layer.name, m.bn.name), (new.name,), f"{layer.op} + BN")


def _as_matmul(layer):
    """(W[K, M], bias[M] or None) of y = x @ W + bias for a Gemm or MatMul with constant weight."""
    w = np.asarray(layer.inputs[1].values, dtype=np.float64)
    if layer.op == "MatMul":
        return w, None
    alpha = float(layer.attrs.get("alpha", 1.0))
    beta = float(layer.attrs.get("beta", 1.0))
    if int(layer.attrs.get("transB", 0)):
        w = w.T
    w = w * alpha
    c = const_value(layer.inputs[2]) if len(layer.inputs) > 2 and layer.inputs[2].name else None
    if c is None:
        return w, None
    return w, np.broadcast_to(np.asarray(c, np.float64) * beta, (1, w.shape[1])).reshape(-1)
