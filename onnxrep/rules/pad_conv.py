"""fold_pad_into_conv: a constant-zero border on the spatial axes before Conv becomes the Conv's own pads.

Before:  x -> Pad(pads=[0,0,t,l, 0,0,b,r], value 0) -> Conv(pads=P) -> y
After:   x -> Conv(pads=P + (t, l, b, r)) -> y
(likewise per axis for 1-D and 3-D convs: the Pad's spatial begins and ends add to the Conv's)

Zero padding followed by a conv that reads zeros outside its input is the same as the conv
padding by that much more (docs/rules.md §8). The border may also be written as Concats of
zero slabs on H and W (``RepGraph.read_border``). Every consumer of the padded tensor must be
such a Conv; a negative pad (crop), a non-zero value or a non-constant mode declines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np

from ..errors import Decline
from ..kernels import ConvParams, pad_into_conv
from ..passes import Context, Match, Rewrite, Rule


@dataclass
class PadMatch(Match):
    pad: object
    x: object
    convs: List[object]
    params: List[ConvParams]  # each conv with the pads added
    spatial: tuple  # spatial begins, then ends: (top, left, bottom, right) in 2-D
    border: tuple = ()  # every node that writes the border (the Pad, or Concats and their slabs)

    @property
    def removes(self):
        return [*(self.border or (self.pad,)), *self.convs]

    @property
    def keeps(self):
        return [c.outputs[0] for c in self.convs]


class FoldPadIntoConv(Rule):
    name = "fold_pad_into_conv"
    ops = ("Pad", "Concat")
    summary = "constant-zero border (Pad, or Concat of zero slabs) on the spatial axes before Conv -> Conv pads"

    def match(self, ctx: Context, node):
        g = ctx.graph
        out = node.outputs[0]
        if not out.outputs or g.is_graph_output(out):
            return None
        if any(c.op != "Conv" or c.inputs[0] is not out for c in out.outputs):
            return None
        if node.op == "Concat" and int(node.attrs.get("axis", 1)) not in (2, 3, -1, -2):
            return None
        spec = g.read_border(node)
        if np.any(spec.values != 0.0):
            shown = f"{spec.values[0]:g}" if spec.values.size == 1 else "non-zero values"
            raise Decline(f"{node.op} '{node.name}' pads with {shown}, not 0")
        convs = list(out.outputs)
        params = [pad_into_conv(g.read_conv(conv), *spec.pads) for conv in convs]
        return PadMatch(node, spec.x, convs, params, spec.pads, spec.nodes)

    def rewrite(self, ctx: Context, m: PadMatch) -> Rewrite:
        g = ctx.graph
        created = [g.repad_conv(conv, p.pads, m.x, conv.outputs[0]).name for conv, p in zip(m.convs, m.params)]
        return Rewrite(self.name, m.pad.name, tuple(n.name for n in m.removes), tuple(created),
                       f"pads {m.spatial} moved into {len(m.convs)} Conv")
