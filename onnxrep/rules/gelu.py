"""canonicalize_gelu: the dynamo exporter's GELU spelled the way onnxruntime fuses.

Before (torch.onnx.export dynamo=True):   y = x * (0.5 * (1 + erf(x / sqrt(2))))
After  (the TorchScript exporter's form): y = (x * (1 + erf(x / sqrt(2)))) * 0.5

Both are GELU. onnxruntime's GeluFusion recognizes only the second order of the multiplications,
so a dynamo export runs every GELU as five kernels instead of one (measured: fastvit_t8 1.39x,
repvit_m0_9 1.26x the deploy latency, BENCHMARKS.md). Multiplying by 0.5 is exact in binary
floating point, so the reassociation gives bit-identical results; ``x * (1/sqrt(2))`` is
written as ``x / sqrt(2)``, equal within one rounding. Constants are recognized within 1e-6.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..graph import const_value, is_float_dtype, producer
from ..passes import Context, Match, Rewrite, Rule

SQRT2 = math.sqrt(2.0)


@dataclass
class GeluMatch(Match):
    x: object
    y: object
    nodes: list  # outer Mul, Mul(0.5), Add(1), Erf, Div/Mul(x, 1/sqrt2)
    dtype: object

    @property
    def removes(self):
        return self.nodes

    @property
    def keeps(self):
        return [self.y]


def _scalar(t, value: float) -> bool:
    v = const_value(t)
    return v is not None and v.size == 1 and is_float_dtype(v.dtype) and abs(float(v.reshape(-1)[0]) - value) <= 1e-6 * abs(value)


def _other(node, t, value: float) -> Optional[object]:
    """The operand of a binary ``node`` that is not the scalar constant ``value`` (either order)."""
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if _scalar(b, value):
        return a
    if _scalar(a, value) and node.op in ("Mul", "Add"):
        return b
    return None


class CanonicalizeGelu(Rule):
    name = "canonicalize_gelu"
    ops = ("Mul",)
    summary = "dynamo's x * (0.5 * (1 + erf(x/sqrt2))) -> (x * (1 + erf(x/sqrt2))) * 0.5, which onnxruntime fuses"

    def match(self, ctx: Context, node):
        if len(node.inputs) != 2:
            return None
        for x, half_t in (node.inputs, node.inputs[::-1]):
            half = producer(half_t)
            if half is None or half.op != "Mul":
                continue
            s = _other(half, half_t, 0.5)
            add = producer(s) if s is not None else None
            if add is None or add.op != "Add":
                continue
            e = _other(add, s, 1.0)
            erf = producer(e) if e is not None else None
            if erf is None or erf.op != "Erf":
                continue
            scaled = producer(erf.inputs[0])
            if scaled is None or scaled.op not in ("Div", "Mul"):
                continue
            inner = _other(scaled, erf.inputs[0], SQRT2 if scaled.op == "Div" else 1.0 / SQRT2)
            if inner is not x or not is_float_dtype(x.dtype):
                continue
            return GeluMatch(x, node.outputs[0], [node, half, add, erf, scaled], np.dtype(x.dtype))
        return None

    def rewrite(self, ctx: Context, m: GeluMatch) -> Rewrite:
        g = ctx.graph
        base = m.nodes[0].name
        d = g.variable(f"{base}.div", m.x)
        e = g.variable(f"{base}.erf", m.x)
        s = g.variable(f"{base}.add", m.x)
        p = g.variable(f"{base}.mul", m.x)
        created = [
            g.add_node("Div", f"{base}.div", [m.x, g.constant(f"{base}.sqrt2", np.array(SQRT2), m.dtype)], [d]),
            g.add_node("Erf", f"{base}.erf", [d], [e]),
            g.add_node("Add", f"{base}.add", [e, g.constant(f"{base}.one", np.array(1.0), m.dtype)], [s]),
            g.add_node("Mul", f"{base}.mul", [m.x, s], [p]),
            g.add_node("Mul", f"{base}.half", [p, g.constant(f"{base}.half", np.array(0.5), m.dtype)], [m.y]),
        ]
        return Rewrite(self.name, base, tuple(n.name for n in m.nodes), tuple(n.name for n in created),
                       "GELU reassociated into the form onnxruntime fuses")
