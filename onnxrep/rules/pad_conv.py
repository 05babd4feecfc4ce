"""fold_pad_into_conv: a constant-zero Pad on H/W before Conv becomes the Conv's own pads.

Before:  x -> Pad(pads=[0,0,t,l, 0,0,b,r], value 0) -> Conv(pads=P) -> y
After:   x -> Conv(pads=P + (t, l, b, r)) -> y

Zero padding followed by a conv that reads zeros outside its input is the same as the conv
padding by that much more (DESIGN 3.8). Every consumer of the padded tensor must be such a
Conv; a negative pad (crop), a non-zero value or a non-constant mode declines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np

from ..graph import const_value, str_attr
from ..kernels import pad_into_conv
from ..passes import Context, Rewrite, Rule


@dataclass
class PadMatch:
    pad: object
    convs: List[object]
    spatial: tuple  # (top, left, bottom, right)


def _pads_of(node):
    """(pads, value) of a Pad node for any opset, or a reason string."""
    mode = str_attr(node.attrs, "mode", "constant")
    if mode != "constant":
        return f"Pad '{node.name}' uses mode {mode!r}"
    if "pads" in node.attrs:  # opset < 11
        return list(node.attrs["pads"]), float(node.attrs.get("value", 0.0))
    pads = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if pads is None:
        return f"Pad '{node.name}' pads are not constant"
    value = 0.0
    if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
        v = const_value(node.inputs[2])
        if v is None:
            return f"Pad '{node.name}' constant_value is not constant"
        value = float(np.asarray(v).reshape(-1)[0]) if np.asarray(v).size else 0.0
    pads = [int(p) for p in pads.reshape(-1)]
    if len(node.inputs) > 3 and node.inputs[3] is not None and node.inputs[3].name:
        axes = const_value(node.inputs[3])
        if axes is None:
            return f"Pad '{node.name}' axes are not constant"
        rank = 4
        full = [0] * (2 * rank)
        axes = [int(a) % rank for a in axes.reshape(-1)]
        for i, a in enumerate(axes):
            full[a], full[a + rank] = pads[i], pads[i + len(axes)]
        pads = full
    return pads, value


class FoldPadIntoConv(Rule):
    name = "fold_pad_into_conv"
    ops = ("Pad",)
    summary = "constant-zero Pad on H/W before Conv -> Conv pads"

    def match(self, ctx: Context, node):
        g = ctx.graph
        out = node.outputs[0]
        if not out.outputs or g.is_graph_output(out):
            return None
        if any(c.op != "Conv" or c.inputs[0] is not out for c in out.outputs):
            return None
        got = _pads_of(node)
        if isinstance(got, str):
            return got
        pads, value = got
        if len(pads) != 8:
            return f"Pad '{node.name}' is not on a 4-D tensor"
        if value != 0.0:
            return f"Pad '{node.name}' pads with {value}, not 0"
        if any(pads[i] for i in (0, 1, 4, 5)):
            return f"Pad '{node.name}' pads the batch or channel axis"
        spatial = (pads[2], pads[3], pads[6], pads[7])
        if min(spatial) < 0:
            return f"Pad '{node.name}' crops (negative pads)"
        for conv in out.outputs:
            p = g.read_conv(conv)
            if isinstance(p, str):
                return p
        return PadMatch(node, list(out.outputs), spatial)

    def rewrite(self, ctx: Context, m: PadMatch) -> Rewrite:
        g = ctx.graph
        x = m.pad.inputs[0]
        created = []
        for conv in m.convs:
            p = pad_into_conv(g.read_conv(conv), *m.spatial)
            new = g.repad_conv(conv, p.pads, x, conv.outputs[0])
            created.append(new.name)
        g.remove([m.pad, *m.convs])
        return Rewrite(self.name, m.pad.name, (m.pad.name, *(c.name for c in m.convs)), tuple(created),
                       f"pads {m.spatial} moved into {len(m.convs)} Conv")
