"""collapse_affine_region: any region of ops affine in one activation -> one Conv (DESIGN 3.10).

Before:  x -> [Conv, BN, Pad, ScatterND border writes, Slice, Transpose, AvgPool, Add, Mul by
               constants, Concat, ... however the exporter spelled them] -> y
After:   x -> Conv(W, b) -> y

A fallback for exporter spellings no rule anticipates (DBB's border writes as ScatterND under
a dynamic batch, TorchScript's Shape/Where/Expand masses, ...). It runs only after the other
rules reach their fixpoint. From each region sink it grows backwards over ops that are affine
in their value inputs (weights, indices and pads must be constant or computed from shapes
only) while every intermediate stays inside the region, and needs exactly one activation input
x with static C, H, W. The region is cut out as a sub-model and run in onnxruntime:

* the zero input gives the bias, which must be constant over space;
* an impulse per input channel and stride residue gives the kernel taps
  (kernels.kernel_from_impulses);
* the recovered conv is accepted only if two random full-resolution inputs give the region's
  output within 2e-5 of its magnitude, and only if it costs no more FLOPs than the region.

Anything non-affine (Relu, x*x), a spatially varying bias, a non-translation-equivariant map or
a dearer result declines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Set

import math

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import channels_of, const_value, producer, spatial_hw, static_shape, str_attr
from ..kernels import ConvParams, Decline, impulse_positions, kernel_from_impulses, layer_flops
from ..passes import Context, Rewrite, Rule
from ..probe import Submodel, toposort
from ..stats import elementwise_flops

ALL = None  # every input may carry the activation
#: op -> input positions that may depend on the activation (others: constants or shape-derived)
AFFINE_INPUTS: Dict[str, Optional[Set[int]]] = {
    "Conv": {0}, "BatchNormalization": {0}, "AveragePool": {0}, "Identity": {0}, "Neg": {0},
    "Add": ALL, "Sub": ALL, "Concat": ALL, "Mul": ALL, "Div": {0},
    "Pad": {0}, "Slice": {0}, "ScatterND": {0, 2}, "Transpose": {0}, "Expand": {0}, "Reshape": {0},
    "Squeeze": {0}, "Unsqueeze": {0}, "Where": {1, 2}, "Gather": {0}, "Split": {0},
}
MAX_REGION = 400
CHECK_RTOL = 2e-5
IMPULSE = 1024.0


class _Kinds:
    """Classifies tensors: 'const', 'shape' (depends on activations only through Shape) or 'value'."""

    def __init__(self):
        self.memo: Dict[str, str] = {}

    def __call__(self, t) -> str:
        stack = [t]
        while stack:
            cur = stack[-1]
            if cur.name in self.memo:
                stack.pop()
                continue
            if isinstance(cur, gs.Constant):
                self.memo[cur.name] = "const"
                stack.pop()
                continue
            node = producer(cur)
            if node is None:
                self.memo[cur.name] = "value"
                stack.pop()
                continue
            if node.op in ("Shape", "Size"):
                self.memo[cur.name] = "shape"
                stack.pop()
                continue
            pending = [i for i in node.inputs if i.name and i.name not in self.memo]
            if pending:
                stack.extend(pending)
                continue
            kinds = {self.memo[i.name] for i in node.inputs if i.name}
            self.memo[cur.name] = "value" if "value" in kinds else ("shape" if "shape" in kinds else "const")
            stack.pop()
        return self.memo[t.name]


@dataclass
class RegionMatch:
    anchor: object
    nodes: List[object]
    x: object
    fused: ConvParams
    region_flops: int
    fused_flops: int


class CollapseAffineRegion(Rule):
    name = "collapse_affine_region"
    ops = tuple(AFFINE_INPUTS)
    summary = "fallback: any region affine in one input -> one Conv, recovered by impulse probes"
    late = True

    def match(self, ctx: Context, node):
        g = ctx.graph
        # One classification for the whole run: rewrites keep every surviving tensor's kind and
        # never reuse a name, and a fresh one per match would re-walk the graph to its inputs.
        kinds = ctx.memo.setdefault("tensor_kinds", _Kinds())
        if len(node.outputs) != 1 or kinds(node.outputs[0]) != "value" or not _affine_node(node, kinds):
            return None
        y = node.outputs[0]
        consumer = g.sole_consumer(y)
        if consumer is not None and _affine_node(consumer, kinds):
            return None  # not a sink: the region grows through the consumer
        hw_out = spatial_hw(y)
        if hw_out is None:
            return None
        nodes = _grow(g, node, kinds)
        inputs = _inputs(nodes, kinds)
        if len(inputs) > 1:
            # Grown through a residual into the previous block: the block itself starts at the
            # tensor its branches fan out from (FastViT's RepMixer: x + s * (mixer(x) - norm(x))).
            nodes = _grow(g, node, kinds, stop_at_fanout=True)
            inputs = _inputs(nodes, kinds)
        layers = sum(n.op in ("Conv", "AveragePool") for n in nodes)
        if layers == 0:
            return None  # elementwise and data movement only: no conv is cheaper than that
        if _one_layer_and_constants(nodes, kinds):
            return None  # e.g. GELU's trailing "* 0.5" before a conv: folding it would save one
            # elementwise op and cost the runtime its activation fusion
        key = (self.name, node.name, tuple(sorted(n.name for n in nodes)))
        if key in ctx.memo:  # probed before and declined; the region has not changed since
            return ctx.memo[key]
        result = self._check(ctx, node, nodes, inputs, kinds)
        if isinstance(result, str):
            ctx.memo[key] = result
        return result

    def _check(self, ctx, anchor, nodes, inputs, kinds):
        g = ctx.graph
        if len(inputs) != 1:
            return f"region of {len(nodes)} nodes ending at '{anchor.name}' reads {len(inputs)} activations"
        x, y = inputs[0], anchor.outputs[0]
        hw_in, c_in, c_out = spatial_hw(x), channels_of(x), channels_of(y)
        if hw_in is None or c_in is None or c_out is None:
            return f"region ending at '{anchor.name}': input or output is not NCHW with static C, H, W"
        if not np.issubdtype(np.dtype(y.dtype), np.floating) or np.dtype(y.dtype) != np.float32:
            return f"region ending at '{anchor.name}': only float32 regions are probed"
        strides = _strides(g, nodes, x, y)
        if strides is None:
            return f"region ending at '{anchor.name}': branches with different strides"
        region_flops = sum(_node_flops(g, n) for n in nodes)
        hw_out = spatial_hw(y)
        expected = _expected_flops(g, nodes, x, y, c_in, c_out)
        if expected > region_flops and not ctx.allow_growth:  # decided before any probing
            return (f"region of {len(nodes)} nodes ending at '{anchor.name}': one conv would cost about "
                    f"{expected} FLOPs, the region {region_flops}")
        try:
            sub = Submodel(g.graph, nodes, x, y, kinds)
            fused = _recover(sub, c_in, hw_in, strides, c_out)
        except Decline as exc:
            return f"region of {len(nodes)} nodes ending at '{anchor.name}': {exc}"
        fused_flops = layer_flops(fused, hw_out)
        if fused_flops > region_flops and not ctx.allow_growth:
            return (f"region of {len(nodes)} nodes ending at '{anchor.name}': one conv would cost "
                    f"{fused_flops} FLOPs, the region {region_flops}")
        return RegionMatch(anchor, nodes, x, fused, region_flops, fused_flops)

    def rewrite(self, ctx: Context, m: RegionMatch) -> Rewrite:
        g = ctx.graph
        y = m.anchor.outputs[0]
        g.remove(m.nodes + _dead_with(m.nodes, y))
        new = g.write_conv(f"{m.anchor.name}.conv", m.fused, m.x, y, np.float32)
        kh, kw = m.fused.kernel_shape
        ops = sorted({n.op for n in m.nodes})
        return Rewrite(self.name, m.anchor.name, tuple(n.name for n in m.nodes), (new.name,),
                       f"{len(m.nodes)} nodes ({', '.join(ops)}) -> conv{kh}x{kw} group {m.fused.group}, "
                       f"FLOPs {m.region_flops} -> {m.fused_flops}")


def _affine_node(node, kinds) -> bool:
    allowed = AFFINE_INPUTS.get(node.op, False)
    if allowed is False:
        return False
    values = [i for i, t in enumerate(node.inputs) if t.name and kinds(t) == "value"]
    if not values:
        return False  # shape or constant computation, not part of the activation path
    if node.op == "Mul" and len(values) > 1:
        return False  # x * x is not affine
    if allowed is not ALL and not set(values) <= allowed:
        return False
    if node.op == "Conv" and (const_value(node.inputs[1]) is None):
        return False
    if node.op == "BatchNormalization" and int(node.attrs.get("training_mode", 0)):
        return False
    if node.op == "Pad" and str_attr(node.attrs, "mode", "constant") != "constant":
        return False
    return True


def _one_layer_and_constants(nodes, kinds) -> bool:
    """One Conv/AveragePool, every other node an elementwise op with a constant operand."""
    layers = [n for n in nodes if n.op in ("Conv", "AveragePool")]
    rest = [n for n in nodes if n.op not in ("Conv", "AveragePool")]
    return len(layers) == 1 and all(
        n.op in ("Mul", "Div", "Add", "Sub") and any(kinds(t) != "value" for t in n.inputs) for n in rest
    )


def _inputs(nodes, kinds) -> List[object]:
    """The activations a region reads (value tensors not produced inside it)."""
    inside = {id(n) for n in nodes}
    found = {t.name: t for n in nodes for t in n.inputs
             if t.name and kinds(t) == "value" and not any(id(p) in inside for p in t.inputs)}
    return list(found.values())


def _grow(g, anchor, kinds, stop_at_fanout: bool = False) -> List[object]:
    """The region ending at ``anchor``: affine producers added while all their consumers are
    inside (``stop_at_fanout``: also never through a tensor read by several nodes)."""
    region = [anchor]
    inside = {id(anchor)}
    changed = True
    while changed and len(region) < MAX_REGION:
        changed = False
        for node in list(region):
            for t in node.inputs:
                p = producer(t) if t.name else None
                if p is None or id(p) in inside or kinds(t) != "value" or not _affine_node(p, kinds):
                    continue
                if stop_at_fanout and len(t.outputs) > 1:
                    continue
                if any(g.is_graph_output(o) or not all(_feeds_only(g, c, inside) for c in o.outputs) for o in p.outputs):
                    continue
                region.append(p)
                inside.add(id(p))
                changed = True
    return region


def _feeds_only(g, node, inside, budget: int = 64) -> bool:
    """Whether ``node`` is in the region, or everything it computes ends up only in the region.

    Exporters read activations through Shape (and Slice -> Shape) to build indices for border
    writes; such readers die with the region and must not stop it from growing.
    """
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if id(n) in inside or id(n) in seen:
            continue
        seen.add(id(n))
        if len(seen) > budget or not n.outputs:
            return False
        for o in n.outputs:
            if g.is_graph_output(o):
                return False
            stack.extend(o.outputs)
    return True


def _dead_with(region, y) -> List[object]:
    """Nodes outside the region that read its intermediates (only to feed it, see _feeds_only)."""
    inside = {id(n) for n in region}
    dead, stack = [], [c for n in region for o in n.outputs if o is not y for c in o.outputs if id(c) not in inside]
    seen = set()
    while stack:
        n = stack.pop()
        if id(n) in inside or id(n) in seen:
            continue
        seen.add(id(n))
        dead.append(n)
        stack.extend(c for o in n.outputs for c in o.outputs)
    return dead


def _expected_flops(g, nodes, x, y, c_in: int, c_out: int) -> int:
    """What the fused conv will cost, from the region's layers alone (no probing).

    Receptive fields compose along every path (extent + (k - 1) * stride so far); the fused
    conv is dense when any layer mixes channels. Exact for real re-parameterizable blocks;
    it could only overestimate a region whose taps cancel.
    """
    field = {x.name: (1, 1, 1, 1, False)}  # extent h, w, stride h, w, channels mixed
    for node in toposort(nodes):
        ins = [field[t.name] for t in node.inputs if t.name in field]
        if not ins:
            continue
        eh, ew = max(f[0] for f in ins), max(f[1] for f in ins)
        sh, sw = max(f[2] for f in ins), max(f[3] for f in ins)
        mixed = any(f[4] for f in ins)
        if node.op == "Transpose":
            eh = ew = max(eh, ew)
            sh = sw = max(sh, sw)
        elif node.op in ("Conv", "AveragePool"):
            p = g.read_linear(node)
            if not isinstance(p, str):
                (kh, kw), (s1, s2) = p.extent, p.strides
                eh, ew = eh + (kh - 1) * sh, ew + (kw - 1) * sw
                sh, sw = sh * s1, sw * s2
                mixed = mixed or (node.op == "Conv" and p.weight.shape[1] > 1)
        for o in node.outputs:
            field[o.name] = (eh, ew, sh, sw, mixed)
    eh, ew, _, _, mixed = field.get(y.name, (1, 1, 1, 1, False))
    ho, wo = spatial_hw(y)
    per_output = c_in if mixed else max(1, c_in // math.gcd(c_in, c_out))
    return 2 * c_out * per_output * eh * ew * ho * wo


def _strides(g, nodes, x, y):
    """The accumulated stride from x to y (every path must agree), or None."""
    order = toposort(nodes)
    stride = {x.name: (1, 1)}
    for node in order:
        ins = [stride[t.name] for t in node.inputs if t.name in stride]
        if not ins or any(s != ins[0] for s in ins):
            if ins:
                return None
            continue
        s = ins[0]
        if node.op in ("Conv", "AveragePool"):
            k = tuple(int(v) for v in node.attrs.get("strides", (1, 1)))
            s = (s[0] * k[0], s[1] * k[1])
        for o in node.outputs:
            stride[o.name] = s
    return stride.get(y.name)


def _recover(sub, c_in: int, hw, strides, c_out: int) -> ConvParams:
    positions = impulse_positions(hw, strides)
    n = c_in * len(positions)
    probes = np.zeros((n + 1, c_in) + tuple(hw), np.float32)
    for i in range(c_in):
        for r, (ph, pw) in enumerate(positions):
            probes[i * len(positions) + r, i, ph, pw] = IMPULSE
    out = sub.run(probes).astype(np.float64)
    zero = out[-1]
    # A large impulse keeps the taps far above the rounding noise of the region's constants
    # (e.g. pad(y - v) + v); dividing by a power of two is exact.
    responses = zero + (out[:-1] - zero) / IMPULSE
    responses = responses.reshape((c_in, len(positions)) + out.shape[1:])
    fused = kernel_from_impulses(responses, zero, positions, strides, hw)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, c_in) + tuple(hw)).astype(np.float32)
    want = sub.run(x).astype(np.float64)
    got = sub.run_conv(x, fused).astype(np.float64)
    if got.shape != want.shape:
        raise Decline(f"the recovered conv gives shape {got.shape}, the region {want.shape}")
    err = float(np.max(np.abs(got - want)))
    if err > CHECK_RTOL * max(float(np.max(np.abs(want))), 1e-12):
        raise Decline(f"no conv reproduces it (error {err:.2e} on random input: not affine or not translation-equivariant)")
    return fused


def _node_flops(g, node) -> int:
    """FLOPs of one region node, counted as onnxrep.stats counts them."""
    if node.op in ("Conv", "AveragePool"):
        p = g.read_linear(node)
        hw = spatial_hw(node.outputs[0])
        if not isinstance(p, str) and hw is not None:
            return layer_flops(p, hw, pool=node.op == "AveragePool")
    shape = static_shape(node.outputs[0])
    if shape and all(isinstance(d, int) for d in shape[1:]):
        return elementwise_flops(node.op, int(np.prod(shape[1:])))
    return 0
