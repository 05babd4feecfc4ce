"""fold_pad_into_conv: a constant-zero Pad on the spatial axes before Conv becomes the Conv's own pads.

Before:  x -> Pad(pads=[0,0,t,l, 0,0,b,r], value 0) -> Conv(pads=P) -> y
After:   x -> Conv(pads=P + (t, l, b, r)) -> y
(likewise per axis for 1-D and 3-D convs: the Pad's spatial begins and ends add to the Conv's)

Zero padding followed by a conv that reads zeros outside its input is the same as the conv
padding by that much more (docs/rules.md §8). Every consumer of the padded tensor must be such a
Conv; a negative pad (crop), a non-zero value or a non-constant mode declines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

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

    @property
    def removes(self):
        return [self.pad, *self.convs]

    @property
    def keeps(self):
        return [c.outputs[0] for c in self.convs]


class FoldPadIntoConv(Rule):
    name = "fold_pad_into_conv"
    ops = ("Pad",)
    summary = "constant-zero Pad on the spatial axes before Conv -> Conv pads"

    def match(self, ctx: Context, node):
        g = ctx.graph
        out = node.outputs[0]
        if not out.outputs or g.is_graph_output(out):
            return None
        if any(c.op != "Conv" or c.inputs[0] is not out for c in out.outputs):
            return None
        spec = g.read_pad(node)
        if spec.value != 0.0:
            raise Decline(f"Pad '{node.name}' pads with {spec.value}, not 0")
        try:
            spatial = spec.spatial()
        except Decline as exc:
            raise Decline(f"Pad '{node.name}': {exc}") from None
        if min(spatial) < 0:
            raise Decline(f"Pad '{node.name}' crops (negative pads)")
        convs = list(out.outputs)
        params = [pad_into_conv(g.read_conv(conv), *spatial) for conv in convs]
        return PadMatch(node, node.inputs[0], convs, params, spatial)

    def rewrite(self, ctx: Context, m: PadMatch) -> Rewrite:
        g = ctx.graph
        created = [g.repad_conv(conv, p.pads, m.x, conv.outputs[0]).name for conv, p in zip(m.convs, m.params)]
        return Rewrite(self.name, m.pad.name, (m.pad.name, *(c.name for c in m.convs)), tuple(created),
                       f"pads {m.spatial} moved into {len(m.convs)} Conv")
