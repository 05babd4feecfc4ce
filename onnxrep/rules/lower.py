"""lower_channel_affine_conv: a 1x1 Conv that only scales and shifts each channel -> Mul / Add.

Before:  x -> Conv(W [C, 1, 1, 1], b, group=C)          (or any 1x1 Conv whose C x C matrix is diagonal)
After:   x -> Mul(s [C, 1, 1]) -> Add(b [C, 1, 1])       (Mul left out where s = 1, Add where b = 0)

y[c] = x[c] * W[c] + b[c] either way (kernels.channel_affine_of; docs/rules.md §12). Such convs are
what branch algebra leaves of a block that has no spatial or cross-channel mixing: RIFormer's
token mixer (conv1x1_dw(t) - t after the norm's affine) is one per block. The packages' own deploy
forms keep them as Mul/Add, and onnxruntime runs the elementwise pair faster than a grouped conv
on large maps (1.6x on 64x56x56, single thread; about even from 14x14 down): a depthwise 1x1
Conv is C tiny GEMMs. Stride, pads or a window larger than 1x1 decline by not matching.

A final rule: it runs once, after every other rule has converged, since the affine folds would
otherwise fold the Mul/Add back into a neighbouring layer, where they had already declined.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import Decline
from ..kernels import channel_affine_of
from ..passes import Context, Match, Rewrite, Rule


@dataclass
class LowerMatch(Match):
    conv: object
    x: object
    y: object
    scale: np.ndarray
    shift: np.ndarray
    dtype: object
    spatial: int  # spatial axes of the conv

    @property
    def removes(self):
        return [self.conv]

    @property
    def keeps(self):
        return [self.y]


class LowerChannelAffineConv(Rule):
    name = "lower_channel_affine_conv"
    ops = ("Conv",)
    summary = "1x1 Conv that only scales and shifts each channel (depthwise 1x1) -> Mul/Add (final)"
    final = True

    def match(self, ctx: Context, node):
        p = ctx.graph.read_conv(node)
        affine = channel_affine_of(p)
        if affine is None:
            return None
        scale, shift = affine
        if not np.all(np.isfinite(scale)) or not np.all(np.isfinite(shift)):
            raise Decline("the conv's weights are not finite")
        return LowerMatch(node, node.inputs[0], node.outputs[0], scale, shift, p.weight.dtype, p.ndim)

    def rewrite(self, ctx: Context, m: LowerMatch) -> Rewrite:
        g = ctx.graph
        base = m.conv.name
        per_channel = (len(m.scale),) + (1,) * m.spatial
        steps = []
        if np.any(m.scale != 1):
            steps.append(("Mul", "scale", m.scale))
        if np.any(m.shift != 0):
            steps.append(("Add", "shift", m.shift))
        created = []
        if not steps:
            created.append(g.add_node("Identity", base, [m.x], [m.y]))
        t = m.x
        for i, (op, what, values) in enumerate(steps):
            out = m.y if i == len(steps) - 1 else g.variable(f"{base}.{what}", m.x)
            const = g.constant(f"{base}.{what}", np.asarray(values).reshape(per_channel), m.dtype)
            created.append(g.add_node(op, f"{base}.{what}", [t, const], [out]))
            t = out
        return Rewrite(self.name, base, (base,), tuple(n.name for n in created),
                       f"1x1 Conv of {len(m.scale)} channels -> {' + '.join(op for op, _, _ in steps) or 'Identity'}")
