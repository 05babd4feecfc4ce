"""onnxrep.kernels over 1, 2 and 3 spatial axes, pinned against a direct N-d convolution.

helpers.convnd_ref is first checked against onnxruntime's Conv (and against conv2d_ref in 2-D),
so it can serve as the ground truth; every fusion is then compared with it in float64. Every
case is parameterized by the number of spatial axes and uses geometry that differs per axis
(strides, pads, dilations), so a formula that mixes up two axes, or handles only the first two,
fails here.
"""

import zlib
from dataclasses import replace

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from helpers import conv2d_ref, convnd_params_ref, convnd_ref, run
from onnxrep.kernels import (
    ConvParams,
    Decline,
    affine_after_conv,
    affine_before_conv,
    avgpool_conv,
    common_window,
    compose_sequential,
    concat_parallel,
    conv_patch_blocks,
    conv_macs,
    dense_kernel,
    densify_groups,
    diagonal_conv,
    merge_parallel,
    pad_into_conv,
    regroup,
)

TIGHT = dict(rtol=1e-10, atol=1e-10)  # float64 vs float64
ORT_TOL = dict(rtol=1e-5, atol=1e-5)  # onnxruntime runs in float32
NDIMS = [1, 2, 3]
#: an input size per number of spatial axes, odd and different per axis
SIZES = {1: (13,), 2: (11, 10), 3: (7, 6, 9)}


def rng_for(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def per_axis(n, values):
    """The first n of ``values``: geometry that differs per axis."""
    return tuple(values[:n])


def conv(rng, n, cin, cout, kernel, strides=None, pads=None, dilations=None, group=1, bias=True):
    return ConvParams(
        weight=rng.standard_normal((cout, cin // group) + tuple(kernel)),
        bias=rng.standard_normal(cout) if bias else np.zeros(cout),
        strides=strides or (), pads=pads or (), dilations=dilations or (), group=group,
    )


def image(rng, n, c=4, batch=2):
    return rng.standard_normal((batch, c) + SIZES[n])


def single_node_model(op, x_shape, inits, **attrs):
    tensors = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()]
    graph = helper.make_graph(
        [helper.make_node(op, ["x", *inits], ["y"], **attrs)], op,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * len(x_shape))], tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 8)
    onnx.checker.check_model(model)
    return model


# --------------------------------------------------------------------------------------
# The reference
# --------------------------------------------------------------------------------------

GEOMETRIES = {  # kernel, strides, pads, dilations, group; per axis for 3 axes, cut to n
    "plain": ((3, 3, 3), (1, 1, 1), (1, 1, 1, 1, 1, 1), (1, 1, 1), 1),
    "mixed": ((3, 2, 1), (2, 1, 3), (0, 2, 1, 1, 0, 2), (1, 2, 1), 2),
    "dilated": ((2, 3, 2), (1, 2, 1), (2, 0, 1, 0, 3, 1), (3, 1, 2), 4),
}


def geometry(n, name):
    kernel, strides, pads, dilations, group = GEOMETRIES[name]
    return kernel[:n], strides[:n], pads[:n] + pads[3 : 3 + n], dilations[:n], group


@pytest.mark.parametrize("n", NDIMS)
@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_convnd_ref_matches_onnxruntime(n, name):
    rng = rng_for("ref", n, name)
    kernel, strides, pads, dilations, group = geometry(n, name)
    x = image(rng, n, batch=1)
    w = rng.standard_normal((8, 4 // group) + kernel)
    b = rng.standard_normal(8)
    model = single_node_model("Conv", x.shape, {"w": w, "b": b}, kernel_shape=list(kernel), strides=list(strides),
                              pads=list(pads), dilations=list(dilations), group=group)
    (got,) = run(model, {"x": x.astype(np.float32)})
    np.testing.assert_allclose(got, convnd_ref(x, w, b, strides, pads, dilations, group), **ORT_TOL)


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_convnd_ref_is_conv2d_ref_in_2d(name):
    rng = rng_for("ref2", name)
    kernel, strides, pads, dilations, group = geometry(2, name)
    x, w, b = image(rng, 2), rng.standard_normal((8, 4 // group) + kernel), rng.standard_normal(8)
    np.testing.assert_allclose(convnd_ref(x, w, b, strides, pads, dilations, group),
                               conv2d_ref(x, w, b, strides, pads, dilations, group), **TIGHT)


# --------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", NDIMS)
@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_conv_params_geometry_matches_reference(n, name):
    rng = rng_for("geom", n, name)
    kernel, strides, pads, dilations, group = geometry(n, name)
    p = conv(rng, n, 4, 8, kernel, strides, pads, dilations, group)
    assert p.ndim == n and p.kernel_shape == kernel
    assert p.pads_begin == pads[:n] and p.pads_end == pads[n:]
    x = image(rng, n)
    assert p.output_size(*SIZES[n]) == convnd_params_ref(x, p).shape[2:]
    assert p.extent == tuple((k - 1) * d + 1 for k, d in zip(kernel, dilations))


@pytest.mark.parametrize("n", NDIMS)
def test_conv_params_defaults_follow_the_kernel_rank(n):
    p = ConvParams(weight=np.zeros((2, 2) + (3,) * n), bias=np.zeros(2))
    assert (p.strides, p.pads, p.dilations) == ((1,) * n, (0,) * (2 * n), (1,) * n)
    with pytest.raises(ValueError):
        ConvParams(weight=np.zeros((2, 2) + (3,) * n), bias=np.zeros(2), strides=(1,) * (n + 1))
    with pytest.raises(ValueError):
        ConvParams(weight=np.zeros((2, 2) + (3,) * n), bias=np.zeros(2), pads=(0,) * n)
    with pytest.raises(ValueError):
        p.output_size(*((5,) * (n + 1)))


@pytest.mark.parametrize("n", NDIMS)
def test_conv_macs(n):
    p = ConvParams(weight=np.zeros((6, 2) + per_axis(n, (3, 2, 5))), bias=np.zeros(6), group=2)
    out = per_axis(n, (7, 4, 3))
    assert conv_macs(p, out) == 6 * 2 * int(np.prod(p.kernel_shape)) * int(np.prod(out))


# --------------------------------------------------------------------------------------
# Per-channel affine maps (docs/rules.md §1, §2)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", NDIMS)
@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_conv_then_affine_folds(n, name):
    rng = rng_for("after", n, name)
    kernel, strides, pads, dilations, group = geometry(n, name)
    p = conv(rng, n, 4, 8, kernel, strides, pads, dilations, group)
    scale, shift = rng.uniform(0.5, 1.5, 8), rng.standard_normal(8)
    x = image(rng, n)
    want = convnd_params_ref(x, p) * scale.reshape((1, -1) + (1,) * n) + shift.reshape((1, -1) + (1,) * n)
    np.testing.assert_allclose(convnd_params_ref(x, affine_after_conv(p, scale, shift)), want, **TIGHT)


@pytest.mark.parametrize("n", NDIMS)
@pytest.mark.parametrize("group", [1, 2])
def test_affine_then_unpadded_conv_folds(n, group):
    rng = rng_for("before", n, group)
    p = conv(rng, n, 4, 6, per_axis(n, (3, 1, 2)), strides=per_axis(n, (2, 1, 1)), group=group)
    scale, shift = rng.uniform(0.5, 1.5, 4), rng.standard_normal(4)
    x = image(rng, n)
    shaped = (1, -1) + (1,) * n
    want = convnd_params_ref(x * scale.reshape(shaped) + shift.reshape(shaped), p)
    np.testing.assert_allclose(convnd_params_ref(x, affine_before_conv(p, scale, shift)), want, **TIGHT)


@pytest.mark.parametrize("n", NDIMS)
def test_affine_then_padded_conv_folds_a_scale_and_declines_a_shift(n):
    rng = rng_for("before-pad", n)
    pads = (0,) * (2 * n - 1) + (1,)  # only the last axis' end is padded
    p = conv(rng, n, 4, 6, (3,) * n, pads=pads)
    scale = rng.uniform(0.5, 1.5, 4)
    x = image(rng, n)
    want = convnd_params_ref(x * scale.reshape((1, -1) + (1,) * n), p)
    np.testing.assert_allclose(convnd_params_ref(x, affine_before_conv(p, scale, 0.0)), want, **TIGHT)
    with pytest.raises(Decline, match="border"):
        affine_before_conv(p, scale, rng.standard_normal(4))


# --------------------------------------------------------------------------------------
# Identity as a kernel (docs/rules.md §3) and dilated kernels as dense ones
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", NDIMS)
@pytest.mark.parametrize("group", [1, 2, 4])
def test_diagonal_conv_is_the_per_channel_map(n, group):
    rng = rng_for("diag", n, group)
    scale, shift = rng.uniform(0.5, 1.5, 4), rng.standard_normal(4)
    p = diagonal_conv(scale, shift, group, ndim=n)
    assert p.kernel_shape == (1,) * n and p.group == group
    x = image(rng, n)
    shaped = (1, -1) + (1,) * n
    np.testing.assert_allclose(convnd_params_ref(x, p), x * scale.reshape(shaped) + shift.reshape(shaped), **TIGHT)


@pytest.mark.parametrize("n", NDIMS)
@pytest.mark.parametrize("dilations", [(1, 1, 1), (2, 1, 3), (1, 3, 2)])
def test_dense_kernel_equals_dilated_conv(n, dilations):
    rng = rng_for("dense", n, dilations)
    dilations = dilations[:n]
    w = rng.standard_normal((4, 2) + per_axis(n, (3, 2, 2)))
    pads = per_axis(n, (2, 1, 0)) + per_axis(n, (1, 2, 3))
    dense = dense_kernel(w, dilations)
    assert dense.shape[2:] == tuple((k - 1) * d + 1 for k, d in zip(w.shape[2:], dilations))
    x = image(rng, n)
    np.testing.assert_allclose(convnd_ref(x, dense, None, None, pads, None, 2),
                               convnd_ref(x, w, None, None, pads, dilations, 2), **TIGHT)


# --------------------------------------------------------------------------------------
# Parallel branches (docs/rules.md §4, §5)
# --------------------------------------------------------------------------------------


def centred(rng, n, cin, cout, kernel, stride=1, group=1, dilation=1):
    """A branch whose window is centred ('same' padding per axis)."""
    kernel = tuple(kernel)
    half = tuple(dilation * (k - 1) // 2 for k in kernel)
    return conv(rng, n, cin, cout, kernel, (stride,) * n, half + half, (dilation,) * n, group)


def branch_sets(rng, n):
    """Branch sets that merge exactly: RepVGG (K + 1 + identity), ACNet (K + each axis' 1-D
    kernel), UniRepLKNet-style dilated kernels, stride 2 and groups."""
    acnet = [centred(rng, n, 4, 4, (5,) * n)] + [
        centred(rng, n, 4, 4, tuple(5 if a == b else 1 for b in range(n))) for a in range(n)]
    identity = diagonal_conv(rng.uniform(0.5, 1.5, 4), rng.standard_normal(4), 2, ndim=n)
    return {
        "repvgg": [centred(rng, n, 4, 4, (3,) * n, group=2), centred(rng, n, 4, 4, (1,) * n, group=2), identity],
        "acnet": acnet,
        "dilated": [centred(rng, n, 4, 4, (5,) * n), centred(rng, n, 4, 4, (3,) * n, dilation=2),
                    centred(rng, n, 4, 4, (3,) * n)],
        "stride2": [centred(rng, n, 4, 6, (3,) * n, stride=2), centred(rng, n, 4, 6, (1,) * n, stride=2)],
    }


@pytest.mark.parametrize("n", NDIMS)
@pytest.mark.parametrize("name", ["repvgg", "acnet", "dilated", "stride2"])
def test_merge_parallel_is_exact(n, name):
    rng = rng_for("merge", n, name)
    branches = branch_sets(rng, n)[name]
    merged = merge_parallel(branches)
    largest = max(branches, key=lambda p: np.prod(p.extent))
    assert merged.kernel_shape == largest.extent and merged.ndim == n
    x = image(rng, n)
    want = sum(convnd_params_ref(x, p) for p in branches)
    np.testing.assert_allclose(convnd_params_ref(x, merged), want, **TIGHT)
    assert merge_parallel(branches, input_size=SIZES[n]).pads == merged.pads


@pytest.mark.parametrize("n", NDIMS)
def test_merge_parallel_asymmetric_pads_per_axis(n):
    # Branches whose windows start at different offsets per axis but end inside one window of the
    # largest kernel's size, with pads that differ between axes: exact.
    rng = rng_for("asym", n)
    big = conv(rng, n, 3, 5, (3,) * n, pads=per_axis(n, (1, 2, 0)) + per_axis(n, (1, 0, 2)))
    small = conv(rng, n, 3, 5, (1,) * n)  # unpadded: sits at offset (1, 2, 0) of big's window
    assert small.size_slack == big.size_slack
    merged = merge_parallel([big, small])
    assert merged.kernel_shape == (3,) * n and merged.pads == big.pads
    x = image(rng, n, c=3)
    np.testing.assert_allclose(convnd_params_ref(x, merged),
                               convnd_params_ref(x, big) + convnd_params_ref(x, small), **TIGHT)


@pytest.mark.parametrize("n", NDIMS)
def test_merge_parallel_declines_per_axis_mismatches(n):
    rng = rng_for("declines", n)
    a = centred(rng, n, 4, 4, (3,) * n)
    last = n - 1  # a mismatch on the last axis only: a kernel that looked at two axes would miss it in 3-D
    strides = tuple(2 if i == last else 1 for i in range(n))
    with pytest.raises(Decline, match="strides"):
        merge_parallel([a, replace(centred(rng, n, 4, 4, (1,) * n), strides=strides)])
    # The 1x..x1 branch padded by one more at the end of the last axis: its output is one larger there.
    b = centred(rng, n, 4, 4, (1,) * n)
    longer = replace(b, pads=b.pads[:-1] + (1,))
    with pytest.raises(Decline, match="every input size"):
        merge_parallel([a, longer])
    with pytest.raises(Decline, match="differ in size"):
        merge_parallel([a, longer], input_size=SIZES[n])
    # Misaligned: a second 3x..x3 branch shifted by one on the last axis only (pads (2, 0) there).
    shifted = centred(rng, n, 4, 4, (3,) * n)
    shifted = replace(shifted, pads=tuple(2 if i == last else 0 if i == n + last else p
                                          for i, p in enumerate(shifted.pads)))
    assert shifted.size_slack == a.size_slack
    with pytest.raises(Decline, match="misaligned"):
        merge_parallel([a, shifted])
    grown = merge_parallel([a, shifted], allow_growth=True)
    x = image(rng, n)
    np.testing.assert_allclose(convnd_params_ref(x, grown),
                               convnd_params_ref(x, a) + convnd_params_ref(x, shifted), **TIGHT)
    with pytest.raises(Decline, match="-D"):
        other = 1 if n != 1 else 2
        merge_parallel([a, centred(rng, other, 4, 4, (3,) * other)])


@pytest.mark.parametrize("n", NDIMS)
def test_merge_parallel_static_size_accepts_slacks_that_agree_there(n):
    # stride 2, even size: the 3-wide window with pad (1, 0) and the 1-wide with pad (0, 0)
    # give equal output sizes at even sizes only.
    rng = rng_for("static", n)
    a = conv(rng, n, 2, 3, (3,) * n, (2,) * n, (1,) * n + (0,) * n)
    b = conv(rng, n, 2, 3, (1,) * n, (2,) * n, (0,) * (2 * n))
    even = (8,) * n
    with pytest.raises(Decline):
        merge_parallel([a, b])
    merged = merge_parallel([a, b], input_size=even)
    x = rng.standard_normal((1, 2) + even)
    np.testing.assert_allclose(convnd_params_ref(x, merged), convnd_params_ref(x, a) + convnd_params_ref(x, b),
                               **TIGHT)


@pytest.mark.parametrize("n", NDIMS)
def test_concat_parallel_is_exact(n):
    rng = rng_for("concat", n)
    branches = [centred(rng, n, 4, 3, (3,) * n), centred(rng, n, 4, 2, (1,) * n, group=2)]
    with pytest.raises(Decline, match="window"):
        concat_parallel(branches)
    fused = concat_parallel(branches, allow_growth=True)
    x = image(rng, n)
    want = np.concatenate([convnd_params_ref(x, p) for p in branches], axis=1)
    np.testing.assert_allclose(convnd_params_ref(x, fused), want, **TIGHT)
    same = [centred(rng, n, 4, 3, (3,) * n), centred(rng, n, 4, 2, (3,) * n)]
    np.testing.assert_allclose(convnd_params_ref(x, concat_parallel(same)),
                               np.concatenate([convnd_params_ref(x, p) for p in same], axis=1), **TIGHT)


@pytest.mark.parametrize("n", NDIMS)
def test_common_window_offsets_per_axis(n):
    rng = rng_for("window", n)
    a = conv(rng, n, 2, 2, per_axis(n, (3, 1, 5)), pads=per_axis(n, (1, 0, 2)) * 2)
    b = conv(rng, n, 2, 2, per_axis(n, (1, 3, 3)), pads=per_axis(n, (0, 1, 1)) * 2)
    # a 3x1x5 and a 1x3x3 kernel, both centred: the union is 3x3x5 (a cross, so it grows in 2-D and 3-D)
    window, offsets = common_window([a, b], allow_growth=True)
    assert window.kernel_shape == per_axis(n, (3, 3, 5))
    assert offsets == [per_axis(n, (0, 1, 0)), per_axis(n, (1, 0, 1))]
    x = image(rng, n, c=2)
    np.testing.assert_allclose(convnd_params_ref(x, merge_parallel([a, b], allow_growth=True)),
                               convnd_params_ref(x, a) + convnd_params_ref(x, b), **TIGHT)


# --------------------------------------------------------------------------------------
# Groups, sequential convs, pads and pools (docs/rules.md §6, §7, §8)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", NDIMS)
def test_densify_and_regroup_round_trip(n):
    rng = rng_for("groups", n)
    p = conv(rng, n, 8, 4, per_axis(n, (3, 1, 2)), group=4)
    dense = densify_groups(p)
    assert dense.group == 1
    x = image(rng, n, c=8)
    np.testing.assert_allclose(convnd_params_ref(x, dense), convnd_params_ref(x, p), **TIGHT)
    again = regroup(dense)
    assert again.group == 4
    np.testing.assert_allclose(again.weight, p.weight, **TIGHT)


SEQUENCES = {  # conv1 (kernel, strides, pads, dilations, group), conv2 (same): per axis for 3 axes
    "kxk-then-1x1": (((3, 3, 3), (1, 1, 1), (1, 1, 1, 1, 1, 1), (1, 1, 1), 1), ((1, 1, 1), (1, 1, 1), (0,) * 6, (1, 1, 1), 1)),
    "strided-dilated": (((3, 2, 1), (2, 1, 3), (1, 0, 0, 0, 1, 0), (1, 2, 1), 2),
                        ((2, 3, 2), (1, 2, 1), (0,) * 6, (2, 1, 1), 1)),
    "1x1-then-padded": (((1, 1, 1), (1, 1, 1), (0,) * 6, (1, 1, 1), 1),
                        ((3, 1, 3), (2, 1, 1), (1, 0, 2, 1, 0, 0), (1, 1, 2), 1)),
}


def seq_conv(rng, n, cin, cout, spec, bias=True):
    kernel, strides, pads, dilations, group = spec
    return conv(rng, n, cin, cout, kernel[:n], strides[:n], pads[:n] + pads[3 : 3 + n], dilations[:n], group, bias)


@pytest.mark.parametrize("n", NDIMS)
@pytest.mark.parametrize("name", sorted(SEQUENCES))
def test_compose_sequential_is_exact(n, name):
    rng = rng_for("seq", n, name)
    s1, s2 = SEQUENCES[name]
    p1 = seq_conv(rng, n, 4, 6, s1, bias=name != "1x1-then-padded")
    p2 = seq_conv(rng, n, 6, 5, s2)
    fused = compose_sequential(p1, p2)
    assert fused.ndim == n
    x = image(rng, n)
    np.testing.assert_allclose(convnd_params_ref(x, fused), convnd_params_ref(convnd_params_ref(x, p1), p2), **TIGHT)


@pytest.mark.parametrize("n", NDIMS)
def test_compose_sequential_declines_on_the_border(n):
    rng = rng_for("seq-decline", n)
    one = conv(rng, n, 4, 6, (1,) * n)  # a bias: the zero border of conv2 is not conv1's output there
    padded = conv(rng, n, 6, 5, (3,) * n, pads=(0,) * (2 * n - 1) + (1,))  # padded on one side of the last axis
    with pytest.raises(Decline, match="bias"):
        compose_sequential(one, padded)
    strided = replace(replace(one, bias=np.zeros(6)), strides=tuple(2 if i == n - 1 else 1 for i in range(n)))
    with pytest.raises(Decline, match="1x1"):
        compose_sequential(strided, padded)
    with pytest.raises(Decline, match="-D"):
        other = 1 if n != 1 else 2
        compose_sequential(one, conv(rng, other, 6, 5, (1,) * other))


@pytest.mark.parametrize("n", NDIMS)
def test_pad_into_conv(n):
    rng = rng_for("pad", n)
    p = conv(rng, n, 3, 4, per_axis(n, (3, 2, 1)), pads=per_axis(n, (1, 0, 2)) * 2)
    extra = per_axis(n, (2, 1, 0)) + per_axis(n, (0, 3, 1))
    x = image(rng, n, c=3)
    padded = np.pad(x, [(0, 0), (0, 0)] + list(zip(extra[:n], extra[n:])))
    np.testing.assert_allclose(convnd_params_ref(x, pad_into_conv(p, *extra)), convnd_params_ref(padded, p), **TIGHT)
    with pytest.raises(Decline, match="crop"):
        pad_into_conv(p, *((0,) * (2 * n - 1) + (-1,)))
    with pytest.raises(Decline, match="pads for"):
        pad_into_conv(p, *((0,) * (2 * n + 2)))


@pytest.mark.parametrize("n", NDIMS)
def test_avgpool_conv_matches_onnxruntime(n):
    rng = rng_for("pool", n)
    kernel, strides = per_axis(n, (3, 2, 3)), per_axis(n, (2, 1, 1))
    pads = per_axis(n, (1, 0, 1)) + per_axis(n, (0, 1, 1))
    p = avgpool_conv(4, kernel, strides, pads, count_include_pad=True)
    x = image(rng, n, batch=1)
    model = single_node_model("AveragePool", x.shape, {}, kernel_shape=list(kernel), strides=list(strides),
                              pads=list(pads), count_include_pad=1)
    (got,) = run(model, {"x": x.astype(np.float32)})
    np.testing.assert_allclose(got, convnd_params_ref(x, p), **ORT_TOL)
    with pytest.raises(Decline, match="count_include_pad"):
        avgpool_conv(4, kernel, strides, pads, count_include_pad=False)


# --------------------------------------------------------------------------------------
# Properties: random geometry per axis, any number of axes
# --------------------------------------------------------------------------------------

PROPERTY = settings(max_examples=80, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])


@st.composite
def parallel_branches(draw):
    """2-3 branches over n random axes with one stride and, per axis, one output-size slack
    (so they may be summed at every size), each with its own kernel, dilation and pads."""
    n = draw(st.sampled_from(NDIMS))
    strides = tuple(draw(st.integers(1, 2)) for _ in range(n))
    slack = tuple(draw(st.integers(-3, 0)) for _ in range(n))
    branches = []
    for _ in range(draw(st.integers(2, 3))):
        kernel = tuple(draw(st.integers(1, 4)) for _ in range(n))
        dil = tuple(draw(st.integers(1, 2)) for _ in range(n))
        ext = tuple((k - 1) * d + 1 for k, d in zip(kernel, dil))
        begin = tuple(draw(st.integers(0, 3)) for _ in range(n))
        end = tuple(sl + e - b for sl, e, b in zip(slack, ext, begin))
        assume(min(end) >= 0)
        seed = draw(st.integers(0, 2**16))
        rng = np.random.default_rng(seed)
        branches.append(ConvParams(weight=rng.standard_normal((3, 2) + kernel), bias=rng.standard_normal(3),
                                   strides=strides, pads=begin + end, dilations=dil))
    size = tuple(draw(st.integers(max(p.extent[a] for p in branches), 9)) for a in range(n))
    return branches, size


@PROPERTY
@given(case=parallel_branches(), allow_growth=st.booleans())
def test_merge_parallel_is_exact_or_declines(case, allow_growth):
    branches, size = case
    rng = np.random.default_rng(0)
    for input_size in (None, size):
        try:
            merged = merge_parallel(branches, allow_growth=allow_growth, input_size=input_size)
        except Decline:
            # equal strides and slacks: with growth allowed the union window always fits
            # (each end pad is at least that branch's own), so only a grown window declines
            assert not allow_growth or input_size is not None
            continue
        assert merged.ndim == branches[0].ndim
        if not allow_growth:
            assert np.prod(merged.kernel_shape) <= max(np.prod(p.extent) for p in branches)
        for grow in (0, 1):  # at another size too: the slack argument holds for every size
            x = rng.standard_normal((1, 2) + tuple(s + grow for s in size))
            if input_size is not None and grow:
                continue  # merged for this size only
            np.testing.assert_allclose(convnd_params_ref(x, merged),
                                       sum(convnd_params_ref(x, p) for p in branches), **TIGHT)


@st.composite
def sequential_pairs(draw):
    n = draw(st.sampled_from(NDIMS))

    def axes(lo, hi):
        return tuple(draw(st.integers(lo, hi)) for _ in range(n))

    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    pointwise = draw(st.booleans())
    k1 = (1,) * n if pointwise else axes(1, 3)
    p1 = ConvParams(weight=rng.standard_normal((4, 2) + k1), bias=rng.standard_normal(4) * draw(st.sampled_from([0, 1])),
                    strides=(1,) * n if pointwise else axes(1, 2), pads=axes(0, 2) + axes(0, 2),
                    dilations=axes(1, 2))
    padded = draw(st.booleans())
    p2 = ConvParams(weight=rng.standard_normal((3, 4) + axes(1, 3)), bias=rng.standard_normal(3),
                    strides=axes(1, 2), pads=axes(0, 2) + axes(0, 2) if padded else (0,) * (2 * n),
                    dilations=axes(1, 2))
    return p1, p2


@PROPERTY
@given(pair=sequential_pairs())
def test_compose_sequential_is_exact_or_declines(pair):
    p1, p2 = pair
    try:
        fused = compose_sequential(p1, p2)
    except Decline:
        assert any(p2.pads)  # an unpadded second conv always composes
        return
    rng = np.random.default_rng(1)
    for size in (9, 10):
        x = rng.standard_normal((1, 2) + (size + 3,) * p1.ndim)
        y1 = convnd_params_ref(x, p1)
        if min(y1.shape[2:]) < max(p2.extent):
            continue
        np.testing.assert_allclose(convnd_params_ref(x, fused), convnd_params_ref(y1, p2), **TIGHT)


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("group, cin, cout", [(1, 2, 3), (2, 4, 4), (4, 4, 4)])
def test_conv_patch_blocks_equal_the_conv_on_that_image(ndim, group, cin, cout):
    """Each group's block, applied to the flattened (channel, position) values, is the conv of
    the image (zero padding, dilation, kernels longer than the image included)."""
    rng = np.random.default_rng(zlib.crc32(f"patch{ndim}{group}{cin}".encode()))
    size = (5, 3, 2)[:ndim]
    k = (3, 5, 1)[:ndim]
    dil = (2, 1, 1)[:ndim]
    pads = tuple(d * (kk - 1) // 2 for d, kk in zip(dil, k)) * 2
    p = ConvParams(rng.standard_normal((cout, cin // group) + k), np.zeros(cout), pads=pads, dilations=dil, group=group)
    x = rng.standard_normal((2, cin) + size)
    y = convnd_params_ref(x, p)
    blocks = conv_patch_blocks(p, size)
    npos = int(np.prod(size))
    assert blocks.shape == (group, cout // group * npos, cin // group * npos)
    xg = x.reshape(2, group, cin // group * npos)
    got = np.einsum("gij,ngj->ngi", blocks, xg).reshape(y.shape)
    np.testing.assert_allclose(got, y, **TIGHT)


@pytest.mark.parametrize("pads", [(0, 0, 1, 1), (1, 0, 0, 1)], ids=["end", "mixed"])
def test_conv_patch_blocks_with_uneven_same_padding(pads):
    """An even kernel keeps the size with pads on one side only: the block reads from where the
    padding begins."""
    rng = np.random.default_rng(zlib.crc32(repr(pads).encode()))
    p = ConvParams(rng.standard_normal((4, 2, 2, 2)), np.zeros(4), pads=pads, group=2)
    x = rng.standard_normal((1, 4, 3, 4))
    y = convnd_params_ref(x, p)
    got = np.einsum("gij,ngj->ngi", conv_patch_blocks(p, (3, 4)), x.reshape(1, 2, 2 * 12)).reshape(y.shape)
    np.testing.assert_allclose(got, y, **TIGHT)


def test_conv_patch_blocks_decline_a_conv_that_resizes():
    p = ConvParams(np.ones((2, 2, 3, 3)), np.zeros(2), pads=(0, 0, 0, 0))
    with pytest.raises(Decline):
        conv_patch_blocks(p, (4, 4))
    with pytest.raises(Decline):
        conv_patch_blocks(replace(p, pads=(1, 1, 1, 1), strides=(2, 1)), (4, 4))
