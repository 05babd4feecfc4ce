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
  count_include_pad=1), so DBB's 1x1 -> AvgPool branch composes too. (DESIGN 3.6, 3.7)

Cost (FLOPs as onnxrep.stats counts them, kernels.layer_flops): composing a 1x1 with a
depthwise KxK (BSConv-U) or two 1x1s through a thin middle (BSConv-S) multiplies FLOPs. Such a composition is declined unless ``allow_growth``, or unless
the result is absorbed: it feeds (through per-channel affine ops) an Add whose other branch on
the same input already reads a window that covers it, so merge_parallel_add makes it free.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..graph import producer, spatial_hw
from ..kernels import ConvParams, Decline, compose_sequential, layer_flops
from ..passes import Context, Rewrite, Rule
from .parallel_add import covered_by_sibling

LINEAR = ("Conv", "AveragePool")


@dataclass
class SequentialMatch:
    first: object
    second: object
    fused: ConvParams
    dtype: object
    note: str


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
        for p in (p1, p2):
            if isinstance(p, str):
                return p
        before = _flops(p1, first.outputs[0], first.op) + _flops(p2, node.outputs[0], node.op)
        verdict = judge_composition(ctx, p1, p2, node.outputs[0], first.inputs[0], before)
        if isinstance(verdict, str):
            return f"'{first.name}' -> '{node.name}': {verdict}"
        fused, note = verdict
        conv = first if first.op == "Conv" else node
        return SequentialMatch(first, node, fused, conv.inputs[1].values.dtype, note)

    def rewrite(self, ctx: Context, m: SequentialMatch) -> Rewrite:
        g = ctx.graph
        new = g.write_conv(m.second.name, m.fused, m.first.inputs[0], m.second.outputs[0], m.dtype)
        g.remove([m.first, m.second])
        kh, kw = m.fused.kernel_shape
        return Rewrite(self.name, m.second.name, (m.first.name, m.second.name), (new.name,),
                       f"{m.first.op} -> {m.second.op} = conv{kh}x{kw}{m.note}")


def judge_composition(ctx: Context, p1: ConvParams, p2: ConvParams, out, x, before: int):
    """(fused, note) when conv2(conv1(x)) -> ``out`` composes exactly without costing more
    FLOPs than ``before`` (or the growth is absorbed by a parallel branch), else the reason."""
    # The composite can be large (a dense KxK from a depthwise one): rule out growth from its
    # shape alone before building it, unless a parallel branch might absorb it.
    predicted = _predicted_flops(p1, p2, out)
    if predicted > before and not ctx.allow_growth and not covered_by_sibling(ctx.graph, out, x, None):
        return f"composing would raise FLOPs from {before} to about {predicted} (--allow-growth allows it)"
    try:
        fused = compose_sequential(p1, p2)
    except Decline as exc:
        return str(exc)
    after = _flops(fused, out, "Conv")
    if after <= before or ctx.allow_growth:
        return fused, ""
    if covered_by_sibling(ctx.graph, out, x, fused):
        return fused, " (absorbed by a parallel branch)"
    return f"composing would raise FLOPs from {before} to {after} (--allow-growth allows it)"


def _predicted_flops(p1: ConvParams, p2: ConvParams, out) -> int:
    """FLOPs of compose_sequential(p1, p2) from the shapes alone (an upper bound: regrouping
    can only make it cheaper)."""
    group = p1.group if p1.group == p2.group else 1
    if any(p2.pads):
        kh, kw = p2.kernel_shape
    else:
        (e1h, e1w), (l2h, l2w) = p1.extent, p2.kernel_shape
        kh = (l2h - 1) * p2.dilations[0] * p1.strides[0] + e1h
        kw = (l2w - 1) * p2.dilations[1] * p1.strides[1] + e1w
    ho, wo = spatial_hw(out) or (1, 1)
    return 2 * p2.out_channels * (p1.in_channels // group) * kh * kw * ho * wo


def _flops(p: ConvParams, out, op: str) -> int:
    hw = spatial_hw(out)
    return layer_flops(p, hw if hw is not None else (1, 1), pool=op == "AveragePool")
