"""Hypothesis strategies: random re-parameterizable blocks as ONNX models (for test_properties).

A drawn model is first a plain, hashable *spec* (:class:`ModelSpec` of :class:`Block` of
:class:`Branch`), so a failing example prints as data and replays with ``build_model(spec)``;
:func:`build_model` turns it into an ONNX model with ``helpers.GraphBuilder``.

Geometry. Along one spatial axis a branch is (kernel k, dilation d, pad_begin t, pad_end b) on
the block input, with extent e = (k - 1) * d + 1 and output size (n + t + b - e) // s + 1.
Every branch of a block is given pads that reproduce the block's output size (that of its first,
"main" branch), so the Add / Concat always joins equal shapes. For the branches that are not a
single conv the (k, d, t, b) is the geometry they have *on the block input*:

* ``avg``: Conv1x1 -> AveragePool(k, stride s, pads (t, b), count_include_pad=1);
* ``seq``: Conv1x1 (cin -> mid) -> Conv k x k (stride s, dilation d, pads (t, b));
* with ``border`` the pads are written before the pool / second conv as DBB's bias-valued
  border ``pad(y - v) + v`` (v: what the 1x1 conv and its BN give on a zero input) and the
  pool / second conv itself is unpadded.

Two families are drawn:

* :func:`model_specs` ("free"): anything valid. Misaligned windows, mixed groups, dilated main
  branches, Relu inside branches, padded 1x1 -> KxK / 1x1 -> AvgPool with a non-zero first bias
  (not a conv: onnxrep must decline them), concat of grouped or differently sized branches,
  intermediate tensors that are also graph outputs, dynamic batch, a branch broadcasting over
  channels, spatially varying constants, non-zero Pad values, count_include_pad=0.
* Both: per-channel Mul / Div / Add / Sub / c - y / scalar Mul after branches (see AFFINE), a
  conv's pads as a Pad node (PREPAD), auto_pad, weights shared between convs, shuffled operand
  order, chained or balanced Add trees, opsets 11..21.
* :func:`linear_model_specs` ("aligned"): blocks that are mathematically one conv of the main
  branch's window, so collapsing them never costs FLOPs (see test_properties, property 3).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

import numpy as np
import onnx
from hypothesis import strategies as st

from helpers import GraphBuilder

KMAX = 7  # largest kernel side
DMAX = 3  # largest dilation
CMAX = 8  # largest channel count drawn for a tensor (a concat may sum to a little more)
OPSETS = tuple(range(11, 22))


# --------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Axis:
    """Geometry of a branch along one spatial axis, on the block input."""

    k: int
    d: int
    t: int
    b: int

    @property
    def extent(self) -> int:
        return (self.k - 1) * self.d + 1

    def out(self, n: int, s: int) -> int:
        return (n + self.t + self.b - self.extent) // s + 1


@dataclass(frozen=True)
class Branch:
    kind: str  # "conv" | "identity" | "bn" | "avg" | "seq"
    cout: int
    h: Axis = Axis(1, 1, 0, 0)
    w: Axis = Axis(1, 1, 0, 0)
    group: int = 1
    bias: bool = True  # conv: its bias; seq / avg: the bias of the first (1x1) conv
    bn: bool = False  # BatchNormalization after the (last) conv / pool
    affine: str = ""  # an elementwise op by a constant after that, see AFFINE
    relu: bool = False  # Relu ending the branch: not linear, must stay
    mid: int = 0  # seq: channels between the 1x1 and the KxK conv
    bn1: bool = False  # seq / avg: BatchNormalization after the 1x1 conv
    border: bool = False  # seq / avg: pads written as pad(y - v) + v before an unpadded op
    tap: bool = False  # the branch's first intermediate tensor is also a graph output
    prepad: str = ""  # conv: its pads written as a Pad node before it, see PREPAD
    auto_pad: bool = False  # conv: auto_pad SAME_UPPER / SAME_LOWER / VALID when the pads are those
    share: bool = False  # conv: reuse the weight (and bias) initializers of an equal-shaped conv before it
    cip0: bool = False  # avg: count_include_pad=0 (with pads: not a conv, must stay)


#: Elementwise ops by a constant: the per-channel ones are affine (fold into a conv); "spatial"
#: multiplies by a map that varies over H and W (not translation-equivariant: must stay).
AFFINE = ("", "mul", "div", "add", "sub", "rsub", "scalar", "spatial")
LINEAR_AFFINE = AFFINE[:-1]
#: "zero": Pad(0) node + unpadded conv; "axes": the same with Pad's axes input (opset >= 18);
#: "value": Pad with a non-zero constant (a different function; must not fold as zero padding).
PREPAD = ("", "zero", "axes", "value")


@dataclass(frozen=True)
class Block:
    join: str  # "add" | "concat"
    stride: int
    branches: Tuple[Branch, ...]
    relu: bool  # Relu after the block
    order: Tuple[int, ...] = ()  # operand order of the Add / Concat (default: branch order)
    balanced: bool = False  # Add tree as pairs of pairs instead of a chain

    @property
    def cout(self) -> int:
        if self.join == "add":
            return self.branches[0].cout
        return sum(br.cout for br in self.branches)


@dataclass(frozen=True)
class ModelSpec:
    channels: int
    height: int
    width: int
    opset: int
    dynamic_batch: bool
    seed: int
    blocks: Tuple[Block, ...]


# --------------------------------------------------------------------------------------
# Building the ONNX model
# --------------------------------------------------------------------------------------


def _init(b: GraphBuilder, name: str) -> np.ndarray:
    return next(onnx.numpy_helper.to_array(t) for t in b.inits if t.name == name)


def _zero_response(b: GraphBuilder, conv_out: str, bn_out: Optional[str], cout: int) -> np.ndarray:
    """What Conv1x1 (+ BN) gives on a zero input, per channel (float64): its bias through BN."""
    conv = next(n for n in b.nodes if conv_out in n.output)
    v = _init(b, conv.input[2]).astype(np.float64) if len(conv.input) > 2 else np.zeros(cout)
    if bn_out is not None:
        bn = next(n for n in b.nodes if bn_out in n.output)
        gamma, beta, mean, var = (_init(b, i).astype(np.float64) for i in bn.input[1:5])
        eps = next(a.f for a in bn.attribute if a.name == "epsilon")
        v = (v - mean) * gamma / np.sqrt(var + eps) + beta
    return v


def _bias_border(b: GraphBuilder, y: str, v: np.ndarray, h: Axis, w: Axis) -> str:
    """pad(y - v) + v: DBB's border written with the value the 1x1 conv gives on zeros."""
    vc = v.astype(np.float32).reshape(1, -1, 1, 1)
    shifted = b.node("Sub", [y, b.const(vc, "border_v")])
    pads = np.array([0, 0, h.t, w.t, 0, 0, h.b, w.b], np.int64)
    padded = b.node("Pad", [shifted, b.const(pads, "pads")], mode="constant")
    return b.node("Add", [padded, b.const(vc, "border_v")])


def _tail(b: GraphBuilder, y: str, br: Branch, c: int, out_hw: Tuple[int, int]) -> str:
    if br.bn:
        y = b.bn(y, c)
    if br.affine:
        sign = b.rng.choice([-1.0, 1.0], (1, c, 1, 1))
        vec = (sign * b.rng.uniform(0.5, 1.5, (1, c, 1, 1))).astype(np.float32)
        if br.affine == "mul":
            y = b.node("Mul", [y, b.const(vec, "scale")])
        elif br.affine == "div":
            y = b.node("Div", [y, b.const(vec, "scale")])
        elif br.affine == "add":
            y = b.node("Add", [b.const(b.rand(1, c, 1, 1), "shift"), y])
        elif br.affine == "sub":
            y = b.node("Sub", [y, b.const(b.rand(c, 1, 1), "shift")])
        elif br.affine == "rsub":
            y = b.node("Sub", [b.const(b.rand(1, c, 1, 1), "shift"), y])
        elif br.affine == "scalar":
            y = b.node("Mul", [y, b.const(np.array(1.25, np.float32), "scale")])
        elif br.affine == "spatial":
            y = b.node("Mul", [y, b.const(b.rng.uniform(0.5, 1.5, (1, 1) + tuple(out_hw)).astype(np.float32), "map")])
        else:
            raise ValueError(br.affine)
    if br.relu:
        y = b.node("Relu", [y])
    return y


def _same_pads(n: int, s: int, e: int, upper: bool) -> Tuple[int, int]:
    total = max(0, (-(-n // s) - 1) * s + e - n)
    small, large = total // 2, total - total // 2
    return (small, large) if upper else (large, small)


def _conv(b: GraphBuilder, x: str, cin: int, br: Branch, s: int, hw: Tuple[int, int], shared: dict) -> str:
    """A Conv with the branch's geometry, written with a Pad node / auto_pad / shared weights."""
    kh, kw = br.h.k, br.w.k
    attrs = dict(kernel_shape=[kh, kw], strides=[s, s], dilations=[br.h.d, br.w.d], group=br.group)
    pads = [br.h.t, br.w.t, br.h.b, br.w.b]
    if br.prepad and any(pads):
        if br.prepad == "axes":
            x = b.node("Pad", [x, b.const(np.array(pads, np.int64), "pads"), "",
                               b.const(np.array([-2, -1] if b.rng.integers(2) else [2, 3], np.int64), "axes")])
        else:
            full = np.array([0, 0, pads[0], pads[1], 0, 0, pads[2], pads[3]], np.int64)
            value = 0.0 if br.prepad == "zero" else 0.5
            x = b.node("Pad", [x, b.const(full, "pads"), b.const(np.array(value, np.float32), "value")])
        pads = [0, 0, 0, 0]
    if br.auto_pad and not any(pads):
        attrs["auto_pad"] = "VALID"
    elif br.auto_pad and br.h.d == br.w.d == 1:  # onnxruntime: no SAME auto_pad with dilation
        eh, ew = br.h.extent, br.w.extent
        for mode, upper in (("SAME_UPPER", True), ("SAME_LOWER", False)):
            (t, bb), (l, r) = _same_pads(hw[0], s, eh, upper), _same_pads(hw[1], s, ew, upper)
            if pads == [t, l, bb, r]:
                attrs["auto_pad"] = mode
                break
    if "auto_pad" not in attrs:
        attrs["pads"] = pads
    has_bias = br.bias and not br.bn
    key = (cin, br.cout, br.group, kh, kw, has_bias)
    if br.share and key in shared:
        inputs = [x, *shared[key]]
    else:
        inputs = [x, b.const(b.rand(br.cout, cin // br.group, kh, kw), "w")]
        if has_bias:
            inputs.append(b.const(b.rand(br.cout), "b"))
        shared.setdefault(key, inputs[1:])
    return b.node("Conv", inputs, **attrs)


def _build_branch(b: GraphBuilder, x: str, cin: int, s: int, br: Branch, hw, shared: dict) -> str:
    out_hw = (br.h.out(hw[0], s), br.w.out(hw[1], s))
    pads = (br.h.t, br.w.t, br.h.b, br.w.b)
    if br.kind == "identity":
        return b.node("Relu", [x]) if br.relu else x
    if br.kind == "bn":
        return _tail(b, b.bn(x, cin), replace(br, bn=False), cin, out_hw)
    if br.kind == "conv":
        y = _conv(b, x, cin, br, s, hw, shared)
        if br.tap:
            b.mark_output(y)
        return _tail(b, y, br, br.cout, out_hw)
    # avg / seq: a 1x1 conv first
    mid = br.cout if br.kind == "avg" else br.mid
    y1 = b.conv(x, cin, mid, k=1, pad=0, group=br.group, bias=br.bias)
    conv1 = y1
    if br.tap:
        b.mark_output(y1)
    bn1 = None
    if br.bn1:
        y1 = bn1 = b.bn(y1, mid)
    if br.border:
        y1 = _bias_border(b, y1, _zero_response(b, conv1, bn1, mid), br.h, br.w)
        pads = (0, 0, 0, 0)
    if br.kind == "avg":
        y = b.node("AveragePool", [y1], kernel_shape=[br.h.k, br.w.k], strides=[s, s], pads=list(pads),
                   count_include_pad=0 if br.cip0 else 1)
    else:
        y = b.conv(y1, mid, br.cout, k=(br.h.k, br.w.k), stride=s, pad=pads, dilation=(br.h.d, br.w.d),
                   group=br.group, bias=not br.bn)
    return _tail(b, y, br, br.cout, out_hw)


def _join(b: GraphBuilder, block: Block, outs: List[str]) -> str:
    if block.order:
        outs = [outs[i] for i in block.order]
    if len(outs) == 1:
        return outs[0]
    if block.join == "concat":
        return b.node("Concat", outs, axis=1)
    while len(outs) > 1:
        if block.balanced:
            outs = [b.add(*outs[i : i + 2]) for i in range(0, len(outs), 2)]
        else:
            outs = [b.add(outs[0], outs[1])] + outs[2:]
    return outs[0]


def build_model(spec: ModelSpec) -> onnx.ModelProto:
    """The ONNX model of a spec (deterministic: weights come from ``spec.seed``)."""
    batch = "N" if spec.dynamic_batch else 1
    b = GraphBuilder([batch, spec.channels, spec.height, spec.width], seed=spec.seed)
    x, cin, hw = b.x, spec.channels, (spec.height, spec.width)
    for block in spec.blocks:
        shared: dict = {}
        outs = [_build_branch(b, x, cin, block.stride, br, hw, shared) for br in block.branches]
        y = _join(b, block, outs)
        if block.relu:
            y = b.node("Relu", [y])
        main = block.branches[0]
        x, cin, hw = y, block.cout, (main.h.out(hw[0], block.stride), main.w.out(hw[1], block.stride))
    model = b.build(x, opset=spec.opset)
    dims = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim[1:]]
    assert dims == [cin, *hw], f"generator bug: output {dims}, expected {[cin, *hw]} for {spec}"
    return model


# --------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------


def extent(k: int, d: int) -> int:
    return (k - 1) * d + 1


def _kernel_shapes(style: str, kmax: int = KMAX, dmax: int = DMAX) -> List[Tuple[int, int, int, int]]:
    """(kh, kw, dh, dw) candidates of one style, simplest first."""
    out = []
    for k in range(1, kmax + 1):
        for d in range(1, dmax + 1):
            if k == 1 and d > 1:
                continue
            if style == "square":
                out.append((k, k, d, d))
            elif style == "1xK" and k > 1:
                out.append((1, k, 1, d))
            elif style == "Kx1" and k > 1:
                out.append((k, 1, d, 1))
    return sorted(out, key=lambda c: (max(c[0], c[1]), max(c[2], c[3])))


def _total_pad_range(n: int, out: int, s: int, e: int, pmax: int) -> Tuple[int, int]:
    """Range of t + b giving ``out`` outputs, each pad within [0, pmax] (may be empty: lo > hi)."""
    lo = (out - 1) * s + e - n
    return max(lo, 0), min(lo + s - 1, 2 * pmax)


@st.composite
def _free_axis(draw, n: int, out: int, s: int, k: int, d: int, pmax: int) -> Axis:
    e = extent(k, d)
    lo, hi = _total_pad_range(n, out, s, e, pmax)
    total = draw(st.integers(lo, hi))
    t = draw(st.integers(max(0, total - pmax), min(total, pmax)))
    return Axis(k, d, t, total - t)


def _free_feasible(n: int, out: int, s: int, k: int, d: int, pmax: int) -> bool:
    lo, hi = _total_pad_range(n, out, s, extent(k, d), pmax)
    return lo <= hi


def _aligned_offsets(n: int, out: int, s: int, main: Axis, k: int, d: int) -> List[Tuple[int, int, int]]:
    """(t, b_lo, b_hi) for a (k, d) window nested in ``main``'s window (same output size).

    The window starts ``off`` taps into the main window (t = main.t - off >= 0) and ends inside
    it; any end pad b in [b_lo, b_hi] gives the main branch's output size.
    """
    e, big = extent(k, d), main.extent
    res = []
    if e > big:
        return res
    lo = (out - 1) * s + e - n  # t + b must be in [lo, lo + s - 1]
    for off in range(0, min(main.t, big - e) + 1):
        t = main.t - off
        b_lo, b_hi = max(0, lo - t), lo + s - 1 - t
        if b_lo <= b_hi:
            res.append((t, b_lo, b_hi))
    return res


# --------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------


def _groups(cin: int) -> List[int]:
    """Group counts for a block on cin channels: 1, 2, depthwise (cin)."""
    gs = [1]
    if cin % 2 == 0 and cin > 2:
        gs.append(2)
    if cin > 1:
        gs.append(cin)
    return gs


def _couts(cin: int, g: int, cmax: int = CMAX) -> List[int]:
    if g == cin and g > 1:  # depthwise: channel multiplier 1 or 2
        return [c for c in (cin, 2 * cin) if c <= cmax] or [cin]
    return [c for c in range(g, cmax + 1, g)] or [g]


@st.composite
def _flags(draw, p_true: int = 4):
    """A boolean that is True about 1 time in ``p_true`` (shrinks to False)."""
    return draw(st.sampled_from([False] * (p_true - 1) + [True]))


@st.composite
def _free_geometry(draw, kind: str, hw, out_hw, s: int, border: bool):
    """(h, w) axes of a non-main branch for the given output size; None when none fits."""
    (n_h, n_w), (o_h, o_w) = hw, out_hw
    dmax = 1 if kind == "avg" else DMAX
    style = draw(st.sampled_from(["square", "1xK", "Kx1"]))
    pm = (lambda k, d: k - 1) if kind == "avg" and not border else (lambda k, d: extent(k, d))
    cands = [c for c in _kernel_shapes(style, dmax=dmax)
             if _free_feasible(n_h, o_h, s, c[0], c[2], pm(c[0], c[2]))
             and _free_feasible(n_w, o_w, s, c[1], c[3], pm(c[1], c[3]))]
    if not cands:
        return None
    kh, kw, dh, dw = draw(st.sampled_from(cands))
    return (draw(_free_axis(n_h, o_h, s, kh, dh, pm(kh, dh))), draw(_free_axis(n_w, o_w, s, kw, dw, pm(kw, dw))))


@st.composite
def _main_geometry(draw, kind: str, hw, s: int, same: bool, aligned: bool):
    """(h, w) axes of a block's main branch; ``same``: stride 1 output size == input size."""
    dmax = 1 if (aligned or kind == "avg") else DMAX
    style = draw(st.sampled_from(["square", "1xK", "Kx1"]))
    kh, kw, dh, dw = draw(st.sampled_from(_kernel_shapes(style, dmax=dmax)))
    axes = []
    for n, k, d in ((hw[0], kh, dh), (hw[1], kw, dw)):
        e = extent(k, d)
        pmax = k - 1 if kind == "avg" else e - 1
        t = draw(st.integers(0, pmax))
        if same:
            b = e - 1 - t
        else:
            b = draw(st.integers(max(0, e - n - t), max(pmax, e - n - t)))
        axes.append(Axis(k, d, t, b))
    return tuple(axes)


@st.composite
def _conv_spelling(draw, opset: int, linear: bool):
    """(prepad, auto_pad, share) for a conv branch: other ways to write the same conv."""
    options = [""] + [p for p in PREPAD if not (p == "axes" and opset < 18) and not (p == "value" and linear)]
    return draw(st.sampled_from(options)), draw(_flags(5)), draw(_flags(4))


@st.composite
def _affine(draw, linear: bool):
    return draw(st.sampled_from([""] * 5 + list(LINEAR_AFFINE[1:] if linear else AFFINE[1:])))


@st.composite
def _free_block(draw, cin: int, hw: Tuple[int, int], opset: int) -> Block:
    join = draw(st.sampled_from(["add", "add", "concat"]))
    want_identity = draw(_flags(3))
    s = 1 if want_identity else draw(st.sampled_from([1, 2]))
    g = draw(st.sampled_from(_groups(cin)))
    cout = None  # a concat's width is the sum of its branches'
    if join == "add":
        cout = cin if want_identity else draw(st.sampled_from(_couts(cin, g)))
    main_kind = draw(st.sampled_from(["conv", "conv", "seq", "avg"]))
    main_cout = cout if join == "add" else draw(st.sampled_from(_couts(cin, g, 4)))
    main_border = main_kind in ("seq", "avg") and draw(_flags(3))
    h, w = draw(_main_geometry(main_kind, hw, s, want_identity, aligned=False))
    out_hw = (h.out(hw[0], s), w.out(hw[1], s))
    branches = [draw(_free_branch(main_kind, cin, main_cout, g, h, w, main_border, opset))]
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["conv", "conv", "identity", "bn", "avg", "seq"]))
        if kind in ("identity", "bn"):
            if not want_identity or (join == "add" and cout != cin):
                kind = "conv"
            else:
                branches.append(Branch(kind, cin, affine=draw(_affine(False)) if kind == "bn" else "",
                                       relu=draw(_flags(6))))
                continue
        bg = draw(st.sampled_from([g] + [x for x in _groups(cin) if x != g])) if draw(_flags(5)) else g
        if join == "add":
            bc = 1 if kind == "conv" and cout > 1 and draw(_flags(12)) else cout  # 1: broadcast over channels
        else:
            bc = draw(st.sampled_from(_couts(cin, bg, 4)))
        if bc % bg:
            bg = 1
        border = kind in ("seq", "avg") and draw(_flags(3))
        where = draw(st.sampled_from(["random", "same", "nested"]))
        geo = None
        if where == "same" and (kind != "avg" or (h.d == w.d == 1 and (border or max(h.t, h.b, w.t, w.b) < min(h.k, w.k)))):
            geo = (h, w)
        elif where == "nested" and h.d == w.d == 1:
            geo = draw(_aligned_geometry(kind, hw, out_hw, s, (h, w)))
            if geo is not None and kind == "avg" and max(geo[0].t, geo[0].b, geo[1].t, geo[1].b) >= min(geo[0].k, geo[1].k):
                border = True
        if geo is None:
            geo = draw(_free_geometry(kind, hw, out_hw, s, border))
        if geo is None:  # nothing of that kind fits: copy the main branch's window as a conv
            kind, geo, border = "conv", (h, w), False
        branches.append(draw(_free_branch(kind, cin, bc, bg, geo[0], geo[1], border, opset)))
    order = tuple(draw(st.permutations(range(len(branches))))) if draw(_flags(3)) else ()
    return Block(join, s, tuple(branches), relu=draw(st.sampled_from([True, True, False])), order=order,
                 balanced=draw(_flags(3)))


@st.composite
def _free_branch(draw, kind: str, cin: int, cout: int, g: int, h: Axis, w: Axis, border: bool, opset: int) -> Branch:
    if kind == "avg" and g != 1 and cout % g:
        g = 1
    mid = draw(st.sampled_from(_couts(cin, g))) if kind == "seq" else 0
    prepad, auto_pad, share = draw(_conv_spelling(opset, linear=False)) if kind == "conv" else ("", False, False)
    return Branch(
        kind, cout, h, w, g,
        bias=draw(st.booleans()),
        bn=draw(st.booleans()),
        affine=draw(_affine(False)),
        relu=draw(_flags(6)),
        mid=mid,
        bn1=kind in ("seq", "avg") and draw(st.booleans()),
        border=border,
        tap=draw(_flags(8)),
        prepad=prepad,
        auto_pad=auto_pad,
        share=share,
        cip0=kind == "avg" and not border and draw(_flags(5)),
    )


@st.composite
def model_specs(draw, max_blocks: int = 3) -> ModelSpec:
    """Any valid model of 1..max_blocks random blocks (properties 1 and 2)."""
    c = draw(st.integers(1, CMAX))
    hw = (draw(st.integers(5, 12)), draw(st.integers(5, 12)))
    opset = draw(st.sampled_from(OPSETS))
    blocks, cin, cur = [], c, hw
    for _ in range(draw(st.integers(1, max_blocks))):
        block = draw(_free_block(cin, cur, opset))
        blocks.append(block)
        main = block.branches[0]
        cin, cur = block.cout, (main.h.out(cur[0], block.stride), main.w.out(cur[1], block.stride))
        if min(cur) < 2 or cin > 12:
            break
    return ModelSpec(c, hw[0], hw[1], opset, draw(_flags()), draw(st.integers(0, 2**16)), tuple(blocks))


# ---- aligned, fully linear blocks (property 3) ----------------------------------------


@st.composite
def _aligned_geometry(draw, kind: str, hw, out_hw, s: int, main: Tuple[Axis, Axis]):
    """A window nested in the main branch's window with the same output size, or None."""
    dmax = 1 if kind == "avg" else DMAX
    style = draw(st.sampled_from(["square", "1xK", "Kx1"]))
    cands = []
    for kh, kw, dh, dw in _kernel_shapes(style, dmax=dmax):
        oh = _aligned_offsets(hw[0], out_hw[0], s, main[0], kh, dh)
        ow = _aligned_offsets(hw[1], out_hw[1], s, main[1], kw, dw)
        if oh and ow:
            cands.append(((kh, dh, oh), (kw, dw, ow)))
    if not cands:
        return None
    axes = []
    for k, d, offs in draw(st.sampled_from(cands)):
        t, b_lo, b_hi = draw(st.sampled_from(offs))
        axes.append(Axis(k, d, t, draw(st.integers(b_lo, b_hi))))
    return tuple(axes)


@st.composite
def _linear_conv(draw, cout: int, h: Axis, w: Axis, g: int, opset: int) -> Branch:
    prepad, auto_pad, share = draw(_conv_spelling(opset, linear=True))
    return Branch("conv", cout, h, w, g, bias=draw(st.booleans()), bn=draw(st.booleans()),
                  affine=draw(_affine(True)), prepad=prepad, auto_pad=auto_pad, share=share)


@st.composite
def _aligned_block(draw, cin: int, hw: Tuple[int, int], last: bool, opset: int) -> Block:
    join = draw(st.sampled_from(["add", "add", "add", "concat"]))
    if join == "concat":
        # Concat: group-1 convs of one identical window (no zero taps, so no extra MACs).
        s = draw(st.sampled_from([1, 2]))
        h, w = draw(_main_geometry("conv", hw, s, False, aligned=True))
        branches = tuple(draw(_linear_conv(draw(st.integers(1, 4)), h, w, 1, opset))
                         for _ in range(draw(st.integers(1, 3))))
        order = tuple(draw(st.permutations(range(len(branches))))) if draw(_flags(3)) else ()
        return Block("concat", s, branches, relu=not last or draw(st.booleans()), order=order)
    want_identity = draw(_flags(3))
    s = 1 if want_identity else draw(st.sampled_from([1, 2]))
    g = draw(st.sampled_from(_groups(cin)))
    cout = cin if want_identity else draw(st.sampled_from(_couts(cin, g)))
    h, w = draw(_main_geometry("conv", hw, s, want_identity, aligned=True))
    out_hw = (h.out(hw[0], s), w.out(hw[1], s))
    branches = [draw(_linear_conv(cout, h, w, g, opset))]
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["conv", "conv", "identity", "bn", "avg", "seq"]))
        if kind in ("identity", "bn"):
            if want_identity:
                branches.append(Branch(kind, cin, affine=draw(_affine(True)) if kind == "bn" else ""))
                continue
            kind = "conv"
        geo = draw(_aligned_geometry(kind, hw, out_hw, s, (h, w)))
        if geo is None:
            continue
        gh, gw = geo
        if kind == "conv":
            branches.append(draw(_linear_conv(cout, gh, gw, g, opset)))
            continue
        padded = any((gh.t, gh.b, gw.t, gw.b))
        border = padded and draw(st.booleans())
        if kind == "avg" and (max(gh.t, gh.b) >= gh.k or max(gw.t, gw.b) >= gw.k):
            border = True  # AveragePool pads must be smaller than its kernel: write them as a Pad
        # A first bias is exact only under a bias-valued border or with an unpadded second op.
        first_bias_ok = border or not padded
        branches.append(Branch(
            kind, cout, gh, gw, g,
            bias=first_bias_ok and draw(st.booleans()),
            bn=draw(st.booleans()),
            affine=draw(_affine(True)),
            mid=draw(st.sampled_from(_couts(cin, g))) if kind == "seq" else 0,
            bn1=first_bias_ok and draw(st.booleans()),
            border=border,
        ))
    order = tuple(draw(st.permutations(range(len(branches))))) if draw(_flags(3)) else ()
    return Block("add", s, tuple(branches), relu=not last or draw(st.booleans()), order=order,
                 balanced=draw(_flags(3)))


@st.composite
def linear_model_specs(draw, max_blocks: int = 3) -> ModelSpec:
    """1..max_blocks fully linear, aligned blocks separated by Relu (property 3)."""
    c = draw(st.integers(1, CMAX))
    hw = (draw(st.integers(5, 12)), draw(st.integers(5, 12)))
    opset = draw(st.sampled_from(OPSETS))
    n = draw(st.integers(1, max_blocks))
    blocks, cin, cur = [], c, hw
    for i in range(n):
        block = draw(_aligned_block(cin, cur, i == n - 1, opset))
        blocks.append(block)
        main = block.branches[0]
        cin, cur = block.cout, (main.h.out(cur[0], block.stride), main.w.out(cur[1], block.stride))
        if min(cur) < 2 or cin > 12:
            break
    return ModelSpec(c, hw[0], hw[1], opset, draw(_flags()), draw(st.integers(0, 2**16)), tuple(blocks))


def describe(spec: ModelSpec) -> str:
    """A compact one-block-per-line description (for notes on failing examples)."""
    lines = [f"input [1,{spec.channels},{spec.height},{spec.width}] opset {spec.opset} seed {spec.seed}"
             + (" dynamic batch" if spec.dynamic_batch else "")]
    for i, block in enumerate(spec.blocks):
        parts = []
        for br in block.branches:
            geo = f"{br.h.k}x{br.w.k} d{br.h.d},{br.w.d} pads({br.h.t},{br.w.t},{br.h.b},{br.w.b})"
            flags = [f for f, on in (("bias", br.bias), ("bn", br.bn), ("relu", br.relu), ("bn1", br.bn1),
                                    ("border", br.border), ("tap", br.tap), ("auto_pad", br.auto_pad),
                                    ("share", br.share), ("cip0", br.cip0)) if on]
            flags += [f"{name}={value}" for name, value in (("affine", br.affine), ("prepad", br.prepad)) if value]
            extra = f" mid {br.mid}" if br.kind == "seq" else ""
            parts.append(f"{br.kind}[{br.cout}ch g{br.group} {geo}{extra} {'+'.join(flags)}]")
        how = f" order {list(block.order)}" if block.order else ""
        how += " balanced" if block.balanced else ""
        lines.append(f"  block {i}: {block.join} stride {block.stride}{how}{' +relu' if block.relu else ''}: "
                     + ", ".join(parts))
    return "\n".join(lines)


def runnable_model(spec: "ModelSpec") -> onnx.ModelProto:
    """The spec's model; a draw that is not a valid, runnable model is rejected (hypothesis
    ``assume``). An AssertionError is the generator's own shape bookkeeping failing: a bug in
    this module, not a bad draw, so it propagates."""
    from hypothesis import assume, note

    from helpers import random_feeds, run

    note(describe(spec))
    try:
        model = build_model(spec)
        onnx.checker.check_model(model, full_check=True)
        run(model, random_feeds(model))
    except AssertionError:
        raise
    except Exception as exc:  # noqa: BLE001 - an invalid draw
        note(f"rejected draw: {exc}")
        assume(False)
    return model
