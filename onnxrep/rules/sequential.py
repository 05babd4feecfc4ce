"""compose_sequential_convs: two linear layers in a row (Conv/AveragePool -> Conv/AveragePool)
become one Conv when that is exact and not more expensive.

Before:  x -> Conv1 (W1, b1, s1, P1) -> Conv2 (W2, b2, s2, P2) -> y      (nothing in between)
After:   x -> Conv (W, b) -> y

* KxK then LxL with no padding on conv2 (includes every 1x1 conv2): always exact. Composite
  kernel (E2-1)*s1 + E1 wide, stride s1*s2, conv1's pads,
  W[o,i,l*s1+k] += sum_m W2[o,m,l] W1[m,i,k],  b = b2 + sum_{m,l} W2[o,m,l] b1[m].
* 1x1 (stride 1) then a padded KxK: exact only when b1 == 0 (zero padding commutes with a
  bias-free 1x1); the composite has conv2's geometry with pads P1 + P2. A non-zero b1 would
  make the border wrong, so the rule declines (a border padded with b1 is first moved into
  conv1 by fold_border_pad_into_conv, which makes conv2 unpadded).
* AveragePool is the depthwise conv with taps 1/k^2 (exact with zero pads or
  count_include_pad=1), so DBB's 1x1 -> AvgPool branch composes too. (docs/rules.md §6, §7)

Cost (FLOPs as onnxrep.stats counts them, onnxrep.cost): composing a 1x1 with a
depthwise KxK (BSConv-U) or two 1x1s through a thin middle (BSConv-S) multiplies FLOPs. Such a composition is declined unless ``allow_growth``, or unless
the result is absorbed: it feeds (through per-channel affine ops) an Add whose other branch on
the same input already reads a window that covers it, so merge_parallel_add makes it free.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import Decline
from ..graph import producer
from ..kernels import ConvParams, dims_str
from ..passes import Context, Match, Rewrite, Rule
from ..cost import layer_output_flops
from ..patterns import LINEAR, judge_composition


@dataclass
class SequentialMatch(Match):
    first: object
    second: object
    fused: ConvParams
    dtype: object
    note: str
    x: object
    y: object
    flops: tuple  # (before, after) predicted with onnxrep.cost

    @property
    def removes(self):
        return [self.first, self.second]

    @property
    def keeps(self):
        return [self.y]


class ComposeSequentialConvs(Rule):
    name = "compose_sequential_convs"
    ops = LINEAR
    summary = "Conv/AveragePool -> Conv/AveragePool with nothing between -> one Conv (when exact)"

    def match(self, ctx: Context, node):
        g = ctx.graph
        first = producer(node.inputs[0])
        if first is None or first.op not in LINEAR or "Conv" not in (first.op, node.op):
            return None
        if g.escapes([first, node], keep=node.outputs):
            return None  # conv1's output is used elsewhere: nothing to remove
        p1, p2 = g.read_linear(first), g.read_linear(node)
        before = layer_output_flops(p1, first.outputs[0], first.op, g) + layer_output_flops(p2, node.outputs[0], node.op, g)
        try:
            fused, note = judge_composition(ctx, p1, p2, node.outputs[0], first.inputs[0], before)
        except Decline as exc:
            raise Decline(f"'{first.name}' -> '{node.name}': {exc}") from None
        conv = first if first.op == "Conv" else node
        after = layer_output_flops(fused, node.outputs[0], "Conv", g)
        return SequentialMatch(first, node, fused, conv.inputs[1].values.dtype, note, first.inputs[0], node.outputs[0],
                               (before, after))

    def rewrite(self, ctx: Context, m: SequentialMatch) -> Rewrite:
        new = ctx.graph.write_conv(m.second.name, m.fused, m.x, m.y, m.dtype)
        return Rewrite(self.name, m.second.name, (m.first.name, m.second.name), (new.name,),
                       f"{m.first.op} -> {m.second.op} = conv{dims_str(m.fused.kernel_shape)}{m.note}", flops=m.flops)
