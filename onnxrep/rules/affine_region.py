"""collapse_affine_region: any region of ops affine in one activation -> one Conv (docs/rules.md §10).

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

Whether an op is affine is decided from its semantics and attributes (:func:`_affine_node`),
never from what the probes happen to show: ScatterND/ScatterElements with a reduction (a clamp
or a product), Pad in reflect/edge mode, and any op that slices, gathers, concatenates,
transposes, squeezes or pads the batch axis are not part of a region. Anything non-affine
(Relu, x*x), a spatially varying bias, a non-translation-equivariant map or a dearer result
declines. Kernel taps are recovered per output channel against that channel's own scale, and
the random check compares per channel too, so a channel 1e6x smaller than another is exact.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import List

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import Decline
from ..graph import channels_of, const_value, is_float_dtype, producer, spatial_hw
from ..cost import conv_flops, elementwise_flops, graph_node_flops
from ..kernels import ConvParams, channel_errors, impulse_positions, kernel_from_impulses
from ..passes import Context, Match, Rewrite, Rule
from ..probe import Submodel
from ..patterns import JOINS
from ..regions import (AFFINE_INPUTS, TensorKinds, affine_node, batch_axis_kept, channel_by_channel, dead_with,
                       expected_flops, grow_region, receptive_field, region_inputs, region_strides,
                       set_aside_residuals)

CHECK_RTOL = 2e-5
IMPULSE = 1024.0


@dataclass
class RegionMatch(Match):
    anchor: object
    nodes: List[object]
    x: object
    fused: ConvParams
    region_flops: int
    fused_flops: int
    dead: List[object]  # shape readers of the region's intermediates that die with it
    residuals: List[tuple] = field(default_factory=list)  # (tensor, sign) added to the conv as they are

    @property
    def removes(self):
        return self.nodes + self.dead

    @property
    def keeps(self):
        return [self.anchor.outputs[0]]


class CollapseAffineRegion(Rule):
    name = "collapse_affine_region"
    ops = tuple(AFFINE_INPUTS)
    summary = "fallback: any region affine in one input -> one Conv, recovered by impulse probes"
    late = True

    def match(self, ctx: Context, node):
        g = ctx.graph
        # One classification for the whole run: rewrites keep every surviving tensor's kind and
        # never reuse a name, and a fresh one per match would re-walk the graph to its inputs.
        kinds = ctx.memo.setdefault("tensor_kinds", TensorKinds())
        if len(node.outputs) != 1 or kinds(node.outputs[0]) != "value" or not affine_node(node, kinds):
            return None
        y = node.outputs[0]
        consumer = g.sole_consumer(y)
        if consumer is not None and affine_node(consumer, kinds):
            return None  # not a sink: the region grows through the consumer
        hw_out = spatial_hw(y)
        if hw_out is None:
            return None
        nodes = grow_region(g, node, kinds)
        inputs = region_inputs(nodes, kinds)
        residuals = []
        if len(inputs) > 1:
            aside = set_aside_residuals(g, node, nodes, kinds)
            if aside is not None:
                # A residual or a shortcut of another tensor added at the end: the region is
                # the rest, its conv gets the residual added back (as merge_parallel_add does).
                nodes, _, residuals = aside
                inputs = [t for t in region_inputs(nodes, kinds) if all(t is not r for r, _ in residuals)]
            else:
                # Grown through a residual into the previous block: the block itself starts at the
                # tensor its branches fan out from (FastViT's RepMixer: x + s * (mixer(x) - norm(x))).
                nodes = grow_region(g, node, kinds, stop_at_fanout=True)
                inputs = region_inputs(nodes, kinds)
        nodes = without_scalar_head(nodes, kinds)
        inputs = [t for t in region_inputs(nodes, kinds) if all(t is not r for r, _ in residuals)]
        layers = sum(n.op in ("Conv", "AveragePool") for n in nodes)
        if layers == 0:
            return None  # elementwise and data movement only: no conv is cheaper than that
        if residuals and [n.op for n in nodes if n.op not in JOINS] == ["Conv"]:
            return None  # one conv plus residuals: already what the rewrite would write
        if one_layer_and_constants(nodes, kinds):
            return None  # e.g. GELU's trailing "* 0.5" before a conv: folding it would save one
            # elementwise op and cost the runtime its activation fusion
        key = (self.name, node.name, tuple(sorted(n.name for n in nodes)))
        if key in ctx.memo:  # probed before and declined; the region has not changed since
            raise Decline(ctx.memo[key])
        try:
            return self._check(ctx, node, nodes, inputs, kinds, residuals)
        except Decline as exc:
            ctx.memo[key] = str(exc)
            raise

    def _check(self, ctx, anchor, nodes, inputs, kinds, residuals):
        g = ctx.graph
        where = f"region of {len(nodes)} nodes ending at '{anchor.name}'"
        if len(inputs) != 1:
            raise Decline(f"{where} reads {len(inputs)} activations")
        x, y = inputs[0], anchor.outputs[0]
        hw_in, c_in, c_out = spatial_hw(x), channels_of(x), channels_of(y)
        if hw_in is None or c_in is None or c_out is None:
            raise Decline(f"{where}: input or output is not NCHW with static C, H, W")
        if not (is_float_dtype(y.dtype) and np.dtype(y.dtype) == np.float32 and np.dtype(x.dtype) == np.float32):
            raise Decline(f"{where}: only float32 regions are probed")
        reason = batch_axis_kept(nodes, x, y, [r for r, _ in residuals])
        if reason:
            raise Decline(f"{where}: {reason}")
        strides = region_strides(g, nodes, x, y)
        if strides is None:
            raise Decline(f"{where}: branches with different strides")
        region_flops = sum(graph_node_flops(g, n) for n in nodes)
        hw_out = spatial_hw(y)
        expected = expected_flops(g, nodes, x, y, c_in, c_out)
        if expected > region_flops and not ctx.allow_growth:  # decided before any probing
            raise Decline(f"{where}: one conv would cost about {expected} FLOPs, the region {region_flops}")
        # Probing is the expensive part, and locating a failing rewrite replays the rules: the
        # outcome is remembered by the region's content (it is deterministic in it).
        key = (self.name, region_content(nodes, x, y, residuals))
        outcome = ctx.shared.get(key)
        if outcome is None:
            try:
                sub = Submodel(g.graph, nodes, x, y, kinds, zeros=[r for r, _ in residuals])
                outcome = _recover(sub, c_in, hw_in, strides, c_out, receptive_field(g, nodes, x, y),
                                   channel_by_channel(g, nodes))
            except Decline as exc:
                outcome = str(exc)
            ctx.shared[key] = outcome
        if isinstance(outcome, str):
            raise Decline(f"{where}: {outcome}")
        fused = outcome
        fused_flops = conv_flops(fused, hw_out) + len(residuals) * elementwise_flops("Add", c_out * hw_out[0] * hw_out[1])
        if fused_flops > region_flops and not ctx.allow_growth:
            raise Decline(f"{where}: one conv would cost {fused_flops} FLOPs, the region {region_flops}")
        return RegionMatch(anchor, nodes, x, fused, region_flops, fused_flops, dead_with(nodes, y), residuals)

    def rewrite(self, ctx: Context, m: RegionMatch) -> Rewrite:
        g = ctx.graph
        y = m.anchor.outputs[0]
        acc = g.variable(f"{m.anchor.name}.conv", y) if m.residuals else y
        created = [g.write_conv(f"{m.anchor.name}.conv", m.fused, m.x, acc, np.float32).name]
        for i, (r, sign) in enumerate(m.residuals):
            out = y if i == len(m.residuals) - 1 else g.variable(f"{m.anchor.name}.sum", y)
            created.append(g.add_node("Add" if sign > 0 else "Sub", m.anchor.name, [acc, r], [out]).name)
            acc = out
        kh, kw = m.fused.kernel_shape
        ops = sorted({n.op for n in m.nodes})
        aside = f" + {len(m.residuals)} residual(s) set aside" if m.residuals else ""
        return Rewrite(self.name, m.anchor.name, tuple(n.name for n in m.nodes), tuple(created),
                       f"{len(m.nodes)} nodes ({', '.join(ops)}) -> conv{kh}x{kw} group {m.fused.group}{aside}",
                       flops=(m.region_flops, m.fused_flops))


def region_content(nodes, x, y, residuals) -> tuple:
    """Everything a region's probing outcome depends on: per node (in name order) its op,
    attributes and the names of what it reads and writes, every constant it reads by dtype,
    shape and a digest of its bytes, and the shapes of the input, the output and the residuals."""
    def value_key(v):
        if isinstance(v, gs.Tensor):
            v = v.values if isinstance(v, gs.Constant) else v.name
        if isinstance(v, np.ndarray):
            return ("array", str(v.dtype), v.shape, hashlib.blake2b(np.ascontiguousarray(v).tobytes(), digest_size=16).digest())
        if isinstance(v, gs.Graph):
            return ("graph", id(v))  # never equal across builds: such a region is probed again
        if isinstance(v, (list, tuple)):
            return tuple(value_key(e) for e in v)
        return repr(v)

    parts = []
    for n in sorted(nodes, key=lambda n: n.name):
        ins = tuple((t.name, value_key(t) if isinstance(t, gs.Constant) else None) for t in n.inputs)
        attrs = tuple(sorted((k, value_key(v)) for k, v in n.attrs.items()))
        parts.append((n.name, n.op, attrs, ins, tuple(t.name for t in n.outputs)))
    shapes = tuple((t.name, repr(t.shape), str(t.dtype)) for t in [x, y] + [r for r, _ in residuals])
    return tuple(parts), shapes, tuple(sign for _, sign in residuals)


def without_scalar_head(nodes, kinds) -> list:
    """The region without the Mul/Div/Add/Sub by a single constant that it starts with.

    Such an op at the region's input is usually the tail of an activation that runtimes fuse
    (GELU's "* 0.5", hard-swish's "/ 6"); folding it into the conv saves one elementwise op
    and costs the activation its fusion (fold_affine_into_next_layer leaves such ops alone for
    the same reason). It is left out only when no other node of the region reads its input, so
    the region still reads one activation."""
    nodes = list(nodes)
    while True:
        inside = {id(n) for n in nodes}
        head = None
        for n in nodes:
            if n.op not in ("Mul", "Div", "Add", "Sub") or len(n.inputs) != 2:
                continue
            values = [t for t in n.inputs if kinds(t) == "value"]
            scalars = [t for t in n.inputs if kinds(t) != "value" and _single_value(t)]
            if len(values) != 1 or len(scalars) != 1:
                continue
            x = values[0]
            if (producer(x) is not None and id(producer(x)) in inside) or any(
                    id(c) in inside and c is not n for c in x.outputs):
                continue
            head = n
            break
        if head is None or len(nodes) == 1:
            return nodes
        nodes = [n for n in nodes if n is not head]


def _single_value(t) -> bool:
    value = const_value(t)
    return value is not None and value.size == 1


def one_layer_and_constants(nodes, kinds) -> bool:
    """One Conv/AveragePool, every other node an elementwise op with a constant operand."""
    layers = [n for n in nodes if n.op in ("Conv", "AveragePool")]
    rest = [n for n in nodes if n.op not in ("Conv", "AveragePool")]
    return len(layers) == 1 and all(
        n.op in ("Mul", "Div", "Add", "Sub") and any(kinds(t) != "value" for t in n.inputs) for n in rest
    )


def _recover(sub, c_in: int, hw, strides, c_out: int, field, channelwise: bool) -> ConvParams:
    """The conv equal to the region, from impulse probes, accepted only after a random check
    at full resolution that is exact per output channel and independent of the batch.

    Probing is tried cheapest first: on a canvas sized by the receptive field rather than the
    image (a convolution is translation-invariant; the border is settled by the full-size
    check), with every channel at once when the region looks channel-by-channel; then with one
    impulse per input channel; then at full size. The first result the check accepts wins.
    """
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, c_in) + tuple(hw)).astype(np.float32)
    x[1] *= 1e3  # a second magnitude: an affine map scales, a clamp does not
    want = _per_image(sub, x)
    canvas = _canvas(hw, field, strides)
    runners = [(sub.at_any_size(), canvas)] if canvas != tuple(hw) else []
    runners.append((sub, tuple(hw)))
    last = Decline("no probe ran")
    for runner, size in runners:
        if runner is None:
            continue
        for together in ((True, False) if channelwise and c_in == c_out else (False,)):
            try:
                fused = _probe(runner, c_in, size, strides, c_out, together)
                _accept(sub, fused, x, want)
                return fused
            except Decline as exc:
                last = exc
    raise last


def _canvas(hw, field, strides):
    """A probing canvas three receptive fields wide (same size modulo twice the stride, so
    the region's size arithmetic sees the same parities), or the image when that is smaller."""
    eh, ew = field[0], field[1]
    size = []
    for n, e, s in zip(hw, (eh, ew), strides):
        c = 3 * e + 4 * s
        c += (n - c) % (2 * s)
        size.append(min(n, c))
    return tuple(size)


def _probe(runner, c_in: int, hw, strides, c_out: int, together: bool) -> ConvParams:
    """Kernel taps from impulses: one per input channel and stride residue, or (``together``)
    one per residue on every channel at once, read as a depthwise kernel."""
    positions = impulse_positions(hw, strides)
    rows = 1 if together else c_in
    probes = np.zeros((rows * len(positions) + 1, c_in) + tuple(hw), np.float32)
    for i in range(rows):
        for r, (ph, pw) in enumerate(positions):
            probes[i * len(positions) + r, slice(None) if together else i, ph, pw] = IMPULSE
    out = runner.run(probes).astype(np.float64)
    if out.shape[0] != len(probes) or out.shape[1] != c_out:
        raise Decline(f"the region maps a batch of {len(probes)} to shape {out.shape}: not a per-image conv")
    zero = out[-1]
    # A large impulse keeps the taps far above the rounding noise of the region's constants
    # (e.g. pad(y - v) + v); dividing by a power of two is exact.
    responses = zero + (out[:-1] - zero) / IMPULSE
    responses = responses.reshape((rows, len(positions)) + out.shape[1:])
    fused = kernel_from_impulses(responses, zero, positions, strides, hw)
    if together:  # weight [C, 1, kh, kw]: output c read input c
        fused = replace(fused, group=c_in)
    return fused


def _per_image(sub, x) -> np.ndarray:
    """The region's output for ``x``, checked to treat each image of the batch on its own."""
    want = sub.run(x).astype(np.float64)
    one = sub.run(x[1:]).astype(np.float64)
    swapped = sub.run(x[::-1].copy()).astype(np.float64)
    if want.shape[0] != 2 or one.shape[0] != 1 or swapped.shape[0] != 2:
        raise Decline("the region does not map each image to one output image")
    for got_i, want_i in ((one[0], want[1]), (swapped[0], want[1]), (swapped[1], want[0])):
        err, allowed = channel_errors(got_i[None], want_i[None], CHECK_RTOL, CHECK_RTOL * 1e-2)
        if np.any(err > allowed):
            raise Decline("the region's output for one image depends on the rest of the batch")
    return want


def _accept(sub, fused: ConvParams, x, want) -> None:
    """Decline unless ``fused`` gives the region's output on ``x``, per image and channel."""
    got = sub.run_conv(x, fused).astype(np.float64)
    if got.shape != want.shape:
        raise Decline(f"the recovered conv gives shape {got.shape}, the region {want.shape}")
    for i in range(len(x)):  # each image against its own per-channel scale
        err, allowed = channel_errors(got[i:i + 1], want[i:i + 1], CHECK_RTOL, CHECK_RTOL * 1e-2)
        bad = np.flatnonzero(err > allowed)
        if bad.size:
            c = int(bad[0])
            raise Decline(f"no conv reproduces it (error {err[c]:.2e} in channel {c}, allowed {allowed[c]:.2e}, "
                          "on random input: not affine or not translation-equivariant)")
