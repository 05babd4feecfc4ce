"""Pure numpy math of every rewrite, separate from graph surgery.

Everything here works on arrays and small frozen dataclasses; nothing knows about ONNX
graphs. All folding happens in float64; callers cast the result back to the tensor's
original dtype when they write it into the graph.

Conventions (those of ONNX ``Conv``):
    weight  W[Cout, Cin/g, kh, kw]
    bias    b[Cout]
    pads    (top, left, bottom, right) == ONNX [H_begin, W_begin, H_end, W_end]
    output row o reads input rows  o*stride - pad_top + i*dilation,  i in 0..kh-1
    (rows outside the image read 0).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .errors import Decline  # noqa: F401  (re-exported: kernels raise it when a fusion is not exact)


@dataclass(frozen=True)
class ConvParams:
    """A 2-D convolution: weights, bias and geometry."""

    weight: np.ndarray
    bias: np.ndarray
    strides: Tuple[int, int] = (1, 1)
    pads: Tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: Tuple[int, int] = (1, 1)
    group: int = 1

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[1]) * self.group

    @property
    def kernel_shape(self) -> Tuple[int, int]:
        return int(self.weight.shape[2]), int(self.weight.shape[3])

    @property
    def extent(self) -> Tuple[int, int]:
        """Size of the input window one output reads: (k - 1) * d + 1 per axis."""
        (kh, kw), (dh, dw) = self.kernel_shape, self.dilations
        return (kh - 1) * dh + 1, (kw - 1) * dw + 1

    @property
    def size_slack(self) -> Tuple[int, int]:
        """(pad_begin + pad_end - extent) per axis: the output size is floor((H + slack) / s) + 1.
        Two convs of the same stride give equal output sizes at every input size exactly when
        their slacks are equal (for unequal slacks some H lands between them)."""
        (eh, ew), (t, l, b, r) = self.extent, self.pads
        return t + b - eh, l + r - ew

    def output_size(self, h: int, w: int) -> Tuple[int, int]:
        eh, ew = self.extent
        t, l, b, r = self.pads
        sh, sw = self.strides
        return (h + t + b - eh) // sh + 1, (w + l + r - ew) // sw + 1


# --------------------------------------------------------------------------------------
# Batch normalization and per-channel affine maps (docs/rules.md §1, §2)
# --------------------------------------------------------------------------------------


def bn_affine(gamma, beta, mean, var, eps: float) -> Tuple[np.ndarray, np.ndarray]:
    """BatchNormalization (inference) as y = x * scale + shift, per channel, float64."""
    gamma, beta, mean, var = (np.asarray(a, dtype=np.float64) for a in (gamma, beta, mean, var))
    scale = gamma / np.sqrt(var + float(eps))
    return scale, beta - mean * scale


def affine_after_conv(p: ConvParams, scale, shift) -> ConvParams:
    """Conv followed by y * scale + shift per output channel (BN, Mul, Add...): one conv.

    W' = W * scale[:, None, None, None];  b' = b * scale + shift.
    """
    cout = p.out_channels
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), (cout,))
    shift = np.broadcast_to(np.asarray(shift, dtype=np.float64), (cout,))
    w = np.asarray(p.weight, dtype=np.float64) * scale[:, None, None, None]
    b = np.asarray(p.bias, dtype=np.float64) * scale + shift
    return replace(p, weight=w, bias=b)


def affine_after_conv_transpose(weight, bias, group: int, scale, shift):
    """ConvTranspose (weight [Cin, Cout/g, ...]) followed by a per-output-channel affine map.

    Output channel o = gi * (Cout/g) + j is produced by weight[gi*Cin/g:(gi+1)*Cin/g, j]; the
    scale therefore goes on axis 1 within each group.
    """
    w = np.asarray(weight, dtype=np.float64)
    cin, cout_g = w.shape[0], w.shape[1]
    cout = cout_g * group
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), (cout,))
    shift = np.broadcast_to(np.asarray(shift, dtype=np.float64), (cout,))
    wg = w.reshape((group, cin // group, cout_g) + w.shape[2:])
    wg = wg * scale.reshape(group, 1, cout_g, *([1] * (w.ndim - 2)))
    b = np.zeros(cout) if bias is None else np.asarray(bias, dtype=np.float64)
    return wg.reshape(w.shape), b * scale + shift


def affine_after_matmul(weight, bias, scale, shift):
    """y = x @ W + b (W [K, M]) followed by y * scale + shift over the M output features."""
    w = np.asarray(weight, dtype=np.float64)
    m = w.shape[1]
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), (m,))
    shift = np.broadcast_to(np.asarray(shift, dtype=np.float64), (m,))
    b = np.zeros(m) if bias is None else np.asarray(bias, dtype=np.float64)
    return w * scale[None, :], b * scale + shift


def affine_before_conv(p: ConvParams, scale, shift) -> ConvParams:
    """x * scale + shift (per input channel) followed by a conv: one conv (docs/rules.md §2).

    W'[o, i] = W[o, i] * scale[c];  b'[o] = b[o] + sum_{i, taps} W[o, i, taps] * shift[c], with c
    the input channel that (o, i) reads in the group layout. Exact when the conv does not pad,
    or when shift is zero (zero padding commutes with a scale); otherwise the border would read
    0 where the original reads shift: Decline.
    """
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), (p.in_channels,))
    shift = np.broadcast_to(np.asarray(shift, dtype=np.float64), (p.in_channels,))
    if any(p.pads) and np.any(shift != 0):
        raise Decline("the conv pads its input with zeros, where the original reads the shift: wrong on the border")
    w = np.asarray(p.weight, dtype=np.float64)
    cout, cin_g = w.shape[:2]
    channel = (np.arange(cout) // (cout // p.group))[:, None] * cin_g + np.arange(cin_g)[None, :]  # [Cout, Cin/g]
    weight = w * scale[channel][:, :, None, None]
    bias = np.asarray(p.bias, dtype=np.float64) + (w.sum(axis=(2, 3)) * shift[channel]).sum(axis=1)
    return replace(p, weight=weight, bias=bias)


def affine_before_matmul(weight, bias, scale, shift):
    """(x * scale + shift) @ W + b over the K input features: x @ W' + b' with
    W' = scale[:, None] * W and b' = b + shift @ W."""
    w = np.asarray(weight, dtype=np.float64)
    k, m = w.shape
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), (k,))
    shift = np.broadcast_to(np.asarray(shift, dtype=np.float64), (k,))
    b = np.zeros(m) if bias is None else np.asarray(bias, dtype=np.float64)
    return w * scale[:, None], b + shift @ w


# --------------------------------------------------------------------------------------
# Identity / per-channel branches as kernels (docs/rules.md §3)
# --------------------------------------------------------------------------------------


def diagonal_conv(scale, shift, group: int) -> ConvParams:
    """The 1x1 conv (with ``group`` groups) computing y[c] = x[c] * scale[c] + shift[c].

    Identity is scale = 1, shift = 0. Kernel 1 sits at W[o, o mod (C/g), 0, 0].
    """
    scale = np.asarray(scale, dtype=np.float64).reshape(-1)
    shift = np.broadcast_to(np.asarray(shift, dtype=np.float64), scale.shape).copy()
    c = scale.shape[0]
    if c % group:
        raise Decline(f"{c} channels do not split into {group} groups")
    cg = c // group
    w = np.zeros((c, cg, 1, 1))
    w[np.arange(c), np.arange(c) % cg, 0, 0] = scale
    return ConvParams(weight=w, bias=shift, group=group)


# --------------------------------------------------------------------------------------
# Parallel branches (docs/rules.md §4)
# --------------------------------------------------------------------------------------


def dense_kernel(weight, dilations: Sequence[int]) -> np.ndarray:
    """A kernel with dilation d as the dense kernel of size (k-1)*d+1 with zeros between taps."""
    w = np.asarray(weight)
    dh, dw = dilations
    if dh == 1 and dw == 1:
        return w
    kh, kw = w.shape[2:]
    out = np.zeros(w.shape[:2] + ((kh - 1) * dh + 1, (kw - 1) * dw + 1), dtype=w.dtype)
    out[:, :, ::dh, ::dw] = w
    return out


def common_window(
    branches: Sequence[ConvParams],
    allow_growth: bool = False,
    input_hw: Optional[Tuple[int, int]] = None,
) -> Tuple[ConvParams, List[Tuple[int, int]]]:
    """The geometry of one conv covering every branch's input window, and each branch's offset.

    Branch b reads rows starting at -pad_top_b, so the union starts at -max(pad_top) and the
    kernel of b sits at offset max(pad_top) - pad_top_b. The end pads are chosen so the output
    size equals the first branch's for every input size. Returns a zero-weight ConvParams with
    the fused geometry (dilation 1; weight shape [Cout of the first branch, Cin/g, kh, kw]).
    Declines when strides or groups differ, when that needs a negative pad, or (unless
    ``allow_growth``) when the union window is larger than the largest branch's window.
    """
    if len(branches) < 2:
        raise Decline("fewer than two branches")
    first = branches[0]
    for p in branches[1:]:
        if p.strides != first.strides:
            raise Decline(f"different strides {first.strides} vs {p.strides}")
        if p.group != first.group:
            raise Decline(f"different groups {first.group} vs {p.group}")
        if p.weight.shape[1] != first.weight.shape[1]:
            raise Decline(f"different input channels per group {first.weight.shape[1]} vs {p.weight.shape[1]}")
    ext = [p.extent for p in branches]
    top = max(p.pads[0] for p in branches)
    left = max(p.pads[1] for p in branches)
    kh = max(top - p.pads[0] + e[0] for p, e in zip(branches, ext))
    kw = max(left - p.pads[1] + e[1] for p, e in zip(branches, ext))
    largest = max(branches, key=lambda p: p.extent[0] * p.extent[1])
    if not allow_growth and kh * kw > largest.extent[0] * largest.extent[1]:
        raise Decline(
            f"misaligned branches: union window {kh}x{kw} is larger than the largest kernel "
            f"{largest.extent[0]}x{largest.extent[1]}"
        )
    # End pads from the first branch: pad_t + pad_b - extent stays the same, so does the output.
    bottom = first.pads[0] + first.pads[2] - ext[0][0] + kh - top
    right = first.pads[1] + first.pads[3] - ext[0][1] + kw - left
    if bottom < 0 or right < 0:
        raise Decline(f"fused conv would need a negative end pad ({bottom}, {right})")
    fused = ConvParams(
        weight=np.zeros(first.weight.shape[:2] + (kh, kw)),
        bias=np.zeros(first.out_channels),
        strides=first.strides,
        pads=(top, left, bottom, right),
        group=first.group,
    )
    if input_hw is not None:  # one input size: compare the sizes themselves
        want = first.output_size(*input_hw)
        for p in branches[1:]:
            if p.output_size(*input_hw) != want:
                raise Decline(f"branch outputs differ in size: {want} vs {p.output_size(*input_hw)}")
        if fused.output_size(*input_hw) != want:
            raise Decline("fused conv would change the output size")
    else:  # dynamic size: floor((H + slack) / s) + 1 must agree for every H
        want = first.size_slack
        for p in branches[1:]:
            if p.size_slack != want:
                raise Decline(f"branch outputs agree in size only at some input sizes (pads - extent {want} vs "
                              f"{p.size_slack}); they must agree at every input size")
        if fused.size_slack != want:
            raise Decline("fused conv would change the output size at some input sizes")
    offsets = [(top - p.pads[0], left - p.pads[1]) for p in branches]
    return fused, offsets


def _placed(p: ConvParams, window: ConvParams, offset: Tuple[int, int]) -> np.ndarray:
    """Branch p's kernel (dense) placed at ``offset`` in a zero kernel of ``window``'s size."""
    w = np.zeros(p.weight.shape[:2] + window.kernel_shape)
    (eh, ew), (oy, ox) = p.extent, offset
    w[:, :, oy : oy + eh, ox : ox + ew] = dense_kernel(np.asarray(p.weight, np.float64), p.dilations)
    return w


def merge_parallel(
    branches: Sequence[ConvParams],
    allow_growth: bool = False,
    input_hw: Optional[Tuple[int, int]] = None,
) -> ConvParams:
    """Sum of convolutions of one input tensor as one convolution (docs/rules.md §4).

    Kernels are placed in the union window (:func:`common_window`) and summed; biases add.
    """
    for p in branches[1:]:
        if p.weight.shape[0] != branches[0].weight.shape[0]:
            raise Decline(f"different output channels {branches[0].weight.shape[0]} vs {p.weight.shape[0]}")
    window, offsets = common_window(branches, allow_growth, input_hw)
    w = sum(_placed(p, window, off) for p, off in zip(branches, offsets))
    b = sum(np.asarray(p.bias, np.float64) for p in branches)
    return replace(window, weight=w, bias=b)


def concat_parallel(
    branches: Sequence[ConvParams],
    allow_growth: bool = False,
    input_hw: Optional[Tuple[int, int]] = None,
) -> ConvParams:
    """Concat(axis=1) of convolutions of one input as one convolution (docs/rules.md §5).

    Kernels are placed in the union window (:func:`common_window`) and concatenated along
    Cout. Grouped branches are composed on their dense form and regrouped. A kernel smaller
    than the union window gets zero taps, which the fused conv pays for in MACs: unless
    ``allow_growth``, every branch must already read the whole window.
    """
    dense = [densify_groups(p) for p in branches]
    window, offsets = common_window(dense, allow_growth=allow_growth, input_hw=input_hw)
    if not allow_growth:
        for p in dense:
            if p.extent != window.kernel_shape:
                raise Decline(
                    f"a {p.extent[0]}x{p.extent[1]} branch would be padded to the {window.kernel_shape[0]}x"
                    f"{window.kernel_shape[1]} window: more MACs than the separate convs (--allow-growth allows it)"
                )
    w = np.concatenate([_placed(p, window, off) for p, off in zip(dense, offsets)], axis=0)
    b = np.concatenate([np.asarray(p.bias, np.float64) for p in dense])
    return regroup(replace(window, weight=w, bias=b))


def pad_into_conv(p: ConvParams, pad_top: int, pad_left: int, pad_bottom: int, pad_right: int) -> ConvParams:
    """A constant-zero Pad of H/W before a conv adds to the conv's pads (docs/rules.md §8)."""
    if min(pad_top, pad_left, pad_bottom, pad_right) < 0:
        raise Decline("negative pads (cropping) do not fold into a conv")
    t, l, b, r = p.pads
    return replace(p, pads=(t + pad_top, l + pad_left, b + pad_bottom, r + pad_right))


# --------------------------------------------------------------------------------------
# Cost
# --------------------------------------------------------------------------------------


def conv_macs(p: ConvParams, out_hw: Tuple[int, int]) -> int:
    """Multiply-accumulates of one image: Cout * Cin/g * kh * kw * Hout * Wout."""
    cout, cin_g, kh, kw = p.weight.shape
    return int(cout * cin_g * kh * kw * out_hw[0] * out_hw[1])


# --------------------------------------------------------------------------------------
# Groups
# --------------------------------------------------------------------------------------


def densify_groups(p: ConvParams) -> ConvParams:
    """The same conv with group=1: a block-diagonal weight [Cout, Cin, kh, kw]."""
    if p.group == 1:
        return p
    cout, cin_g = p.weight.shape[:2]
    cout_g = cout // p.group
    w = np.zeros((cout, cin_g * p.group) + p.weight.shape[2:], dtype=np.float64)
    for g in range(p.group):
        w[g * cout_g : (g + 1) * cout_g, g * cin_g : (g + 1) * cin_g] = p.weight[g * cout_g : (g + 1) * cout_g]
    return replace(p, weight=w, group=1)


def regroup(p: ConvParams) -> ConvParams:
    """A dense conv (group=1) rewritten with the largest group count its weight's block-diagonal
    structure allows (depthwise included); unchanged when it is truly dense."""
    if p.group != 1:
        return p
    w = p.weight
    cout, cin = w.shape[:2]
    nz = np.abs(w).reshape(cout, cin, -1).max(axis=2) != 0
    for g in sorted(_common_divisors(cout, cin), reverse=True):
        if g == 1:
            break
        og, ig = cout // g, cin // g
        mask = np.zeros_like(nz)
        for k in range(g):
            mask[k * og : (k + 1) * og, k * ig : (k + 1) * ig] = True
        if not np.any(nz & ~mask):
            wg = np.concatenate([w[k * og : (k + 1) * og, k * ig : (k + 1) * ig] for k in range(g)], axis=0)
            return replace(p, weight=wg, group=g)
    return p


def _common_divisors(a: int, b: int):
    from math import gcd

    n = gcd(a, b)
    return [d for d in range(1, n + 1) if n % d == 0]


# --------------------------------------------------------------------------------------
# Sequential convs (docs/rules.md §6)
# --------------------------------------------------------------------------------------


def compose_sequential(p1: ConvParams, p2: ConvParams) -> ConvParams:
    """conv2(conv1(x)) as one conv, when that is exact.

    * conv2 has no padding: always exact. With conv1 dense-ified (dilation 1, extent E1) and
      conv2's taps l (dilation d2), the composite tap a = l*d2*s1 + k has
      W[o,i,a] = sum_m sum_{l,k: a = l*d2*s1+k} W2[o,m,l] W1[m,i,k], extent (E2-1)*s1 + E1,
      stride s1*s2, conv1's pads (the output size is provably unchanged);
      b = b2 + sum_{m,l} W2[o,m,l] b1[m].
    * conv2 pads with zeros: exact only when conv1 is 1x1, stride 1 and its bias is 0, since
      then zero padding commutes with conv1. The composite is conv2's geometry with pads
      P1 + P2 and W[o,i] = sum_m W2[o,m] W1[m,i] per tap.
    Otherwise the composite would be wrong on the border: Decline. Groups are composed on the
    dense (block-diagonal) form and recovered with :func:`regroup`.
    """
    if p2.in_channels != p1.out_channels:
        raise Decline(f"channel mismatch {p1.out_channels} -> {p2.in_channels}")
    d1, d2 = densify_groups(p1), densify_groups(p2)
    w1 = dense_kernel(np.asarray(d1.weight, np.float64), p1.dilations)
    w2 = np.asarray(d2.weight, np.float64)
    b1 = np.asarray(p1.bias, np.float64)
    b2 = np.asarray(p2.bias, np.float64)
    if any(p2.pads):
        pointwise = p1.kernel_shape == (1, 1) and p1.strides == (1, 1)
        if not pointwise:
            raise Decline("the second conv pads the first conv's output, and the first is not a stride-1 1x1")
        if np.any(b1 != 0):
            raise Decline("the second conv pads with zeros but the first conv's bias is not zero: wrong on the border")
        w = np.einsum("om...,mi->oi...", w2, w1[:, :, 0, 0], optimize=True)
        pads = tuple(a + b for a, b in zip(p1.pads, p2.pads))
        fused = ConvParams(weight=w, bias=b2.copy(), strides=p2.strides, pads=pads, dilations=p2.dilations)
        return regroup(fused)
    (s1h, s1w), (s2h, s2w) = p1.strides, p2.strides
    (l2h, l2w), (dh, dw) = p2.kernel_shape, p2.dilations
    e1h, e1w = w1.shape[2:]
    ah, aw = (l2h - 1) * dh * s1h + e1h, (l2w - 1) * dw * s1w + e1w
    w = np.zeros((w2.shape[0], w1.shape[1], ah, aw))
    for lh in range(l2h):
        for lw in range(l2w):
            oy, ox = lh * dh * s1h, lw * dw * s1w
            w[:, :, oy : oy + e1h, ox : ox + e1w] += np.einsum("om,mikl->oikl", w2[:, :, lh, lw], w1, optimize=True)
    b = b2 + np.einsum("oml,m->o", w2.reshape(w2.shape[0], w2.shape[1], -1), b1)
    fused = ConvParams(weight=w, bias=b, strides=(s1h * s2h, s1w * s2w), pads=p1.pads)
    return regroup(fused)


def avgpool_conv(channels: int, kernel, strides, pads, count_include_pad: bool) -> ConvParams:
    """AveragePool(k, s, pads) on C channels as a depthwise conv with weight 1/(kh*kw) (docs/rules.md §7).

    Exact when there is no padding or the padding counts in the average; Decline otherwise.
    """
    if any(pads) and not count_include_pad:
        raise Decline("AveragePool with padding and count_include_pad=0 divides border windows by fewer taps")
    kh, kw = kernel
    w = np.full((channels, 1, kh, kw), 1.0 / (kh * kw))
    return ConvParams(weight=w, bias=np.zeros(channels), strides=tuple(strides), pads=tuple(pads), group=channels)


# --------------------------------------------------------------------------------------
# Any affine region (docs/rules.md §10): a kernel from impulse responses
# --------------------------------------------------------------------------------------


def impulse_positions(in_hw: Tuple[int, int], strides: Tuple[int, int]) -> List[Tuple[int, int]]:
    """One impulse position per stride residue, near the centre of the input."""
    (h, w), (sh, sw) = in_hw, strides
    bh, bw = (h // 2) // sh * sh, (w // 2) // sw * sw
    return [(min(bh + rh, h - 1), min(bw + rw, w - 1)) for rh in range(sh) for rw in range(sw)]


def kernel_from_impulses(
    responses: np.ndarray,
    zero: np.ndarray,
    positions: Sequence[Tuple[int, int]],
    strides: Tuple[int, int],
    in_hw: Tuple[int, int],
    rel_threshold: float = 1e-7,
    bias_rtol: float = 1e-5,
) -> ConvParams:
    """The conv whose impulse responses these are.

    ``responses[i, r]`` is the map's output [Cout, Ho, Wo] for an input that is zero except a 1
    at channel i, position ``positions[r]``; ``zero`` is its output for the zero input. For a
    conv with stride s, output o responds to an impulse at p through tap q = p - o*s (relative
    to the window start), so every response fills part of the kernel W[:, i, q].

    Every decision is made per output channel against that channel's own scale (the largest
    of its responses and its bias): a tap is zero when it is within ``rel_threshold`` of that
    scale (float rounding), and the bias must be constant over space within ``bias_rtol`` of
    it. A channel 1e6x smaller than another is recovered as exactly as the large one. The
    kernel is cropped to the taps non-zero in any channel, and pads are set so the output size
    is unchanged. Declines when a bias varies over space.
    """
    cin, _, cout, ho, wo = responses.shape
    sh, sw = strides
    h, w = in_hw
    bias = zero.reshape(cout, -1)
    delta = responses - zero[None, None]  # [cin, positions, cout, ho, wo]
    scale = np.maximum(np.abs(delta).max(axis=(0, 1, 3, 4)), np.abs(bias).max(axis=1))  # [cout]
    scale = np.maximum(scale, np.finfo(np.float64).tiny)
    spread = np.abs(bias - bias[:, :1]).max(axis=1)
    if np.any(spread > bias_rtol * scale):
        c = int(np.argmax(spread / scale))
        raise Decline(f"the region's output for a zero input varies over space in channel {c} (not a conv bias)")
    # q ranges over p - o*s; index it from the smallest possible value.
    qh0 = min(p[0] for p in positions) - (ho - 1) * sh
    qw0 = min(p[1] for p in positions) - (wo - 1) * sw
    qh1 = max(p[0] for p in positions)
    qw1 = max(p[1] for p in positions)
    table = np.zeros((cout, cin, qh1 - qh0 + 1, qw1 - qw0 + 1))
    oh, ow = np.arange(ho), np.arange(wo)
    for r, (ph, pw) in enumerate(positions):
        rows = ph - oh * sh - qh0
        cols = pw - ow * sw - qw0
        table[:, :, rows[:, None], cols[None, :]] = np.transpose(delta[:, r], (1, 0, 2, 3))
    table[np.abs(table) <= rel_threshold * scale[:, None, None, None]] = 0.0
    nz = np.nonzero(np.any(table != 0, axis=(0, 1)))
    if len(nz[0]) == 0:
        raise Decline("the region does not depend on its input")
    r0, r1, c0, c1 = nz[0].min(), nz[0].max(), nz[1].min(), nz[1].max()
    kernel = table[:, :, r0 : r1 + 1, c0 : c1 + 1]
    top, left = -(qh0 + r0), -(qw0 + c0)
    kh, kw = kernel.shape[2:]
    if top < 0 or left < 0:
        raise Decline("the recovered kernel would need a negative pad")
    bottom = max(0, (ho - 1) * sh + kh - h - top)
    right = max(0, (wo - 1) * sw + kw - w - left)
    p = ConvParams(weight=kernel, bias=bias[:, 0].copy(), strides=strides, pads=(top, left, bottom, right))
    if p.output_size(h, w) != (ho, wo):
        raise Decline("no zero-padded conv reproduces the region's output size")
    return regroup(p)


def channel_errors(y: np.ndarray, ref: np.ndarray, rtol: float, floor_rel: float) -> Tuple[np.ndarray, np.ndarray]:
    """Per-channel error and allowance of ``y`` against ``ref`` (channels on axis 1).

    error_c = max|y_c - ref_c|; allowed_c = rtol * max|ref_c| + floor_rel * max|ref|. The floor,
    relative to the whole tensor, only matters for channels that are (near) zero next to the
    others; no fixed absolute floor, so a tensor of tiny values is held to its own scale.
    Tensors of rank < 2 count as one channel. Shapes must match; values must be finite.
    """
    y = np.asarray(y, np.float64)
    ref = np.asarray(ref, np.float64)
    if y.shape != ref.shape:
        raise ValueError(f"shape {y.shape} != {ref.shape}")
    if y.ndim < 2:
        y, ref = y.reshape(1, 1, -1), ref.reshape(1, 1, -1)
    axes = tuple(i for i in range(y.ndim) if i != 1)
    if y.size == 0:
        return np.zeros(y.shape[1]), np.zeros(y.shape[1])
    err = np.abs(y - ref).max(axis=axes)
    mag = np.abs(ref).max(axis=axes)
    allowed = rtol * mag + floor_rel * float(mag.max(initial=0.0))
    return err, allowed
