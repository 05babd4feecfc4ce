"""fold_bn_through_reshape: BatchNormalization after a MatMul seen through a reshape that
keeps the feature axis last (LeViT's LinearBatchNorm).

Before:  x[.., N, C] -> MatMul(W[C, D]) -> Flatten(axis=-1) | Reshape([M, D]) -> BN(D) -> y[M, D]
After:   x[.., N, C] -> MatMul(W * s) -> Add(h) -> Flatten | Reshape -> y[M, D]

The reshape only merges leading axes, so column d of the flattened tensor is feature d of the
MatMul's output and BN's per-channel map y = z * s + h folds into W's columns and one Add of h
over the last axis (docs/rules.md §1). A reshape that moves the feature axis declines by not
matching. (Without a reshape, a rank-2 MatMul -> BN is fold_bn_into_conv's.)

The same BN after a Conv whose output is 1x1 in space, reshaped to split its channels
(RepMLP's FC3: Conv1x1 on [M, S*h*w, 1, 1] -> Reshape([-1, S, h, w]) -> BN(S)), folds too: BN
channel c covers the conv's output channels c*K .. c*K + K-1 (K = h*w), each element keeps its
sample, so W'[o] = W[o] * s[o // K] and b'[o] = b[o] * s[o // K] + h[o // K].

``Shape`` readers of the MatMul's output (TorchScript's ``reshape_as(x)`` that restores the
leading axes after the BN) read only its shape, which the new MatMul has too: they are re-created
on it. Any other reader keeps the MatMul's value alive and the match declines.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import Decline
from ..graph import const_value, producer, static_shape
from ..kernels import affine_after_conv, affine_after_matmul
from ..passes import Context, Match, Rewrite, Rule


@dataclass
class ReshapedBnMatch(Match):
    matmul: object
    reshape: object
    bn: object
    weight: np.ndarray
    shift: np.ndarray
    dtype: object
    shapes: tuple = ()  # Shape nodes reading the MatMul's output

    @property
    def removes(self):
        return [self.matmul, self.reshape, self.bn, *self.shapes]

    @property
    def keeps(self):
        return [self.bn.outputs[0], *(n.outputs[0] for n in self.shapes)]


def _keeps_last_axis(reshape, rank_in: int, features: int) -> bool:
    """Whether ``reshape`` maps [..., features] to [M, features] merging the leading axes.

    A Reshape target of two entries whose last is the literal ``features`` does: element
    (i, d) of the result is element i * features + d of the input, whose last index is d, for
    any M. M may be computed at run time (dynamo's optimize=False export multiplies the batch
    read through Shape): only the last entry and the count are read, from the constant that
    ends the target (a constant, or the last input of its Concat on axis 0).
    """
    if reshape.op == "Flatten":
        return int(reshape.attrs.get("axis", 1)) % rank_in == rank_in - 1
    if len(reshape.inputs) < 2:
        return False
    target = reshape.inputs[1]
    if static_shape(target) != [2]:
        return False
    # allowzero (which the dynamo exporter sets) only changes what a 0 entry means; the last
    # entry is a positive literal, so neither meaning of 0 applies to it
    return _last_entry(target) == features


def _last_entry(t, depth: int = 0):
    """The last element of a 1-D shape tensor when a constant gives it, else None."""
    value = const_value(t)
    if value is not None:
        return int(value.reshape(-1)[-1]) if value.ndim == 1 and value.size and value.dtype.kind in "iu" else None
    node = producer(t)
    if node is None or depth > 8:
        return None
    if node.op == "Concat" and int(node.attrs.get("axis", 0)) in (0, -1) and node.inputs:
        return _last_entry(node.inputs[-1], depth + 1)
    if node.op in ("Identity", "Cast") and node.inputs:
        return _last_entry(node.inputs[0], depth + 1) if node.op == "Identity" or _to_int(node) else None
    return None


def _to_int(cast) -> bool:
    to = int(cast.attrs.get("to", 0))
    return to in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)


@dataclass
class SplitChannelsBnMatch(Match):
    conv: object
    reshape: object
    bn: object
    params: object  # the conv with the BN folded in
    dtype: object

    @property
    def removes(self):
        return [self.conv, self.reshape, self.bn]

    @property
    def keeps(self):
        return [self.bn.outputs[0]]


def _split_channels(reshape, conv_out, channels: int) -> int:
    """K when ``reshape`` turns the [M, C*K, 1, .., 1] output of a conv into [M, C, ...] (each
    sample's C*K values as C channels of K), else 0: a constant target [-1 or M, C, d...] with
    every d > 0 and C * prod(d) the conv's channels."""
    if reshape.op != "Reshape" or len(reshape.inputs) < 2:
        return 0
    target = const_value(reshape.inputs[1])
    shape = static_shape(conv_out)
    if target is None or target.ndim != 1 or target.size < 2 or shape is None or len(shape) < 3:
        return 0
    dims = [int(v) for v in target]
    cout = shape[1]
    if not isinstance(cout, int) or any(d != 1 for d in shape[2:]) or dims[1] != channels:
        return 0
    if any(d <= 0 for d in dims[1:]) or channels * int(np.prod(dims[2:], dtype=np.int64)) != cout:
        return 0
    if dims[0] != -1 and not (isinstance(shape[0], int) and dims[0] == shape[0]):
        return 0
    return cout // channels


class FoldBnThroughReshape(Rule):
    name = "fold_bn_through_reshape"
    ops = ("BatchNormalization",)
    summary = ("MatMul -> Flatten/Reshape keeping the feature axis last (or a 1x1-output Conv -> Reshape "
               "splitting its channels) -> BatchNormalization -> one layer")

    def match(self, ctx: Context, node):
        g = ctx.graph
        reshape = producer(node.inputs[0])
        if reshape is None or reshape.op not in ("Flatten", "Reshape"):
            return None
        layer = producer(reshape.inputs[0])
        if layer is not None and layer.op == "Conv":
            return self._match_conv(g, node, reshape, layer)
        matmul = layer
        if matmul is None or matmul.op != "MatMul":
            return None
        shape = static_shape(matmul.outputs[0])
        w = const_value(matmul.inputs[1])
        if shape is None or w is None or w.ndim != 2 or len(shape) < 2:
            return None
        features = int(w.shape[1])
        if not _keeps_last_axis(reshape, len(shape), features):
            return None
        scale, shift = g.read_batchnorm(node)
        if len(scale) != features:
            raise Decline(f"BatchNormalization '{node.name}' has {len(scale)} channels, the MatMul {features} features")
        weight, _ = affine_after_matmul(g.read_matmul(matmul)[0], None, scale, np.zeros(features))
        shapes = tuple(c for c in g.consumers(matmul.outputs[0]) if c.op == "Shape" and len(c.outputs) == 1)
        return ReshapedBnMatch(matmul, reshape, node, weight, shift, w.dtype, shapes)

    def _match_conv(self, g, bn, reshape, conv):
        scale, shift = g.read_batchnorm(bn)
        k = _split_channels(reshape, conv.outputs[0], len(scale))
        if not k:
            return None
        p = g.read_conv(conv)
        folded = affine_after_conv(p, np.repeat(scale, k), np.repeat(shift, k))
        return SplitChannelsBnMatch(conv, reshape, bn, folded, p.weight.dtype)

    def rewrite(self, ctx: Context, m) -> Rewrite:
        g = ctx.graph
        if isinstance(m, SplitChannelsBnMatch):
            z = g.variable(f"{m.conv.name}.out", m.conv.outputs[0])
            created = [g.write_conv(m.conv.name, m.params, m.conv.inputs[0], z, m.dtype),
                       g.add_node("Reshape", m.reshape.name, [z, *m.reshape.inputs[1:]], [m.bn.outputs[0]],
                                  dict(m.reshape.attrs))]
            return Rewrite(self.name, m.bn.name, tuple(n.name for n in m.removes), tuple(n.name for n in created),
                           "Conv -> Reshape splitting its channels -> BN")
        base = m.matmul.name
        z = g.variable(f"{base}.out", m.matmul.outputs[0])
        created = [g.add_node("MatMul", base, [m.matmul.inputs[0], g.constant(f"{base}.weight", m.weight, m.dtype)], [z])]
        created += [g.add_node("Shape", n.name, [z], [n.outputs[0]], dict(n.attrs)) for n in m.shapes]
        if np.any(m.shift != 0):
            biased = g.variable(f"{base}.biased", m.matmul.outputs[0])
            created.append(g.add_node("Add", f"{base}.bias", [z, g.constant(f"{base}.bias", m.shift, m.dtype)], [biased]))
            z = biased
        created.append(g.add_node(m.reshape.op, m.reshape.name, [z, *m.reshape.inputs[1:]], [m.bn.outputs[0]],
                                  dict(m.reshape.attrs)))
        return Rewrite(self.name, m.bn.name, tuple(n.name for n in m.removes), tuple(n.name for n in created),
                       f"MatMul -> {m.reshape.op} -> BN")
