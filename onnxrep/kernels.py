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
from typing import Optional, Sequence, Tuple

import numpy as np


class Decline(Exception):
    """Raised by a kernel function when a fusion would not be exact (or not worth it)."""


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

    def output_size(self, h: int, w: int) -> Tuple[int, int]:
        eh, ew = self.extent
        t, l, b, r = self.pads
        sh, sw = self.strides
        return (h + t + b - eh) // sh + 1, (w + l + r - ew) // sw + 1


# --------------------------------------------------------------------------------------
# Batch normalization and per-channel affine maps (DESIGN 3.1, 3.2)
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


# --------------------------------------------------------------------------------------
# Identity / per-channel branches as kernels (DESIGN 3.3)
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
# Parallel branches (DESIGN 3.4)
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


def merge_parallel(
    branches: Sequence[ConvParams],
    allow_growth: bool = False,
    input_hw: Optional[Tuple[int, int]] = None,
) -> ConvParams:
    """Sum of convolutions of one input tensor as one convolution.

    Each branch is placed in the union of all branches' input windows: branch b reads rows
    starting at -pad_top_b, so the union starts at -max(pad_top) and every kernel sits at offset
    max(pad_top) - pad_top_b. The end pads are chosen so the output size equals the first
    branch's for every input size. Raises Decline when strides or groups differ, when that
    needs a negative pad, or (unless ``allow_growth``) when the union window is larger than the
    largest branch's kernel.
    """
    if len(branches) < 2:
        raise Decline("fewer than two branches")
    first = branches[0]
    for p in branches[1:]:
        if p.strides != first.strides:
            raise Decline(f"different strides {first.strides} vs {p.strides}")
        if p.group != first.group:
            raise Decline(f"different groups {first.group} vs {p.group}")
        if p.weight.shape[:2] != first.weight.shape[:2]:
            raise Decline(
                f"different channel shapes {tuple(first.weight.shape[:2])} vs {tuple(p.weight.shape[:2])}"
            )
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
    if input_hw is not None:
        want = first.output_size(*input_hw)
        for p in branches[1:]:
            if p.output_size(*input_hw) != want:
                raise Decline(f"branch outputs differ in size: {want} vs {p.output_size(*input_hw)}")
        if fused.output_size(*input_hw) != want:
            raise Decline("fused conv would change the output size")
    w = fused.weight
    b = fused.bias
    for p, (eh, ew) in zip(branches, ext):
        oy, ox = top - p.pads[0], left - p.pads[1]
        w[:, :, oy : oy + eh, ox : ox + ew] += dense_kernel(np.asarray(p.weight, np.float64), p.dilations)
        b += np.asarray(p.bias, dtype=np.float64)
    return fused


def pad_into_conv(p: ConvParams, pad_top: int, pad_left: int, pad_bottom: int, pad_right: int) -> ConvParams:
    """A constant-zero Pad of H/W before a conv adds to the conv's pads (DESIGN 3.8)."""
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
