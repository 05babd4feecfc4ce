"""Pure numpy math of every rewrite, separate from graph surgery.

Everything here works on arrays and small frozen dataclasses; nothing knows about ONNX
graphs. All folding happens in float64; callers cast the result back to the tensor's
original dtype when they write it into the graph.

Conventions (those of ONNX ``Conv``), for any number n of spatial axes (1-D, 2-D, 3-D convs):
    weight  W[Cout, Cin/g, k_1, ..., k_n]
    bias    b[Cout]
    pads    (begin_1, ..., begin_n, end_1, ..., end_n); for 2-D (top, left, bottom, right)
    strides, dilations: one per spatial axis
    along each axis, output o reads input positions  o*stride - pad_begin + i*dilation,
    i in 0..k-1 (positions outside the input read 0).
Every identity holds per spatial axis, so one code path serves every n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .errors import Decline  # noqa: F401  (re-exported: kernels raise it when a fusion is not exact)


def dims_str(sizes: Sequence[int]) -> str:
    """A kernel or window size as text: (3, 1) -> '3x1', (5,) -> '5'."""
    return "x".join(str(int(v)) for v in sizes)


@dataclass(frozen=True)
class ConvParams:
    """A convolution over n = weight.ndim - 2 spatial axes: weights, bias and geometry.

    ``strides``, ``pads`` and ``dilations`` left empty mean 1, 0 and 1 on every axis.
    """

    weight: np.ndarray
    bias: np.ndarray
    strides: Tuple[int, ...] = ()
    pads: Tuple[int, ...] = ()
    dilations: Tuple[int, ...] = ()
    group: int = 1

    def __post_init__(self):
        n = np.ndim(self.weight) - 2
        if n < 1:
            raise ValueError(f"a conv weight needs at least 3 axes, got shape {np.shape(self.weight)}")
        for name, default, length in (("strides", 1, n), ("pads", 0, 2 * n), ("dilations", 1, n)):
            value = tuple(int(v) for v in getattr(self, name)) or (default,) * length
            if len(value) != length:
                raise ValueError(f"{name} {value} do not fit a {n}-D conv")
            object.__setattr__(self, name, value)

    @property
    def ndim(self) -> int:
        """The number of spatial axes."""
        return int(np.ndim(self.weight)) - 2

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[1]) * self.group

    @property
    def kernel_shape(self) -> Tuple[int, ...]:
        return tuple(int(k) for k in self.weight.shape[2:])

    @property
    def pads_begin(self) -> Tuple[int, ...]:
        return self.pads[: self.ndim]

    @property
    def pads_end(self) -> Tuple[int, ...]:
        return self.pads[self.ndim :]

    @property
    def extent(self) -> Tuple[int, ...]:
        """Size of the input window one output reads: (k - 1) * d + 1 per axis."""
        return tuple((k - 1) * d + 1 for k, d in zip(self.kernel_shape, self.dilations))

    @property
    def size_slack(self) -> Tuple[int, ...]:
        """(pad_begin + pad_end - extent) per axis: the output size is floor((H + slack) / s) + 1.
        Two convs of the same stride give equal output sizes at every input size exactly when
        their slacks are equal (for unequal slacks some H lands between them)."""
        return tuple(b + e - x for b, e, x in zip(self.pads_begin, self.pads_end, self.extent))

    def output_size(self, *sizes: int) -> Tuple[int, ...]:
        """The output's spatial size for an input of spatial size ``sizes`` (one per axis)."""
        if len(sizes) != self.ndim:
            raise ValueError(f"{len(sizes)} sizes for a {self.ndim}-D conv")
        return tuple((n + slack) // s + 1 for n, slack, s in zip(sizes, self.size_slack, self.strides))


def _channels_first(vec: np.ndarray, ndim: int) -> np.ndarray:
    """A vector over axis 0 of an array with ``ndim`` axes: vec[:, None, ..., None]."""
    return vec.reshape((-1,) + (1,) * (ndim - 1))


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

    W' = W * scale[:, None, ...];  b' = b * scale + shift (any number of spatial axes).
    """
    cout = p.out_channels
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), (cout,))
    shift = np.broadcast_to(np.asarray(shift, dtype=np.float64), (cout,))
    w = np.asarray(p.weight, dtype=np.float64) * _channels_first(scale, p.weight.ndim)
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
    cout, cin_g = p.weight.shape[:2]
    g = p.group
    # Viewed per group as [g, Cout/g, Cin/g, taps]: output o of group k reads input channels
    # k * Cin/g + i. Contracted without an index array or a product as large as the weight
    # (these weights can be hundreds of MB; docs/architecture.md, "Memory").
    w = np.array(p.weight, dtype=np.float64).reshape(g, cout // g, cin_g, -1)
    bias = np.asarray(p.bias, dtype=np.float64) + np.einsum("goit,gi->go", w, shift.reshape(g, cin_g)).reshape(cout)
    w *= scale.reshape(g, 1, cin_g, 1)
    return replace(p, weight=w.reshape(p.weight.shape), bias=bias)


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


def diagonal_conv(scale, shift, group: int, ndim: int = 2) -> ConvParams:
    """The 1x1 conv (``ndim`` spatial axes, ``group`` groups) computing y[c] = x[c] * scale[c] + shift[c].

    Identity is scale = 1, shift = 0. Kernel 1 sits at W[o, o mod (C/g), 0, ..., 0].
    """
    scale = np.asarray(scale, dtype=np.float64).reshape(-1)
    shift = np.broadcast_to(np.asarray(shift, dtype=np.float64), scale.shape).copy()
    c = scale.shape[0]
    if c % group:
        raise Decline(f"{c} channels do not split into {group} groups")
    cg = c // group
    w = np.zeros((c, cg) + (1,) * ndim)
    w.reshape(c, cg)[np.arange(c), np.arange(c) % cg] = scale
    return ConvParams(weight=w, bias=shift, group=group)


def channel_affine_of(p: ConvParams) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """(scale, shift) when the conv is y[c] = x[c] * scale[c] + shift[c] (the inverse of
    :func:`diagonal_conv`), else None.

    That is a 1x1 window (every spatial axis), stride 1, no pads, as many outputs as inputs and
    each output reading only its own input channel: a depthwise 1x1 conv, or any grouping whose
    dense matrix is diagonal. Dilations do not matter on a 1x1 window.
    """
    w = np.asarray(p.weight)
    if any(k != 1 for k in w.shape[2:]) or any(s != 1 for s in p.strides) or any(p.pads):
        return None
    c = w.shape[0]
    if w.shape[1] * p.group != c:
        return None
    bias = np.asarray(p.bias).reshape(c).copy()
    if p.group == c:  # depthwise: the weights are the scales
        return w.reshape(c).copy(), bias
    # output o of group g reads inputs g*cin_g .. (g+1)*cin_g - 1 (cout_g == cin_g here): its own
    # channel is column o mod cin_g. Diagonal when no other weight is nonzero (checked without
    # densifying: an FC of tens of thousands of channels would need a C x C matrix)
    cin_g = w.shape[1]
    flat = w.reshape(c, cin_g)
    scale = flat[np.arange(c), np.arange(c) % cin_g].copy()
    if np.count_nonzero(flat) != np.count_nonzero(scale):
        return None
    return scale, bias


# --------------------------------------------------------------------------------------
# Parallel branches (docs/rules.md §4)
# --------------------------------------------------------------------------------------


def dense_kernel(weight, dilations: Sequence[int]) -> np.ndarray:
    """A kernel with dilation d as the dense kernel of size (k-1)*d+1 with zeros between taps."""
    w = np.asarray(weight)
    dilations = tuple(int(d) for d in dilations)
    if all(d == 1 for d in dilations):
        return w
    out = np.zeros(w.shape[:2] + tuple((k - 1) * d + 1 for k, d in zip(w.shape[2:], dilations)), dtype=w.dtype)
    out[(slice(None), slice(None)) + tuple(slice(None, None, d) for d in dilations)] = w
    return out


def common_window(
    branches: Sequence[ConvParams],
    allow_growth: bool = False,
    input_size: Optional[Sequence[int]] = None,
) -> Tuple[ConvParams, List[Tuple[int, ...]]]:
    """The geometry of one conv covering every branch's input window, and each branch's offset.

    Along each axis, branch b reads from -pad_begin_b, so the union starts at -max(pad_begin) and
    the kernel of b sits at offset max(pad_begin) - pad_begin_b. The end pads are chosen so the
    output size equals the first branch's for every input size. Returns a zero-weight ConvParams
    with the fused geometry (dilation 1; weight shape [Cout of the first branch, Cin/g, window]).
    ``input_size`` is the input's static spatial size (one int per axis), or None when a size is
    dynamic. Declines when the number of spatial axes, strides or groups differ, when that needs
    a negative pad, or (unless ``allow_growth``) when the union window is larger than the largest
    branch's window.
    """
    if len(branches) < 2:
        raise Decline("fewer than two branches")
    first = branches[0]
    n = first.ndim
    for p in branches[1:]:
        if p.ndim != n:
            raise Decline(f"a {n}-D and a {p.ndim}-D branch")
        if p.strides != first.strides:
            raise Decline(f"different strides {first.strides} vs {p.strides}")
        if p.group != first.group:
            raise Decline(f"different groups {first.group} vs {p.group}")
        if p.weight.shape[1] != first.weight.shape[1]:
            raise Decline(f"different input channels per group {first.weight.shape[1]} vs {p.weight.shape[1]}")
    ext = [p.extent for p in branches]
    begin = tuple(max(p.pads_begin[a] for p in branches) for a in range(n))
    size = tuple(max(begin[a] - p.pads_begin[a] + e[a] for p, e in zip(branches, ext)) for a in range(n))
    largest = max(branches, key=lambda p: math.prod(p.extent))
    if not allow_growth and math.prod(size) > math.prod(largest.extent):
        raise Decline(
            f"misaligned branches: union window {dims_str(size)} is larger than the largest kernel "
            f"{dims_str(largest.extent)}"
        )
    # End pads from the first branch: pad_begin + pad_end - extent stays the same, so does the output.
    end = tuple(first.pads_begin[a] + first.pads_end[a] - ext[0][a] + size[a] - begin[a] for a in range(n))
    if min(end) < 0:
        raise Decline(f"fused conv would need a negative end pad {end}")
    fused = ConvParams(
        weight=np.zeros(first.weight.shape[:2] + size),
        bias=np.zeros(first.out_channels),
        strides=first.strides,
        pads=begin + end,
        group=first.group,
    )
    if input_size is not None:  # one input size: compare the sizes themselves
        if len(input_size) != n:
            raise Decline(f"a {len(input_size)}-D input for {n}-D convs")
        want = first.output_size(*input_size)
        for p in branches[1:]:
            if p.output_size(*input_size) != want:
                raise Decline(f"branch outputs differ in size: {want} vs {p.output_size(*input_size)}")
        if fused.output_size(*input_size) != want:
            raise Decline("fused conv would change the output size")
    else:  # dynamic size: floor((H + slack) / s) + 1 must agree for every H
        want = first.size_slack
        for p in branches[1:]:
            if p.size_slack != want:
                raise Decline(f"branch outputs agree in size only at some input sizes (pads - extent {want} vs "
                              f"{p.size_slack}); they must agree at every input size")
        if fused.size_slack != want:
            raise Decline("fused conv would change the output size at some input sizes")
    offsets = [tuple(begin[a] - p.pads_begin[a] for a in range(n)) for p in branches]
    return fused, offsets


def _window(offset: Sequence[int], extent: Sequence[int]) -> tuple:
    """The index of a window of ``extent`` at ``offset`` in a kernel [Cout, Cin/g, ...]."""
    return (slice(None), slice(None)) + tuple(slice(o, o + e) for o, e in zip(offset, extent))


def _placed(p: ConvParams, window: ConvParams, offset: Sequence[int]) -> np.ndarray:
    """Branch p's kernel (dense) placed at ``offset`` in a zero kernel of ``window``'s size."""
    w = np.zeros(p.weight.shape[:2] + window.kernel_shape)
    w[_window(offset, p.extent)] = dense_kernel(np.asarray(p.weight, np.float64), p.dilations)
    return w


def merge_parallel(
    branches: Sequence[ConvParams],
    allow_growth: bool = False,
    input_size: Optional[Sequence[int]] = None,
) -> ConvParams:
    """Sum of convolutions of one input tensor as one convolution (docs/rules.md §4).

    Kernels are placed in the union window (:func:`common_window`) and summed; biases add.
    """
    for p in branches[1:]:
        if p.weight.shape[0] != branches[0].weight.shape[0]:
            raise Decline(f"different output channels {branches[0].weight.shape[0]} vs {p.weight.shape[0]}")
    window, offsets = common_window(branches, allow_growth, input_size)
    w = np.zeros(branches[0].weight.shape[:2] + window.kernel_shape)
    for p, off in zip(branches, offsets):  # summed in place: no kernel-sized copy per branch
        w[_window(off, p.extent)] += dense_kernel(np.asarray(p.weight, np.float64), p.dilations)
    b = sum(np.asarray(p.bias, np.float64) for p in branches)
    return replace(window, weight=w, bias=b)


def concat_parallel(
    branches: Sequence[ConvParams],
    allow_growth: bool = False,
    input_size: Optional[Sequence[int]] = None,
) -> ConvParams:
    """Concat(axis=1) of convolutions of one input as one convolution (docs/rules.md §5).

    Kernels are placed in the union window (:func:`common_window`) and concatenated along
    Cout. Grouped branches are composed on their dense form and regrouped. A kernel smaller
    than the union window gets zero taps, which the fused conv pays for in MACs: unless
    ``allow_growth``, every branch must already read the whole window.
    """
    dense = [densify_groups(p) for p in branches]
    window, offsets = common_window(dense, allow_growth=allow_growth, input_size=input_size)
    if not allow_growth:
        for p in dense:
            if p.extent != window.kernel_shape:
                raise Decline(
                    f"a {dims_str(p.extent)} branch would be padded to the {dims_str(window.kernel_shape)} "
                    "window: more MACs than the separate convs (--allow-growth allows it)"
                )
    w = np.concatenate([_placed(p, window, off) for p, off in zip(dense, offsets)], axis=0)
    b = np.concatenate([np.asarray(p.bias, np.float64) for p in dense])
    return regroup(replace(window, weight=w, bias=b))


def pad_into_conv(p: ConvParams, *pads: int) -> ConvParams:
    """A constant-zero Pad of the spatial axes before a conv adds to the conv's pads (docs/rules.md §8).

    ``pads`` are the Pad's spatial pads in the conv's order (begins, then ends; for 2-D
    top, left, bottom, right).
    """
    if len(pads) != len(p.pads):
        raise Decline(f"{len(pads)} pads for a {p.ndim}-D conv")
    if min(pads) < 0:
        raise Decline("negative pads (cropping) do not fold into a conv")
    return replace(p, pads=tuple(a + int(b) for a, b in zip(p.pads, pads)))


# --------------------------------------------------------------------------------------
# A conv on a small image as the matrix of an FC (docs/rules.md §13)
# --------------------------------------------------------------------------------------


def conv_patch_blocks(p: ConvParams, size: Sequence[int]) -> np.ndarray:
    """The conv, applied to images of spatial ``size`` with its output the same size, as one
    matrix per group: blocks[g] maps the flattened (channel, position) values of group g's
    inputs to those of its outputs, y_flat = blocks[g] @ x_flat (+ the bias per channel).

    Built entry by entry: output position q reads, through tap t, input position
    q + t * dilation - pad_begin when that lies inside the image (zero padding reads nothing), so
    blocks[g, (o, q), (i, q_in)] = W[g, o, i, t]. No two taps reach the same input position
    from one output position, so every entry is one weight (or 0), exactly. Shape
    [G, (Cout/G) * P, (Cin/G) * P], P the number of positions, in float64, with no temporary as
    large as the result. Declines a stride or pads that change the size.
    """
    size = tuple(int(v) for v in size)
    n = p.ndim
    if len(size) != n:
        raise Decline(f"a {n}-D conv on a {len(size)}-D image")
    k = p.kernel_shape
    for a in range(n):
        if p.strides[a] != 1 or p.pads[a] + p.pads[n + a] != p.dilations[a] * (k[a] - 1):
            raise Decline("the conv changes the image size (stride, or pads other than 'same')")
    g = p.group
    w = np.asarray(p.weight, np.float64)
    cout_g, cin_g = w.shape[0] // g, w.shape[1]
    npos = math.prod(size)
    wg = w.reshape((g, cout_g, cin_g) + tuple(k))
    out = np.zeros((g, cout_g, npos, cin_g, npos))
    where = np.indices(size).reshape(n, npos).T  # [P, n]: each output position's coordinates
    for tap in np.ndindex(*k):
        src = where + np.array([t * d - p.pads[a] for a, (t, d) in enumerate(zip(tap, p.dilations))])
        inside = np.all((src >= 0) & (src < np.array(size)), axis=1)
        q_out = np.nonzero(inside)[0]
        q_in = np.ravel_multi_index(tuple(src[inside].T), size)
        # two index arrays around a slice: the indexed view is [len(q_out), g, Cout/G, Cin/G]
        out[:, :, q_out, :, q_in] += wg[(slice(None), slice(None), slice(None)) + tap]
    return out.reshape(g, cout_g * npos, cin_g * npos)


# --------------------------------------------------------------------------------------
# Cost
# --------------------------------------------------------------------------------------


def conv_macs(p: ConvParams, out_size: Sequence[int]) -> int:
    """Multiply-accumulates of one image: Cout * Cin/g * prod(kernel) * prod(output size)."""
    return math.prod(int(d) for d in p.weight.shape) * math.prod(int(d) for d in out_size)


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
    """conv2(conv1(x)) as one conv, when that is exact (any number of spatial axes, per axis).

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
    if p1.ndim != p2.ndim:
        raise Decline(f"a {p1.ndim}-D conv followed by a {p2.ndim}-D conv")
    if p2.in_channels != p1.out_channels:
        raise Decline(f"channel mismatch {p1.out_channels} -> {p2.in_channels}")
    d1, d2 = densify_groups(p1), densify_groups(p2)
    w1 = dense_kernel(np.asarray(d1.weight, np.float64), p1.dilations)
    w2 = np.asarray(d2.weight, np.float64)
    b1 = np.asarray(p1.bias, np.float64)
    b2 = np.asarray(p2.bias, np.float64)
    if any(p2.pads):
        pointwise = all(k == 1 for k in p1.kernel_shape) and all(s == 1 for s in p1.strides)
        if not pointwise:
            raise Decline("the second conv pads the first conv's output, and the first is not a stride-1 1x1")
        if np.any(b1 != 0):
            raise Decline("the second conv pads with zeros but the first conv's bias is not zero: wrong on the border")
        w = np.einsum("om...,mi->oi...", w2, w1.reshape(w1.shape[:2]), optimize=True)
        pads = tuple(a + b for a, b in zip(p1.pads, p2.pads))
        fused = ConvParams(weight=w, bias=b2.copy(), strides=p2.strides, pads=pads, dilations=p2.dilations)
        return regroup(fused)
    e1 = w1.shape[2:]
    size = tuple((l2 - 1) * d * s1 + e for l2, d, s1, e in zip(p2.kernel_shape, p2.dilations, p1.strides, e1))
    w = np.zeros((w2.shape[0], w1.shape[1]) + size)
    for tap in np.ndindex(*p2.kernel_shape):
        start = tuple(t * d * s1 for t, d, s1 in zip(tap, p2.dilations, p1.strides))
        w[_window(start, e1)] += np.einsum("om,mi...->oi...", w2[(slice(None), slice(None)) + tap], w1, optimize=True)
    b = b2 + np.einsum("oml,m->o", w2.reshape(w2.shape[0], w2.shape[1], -1), b1)
    strides = tuple(a * b for a, b in zip(p1.strides, p2.strides))
    fused = ConvParams(weight=w, bias=b, strides=strides, pads=p1.pads)
    return regroup(fused)


def avgpool_conv(channels: int, kernel, strides, pads, count_include_pad: bool) -> ConvParams:
    """AveragePool(k, s, pads) on C channels as a depthwise conv with weight 1/prod(k) (docs/rules.md §7).

    Exact when there is no padding or the padding counts in the average; Decline otherwise.
    """
    if any(pads) and not count_include_pad:
        raise Decline("AveragePool with padding and count_include_pad=0 divides border windows by fewer taps")
    kernel = tuple(int(k) for k in kernel)
    w = np.full((channels, 1) + kernel, 1.0 / math.prod(kernel))
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
