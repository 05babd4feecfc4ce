"""onnxrep.kernels pinned against a direct convolution (helpers.conv2d_ref), never against itself.

conv2d_ref is first checked against onnxruntime's Conv, so it can serve as the ground truth;
everything else is compared in float64 with tight tolerances.
"""

import zlib
from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import conv2d_ref, conv_params_ref, convnd_params_ref, run
from onnxrep.kernels import (
    ConvParams,
    Decline,
    affine_after_conv,
    affine_after_conv_transpose,
    affine_after_matmul,
    bn_affine,
    conv_macs,
    dense_kernel,
    channel_affine_of,
    diagonal_conv,
    merge_parallel,
    pad_into_conv,
)

TIGHT = dict(rtol=1e-10, atol=1e-10)  # float64 vs float64
ORT_TOL = dict(rtol=1e-5, atol=1e-5)  # onnxruntime runs in float32


def rng_for(*key):
    """A seeded generator per test case, so cases do not depend on each other's draws."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def four(pad):
    return (pad,) * 4 if isinstance(pad, int) else tuple(pad)


def single_node_model(op, x_shape, w, b=None, **attrs):
    """A float32 ONNX model with one Conv / ConvTranspose node: x -> y."""
    inits = [numpy_helper.from_array(np.asarray(w, np.float32), "w")]
    inputs = ["x", "w"]
    if b is not None:
        inits.append(numpy_helper.from_array(np.asarray(b, np.float32), "b"))
        inputs.append("b")
    graph = helper.make_graph(
        [helper.make_node(op, inputs, ["y"], **attrs)],
        op,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * len(x_shape))],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 8)
    onnx.checker.check_model(model)
    return model


# --------------------------------------------------------------------------------------
# Conv geometries shared by the reference check and the affine folds.
# --------------------------------------------------------------------------------------

# id: cin, cout, kernel (kh, kw), strides, pads (t, l, b, r), dilations, group, input (h, w)
GEOMETRIES = {
    "plain": (3, 5, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, (8, 8)),
    "grouped_g2": (4, 6, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 2, (7, 8)),
    "depthwise": (6, 6, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 6, (7, 9)),
    "depthwise_multiplier2": (3, 6, (5, 5), (1, 1), (2, 2, 2, 2), (1, 1), 3, (7, 6)),
    "strided": (3, 4, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1, (7, 9)),
    "strided_rect_grouped": (4, 4, (2, 3), (2, 1), (0, 1, 1, 1), (1, 1), 2, (9, 7)),
    "dilated": (3, 4, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2), 1, (9, 9)),
    "dilated_rect_grouped": (4, 6, (3, 2), (1, 2), (1, 0, 3, 2), (2, 3), 2, (10, 11)),
    "asym_pads": (3, 4, (3, 3), (1, 1), (0, 2, 1, 0), (1, 1), 1, (6, 7)),
    "asym_strided_dilated_grouped": (4, 8, (3, 3), (2, 2), (2, 0, 0, 1), (2, 1), 4, (9, 8)),
}


def random_conv(rng, geometry, dtype=np.float64):
    cin, cout, (kh, kw), strides, pads, dilations, group, hw = geometry
    p = ConvParams(
        weight=rng.standard_normal((cout, cin // group, kh, kw)).astype(dtype),
        bias=rng.standard_normal(cout).astype(dtype),
        strides=strides,
        pads=pads,
        dilations=dilations,
        group=group,
    )
    x = rng.standard_normal((2, cin) + hw).astype(dtype)
    return p, x


@pytest.mark.parametrize("name", GEOMETRIES)
def test_conv2d_ref_matches_onnxruntime(name):
    p, x = random_conv(rng_for("ort", name), GEOMETRIES[name], np.float32)
    model = single_node_model(
        "Conv", x.shape, p.weight, p.bias,
        kernel_shape=list(p.kernel_shape), strides=list(p.strides), pads=list(p.pads),
        dilations=list(p.dilations), group=p.group,
    )
    (y_ort,) = run(model, {"x": x})
    np.testing.assert_allclose(y_ort, conv_params_ref(x, p), **ORT_TOL)


@pytest.mark.parametrize("name", GEOMETRIES)
def test_conv_params_geometry_matches_reference(name):
    p, x = random_conv(rng_for("geom", name), GEOMETRIES[name])
    cin, _, (kh, kw), _, _, (dh, dw), _, hw = GEOMETRIES[name]
    assert p.in_channels == cin
    assert p.extent == ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
    assert p.output_size(*hw) == conv_params_ref(x, p).shape[2:]


# --------------------------------------------------------------------------------------
# Batch normalization / per-channel affine after a conv (docs/rules.md §1, §2)
# --------------------------------------------------------------------------------------


def random_bn(rng, c):
    return dict(
        gamma=rng.uniform(0.5, 1.5, c), beta=rng.standard_normal(c),
        mean=rng.standard_normal(c), var=rng.uniform(0.1, 2.0, c), eps=1e-3,
    )


def bn_direct(y, gamma, beta, mean, var, eps):
    c = lambda a: np.asarray(a)[None, :, None, None]  # noqa: E731
    return (y - c(mean)) / np.sqrt(c(var) + eps) * c(gamma) + c(beta)


@pytest.mark.parametrize("name", GEOMETRIES)
def test_conv_then_bn_folds(name):
    rng = rng_for("bn", name)
    p, x = random_conv(rng, GEOMETRIES[name])
    bn = random_bn(rng, p.out_channels)
    expected = bn_direct(conv_params_ref(x, p), **bn)

    folded = affine_after_conv(p, *bn_affine(**bn))
    assert folded.weight.shape == p.weight.shape
    assert (folded.strides, folded.pads, folded.dilations, folded.group) == (p.strides, p.pads, p.dilations, p.group)
    np.testing.assert_allclose(conv_params_ref(x, folded), expected, **TIGHT)


def test_bn_affine_is_batchnorm():
    rng = rng_for("bn_affine")
    bn = random_bn(rng, 5)
    x = rng.standard_normal((2, 5, 3, 4))
    scale, shift = bn_affine(**bn)
    np.testing.assert_allclose(x * scale[:, None, None] + shift[:, None, None], bn_direct(x, **bn), **TIGHT)


def test_affine_after_conv_scalar_broadcasts():
    rng = rng_for("scalar")
    p, x = random_conv(rng, GEOMETRIES["grouped_g2"])
    folded = affine_after_conv(p, -0.75, 0.25)
    np.testing.assert_allclose(conv_params_ref(x, folded), conv_params_ref(x, p) * -0.75 + 0.25, **TIGHT)


# --------------------------------------------------------------------------------------
# ConvTranspose -> affine
# --------------------------------------------------------------------------------------


def conv_transpose_ref(x, w, b, strides, pads, dilations, group):
    """Direct ConvTranspose (scatter every input pixel through every tap), float64, no output_padding."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    n, cin, h, wd = x.shape
    _, cout_g, kh, kw = w.shape
    cin_g = cin // group
    (sh, sw), (dh, dw) = strides, dilations
    full = np.zeros((n, cout_g * group, (h - 1) * sh + (kh - 1) * dh + 1, (wd - 1) * sw + (kw - 1) * dw + 1))
    for g in range(group):
        xs, ws = x[:, g * cin_g : (g + 1) * cin_g], w[g * cin_g : (g + 1) * cin_g]
        for i in range(kh):
            for j in range(kw):
                rows = slice(i * dh, i * dh + (h - 1) * sh + 1, sh)
                cols = slice(j * dw, j * dw + (wd - 1) * sw + 1, sw)
                full[:, g * cout_g : (g + 1) * cout_g, rows, cols] += np.einsum("nchw,co->nohw", xs, ws[:, :, i, j])
    t, l, bo, r = pads
    y = full[:, :, t : full.shape[2] - bo, l : full.shape[3] - r]
    return y if b is None else y + np.asarray(b, np.float64)[None, :, None, None]


# id: cin, cout, kernel, strides, pads, dilations, group, input (h, w)
CONV_TRANSPOSE_CASES = {
    "g1": (3, 4, (3, 3), (2, 2), (1, 0, 0, 1), (1, 2), 1, (4, 5)),
    "g2": (4, 6, (2, 3), (2, 1), (0, 1, 1, 0), (1, 1), 2, (5, 4)),
    "depthwise": (4, 4, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 4, (4, 4)),
}


def random_conv_transpose(rng, case, with_bias=True):
    cin, cout, (kh, kw), strides, pads, dilations, group, hw = case
    w = rng.standard_normal((cin, cout // group, kh, kw)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32) if with_bias else None
    x = rng.standard_normal((2, cin) + hw).astype(np.float32)
    attrs = dict(kernel_shape=[kh, kw], strides=list(strides), pads=list(pads), dilations=list(dilations), group=group)
    return w, b, x, attrs


@pytest.mark.parametrize("name", CONV_TRANSPOSE_CASES)
def test_conv_transpose_ref_matches_onnxruntime(name):
    w, b, x, attrs = random_conv_transpose(rng_for("ct_ref", name), CONV_TRANSPOSE_CASES[name])
    (y_ort,) = run(single_node_model("ConvTranspose", x.shape, w, b, **attrs), {"x": x})
    y_ref = conv_transpose_ref(x, w, b, attrs["strides"], attrs["pads"], attrs["dilations"], attrs["group"])
    np.testing.assert_allclose(y_ort, y_ref, **ORT_TOL)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("name", CONV_TRANSPOSE_CASES)
def test_conv_transpose_then_affine_folds(name, with_bias):
    rng = rng_for("ct_fold", name, with_bias)
    w, b, x, attrs = random_conv_transpose(rng, CONV_TRANSPOSE_CASES[name], with_bias)
    cout = w.shape[1] * attrs["group"]
    scale, shift = rng.uniform(0.5, 2.0, cout), rng.standard_normal(cout)
    aff = lambda y: y * scale[None, :, None, None] + shift[None, :, None, None]  # noqa: E731

    w2, b2 = affine_after_conv_transpose(w, b, attrs["group"], scale, shift)
    assert w2.shape == w.shape and b2.shape == (cout,)
    # onnxruntime ConvTranspose then the affine map in numpy, vs the folded ConvTranspose.
    (y_ort,) = run(single_node_model("ConvTranspose", x.shape, w, b, **attrs), {"x": x})
    (y_fold,) = run(single_node_model("ConvTranspose", x.shape, w2, b2, **attrs), {"x": x})
    np.testing.assert_allclose(y_fold, aff(y_ort.astype(np.float64)), **ORT_TOL)
    # The same in float64 with the direct reference.
    geo = (attrs["strides"], attrs["pads"], attrs["dilations"], attrs["group"])
    np.testing.assert_allclose(conv_transpose_ref(x, w2, b2, *geo), aff(conv_transpose_ref(x, w, b, *geo)), **TIGHT)


# --------------------------------------------------------------------------------------
# MatMul / Gemm -> affine
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("scalar", [False, True])
def test_matmul_then_affine_folds(with_bias, scalar):
    rng = rng_for("matmul", with_bias, scalar)
    k, m = 5, 7
    x = rng.standard_normal((2, 3, k))
    w = rng.standard_normal((k, m))
    b = rng.standard_normal(m) if with_bias else None
    scale, shift = (1.7, -0.3) if scalar else (rng.uniform(0.5, 2.0, m), rng.standard_normal(m))
    expected = (x @ w + (0 if b is None else b)) * scale + shift

    w2, b2 = affine_after_matmul(w, b, scale, shift)
    np.testing.assert_allclose(x @ w2 + b2, expected, **TIGHT)


# --------------------------------------------------------------------------------------
# Identity / per-channel branches (docs/rules.md §3)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("group", [1, 2, 3, 6])
def test_diagonal_conv_identity_is_exact(group):
    x = rng_for("identity", group).standard_normal((2, 6, 5, 7))
    p = diagonal_conv(np.ones(6), 0.0, group)
    assert p.weight.shape == (6, 6 // group, 1, 1) and p.group == group
    np.testing.assert_array_equal(conv_params_ref(x, p), x)


@pytest.mark.parametrize("group", [1, 2, 6])
def test_diagonal_conv_per_channel_affine(group):
    rng = rng_for("diag", group)
    x = rng.standard_normal((2, 6, 5, 7))
    scale, shift = rng.standard_normal(6), rng.standard_normal(6)
    y = conv_params_ref(x, diagonal_conv(scale, shift, group))
    np.testing.assert_allclose(y, x * scale[:, None, None] + shift[:, None, None], **TIGHT)


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("group", [1, 2, 6])
def test_channel_affine_of_inverts_the_conv(ndim, group):
    """A diagonal 1x1 conv (depthwise, block-diagonal or dense) read back as x * scale + shift,
    checked against the direct convolution of the conv itself (dilation is irrelevant at 1x1)."""
    rng = rng_for("affine_of", ndim * 10 + group)
    scale, shift = rng.standard_normal(6), rng.standard_normal(6)
    p = replace(diagonal_conv(scale, shift, group, ndim), dilations=(2,) * ndim)
    x = rng.standard_normal((2, 6) + (5, 4, 3)[:ndim])
    got = channel_affine_of(p)
    assert got is not None
    s, t = (v.reshape((1, 6) + (1,) * ndim) for v in got)
    np.testing.assert_allclose(x * s + t, convnd_params_ref(x, p), **TIGHT)


@pytest.mark.parametrize("change", ["mixes channels", "mixes channels in a group", "stride", "pads", "3x1 window",
                                    "fewer outputs"])
def test_channel_affine_of_declines_what_is_not_per_channel(change):
    rng = rng_for("affine_of_no", len(change))
    p = diagonal_conv(rng.standard_normal(4), rng.standard_normal(4), group=1)
    if change == "mixes channels":
        w = p.weight.copy()
        w[0, 1, 0, 0] = 1e-30  # any off-diagonal tap, however small
        p = replace(p, weight=w)
    elif change == "mixes channels in a group":
        p = diagonal_conv(rng.standard_normal(4), rng.standard_normal(4), group=2)  # weight [4, 2, 1, 1]
        w = p.weight.copy()
        w[3, 0, 0, 0] = 1e-30  # output 3 reading input 2, inside its group
        p = replace(p, weight=w)
    elif change == "stride":
        p = replace(p, strides=(1, 2))
    elif change == "pads":
        p = replace(p, pads=(0, 1, 0, 0))
    elif change == "3x1 window":
        p = replace(p, weight=np.pad(p.weight, [(0, 0), (0, 0), (1, 1), (0, 0)]))
    else:
        p = replace(p, weight=p.weight[:3], bias=p.bias[:3])
    assert channel_affine_of(p) is None


@pytest.mark.parametrize("channels, group", [(6, 4), (5, 2), (3, 6)])
def test_diagonal_conv_declines_uneven_groups(channels, group):
    with pytest.raises(Decline):
        diagonal_conv(np.ones(channels), 0.0, group)


# --------------------------------------------------------------------------------------
# Dilated kernels as dense kernels
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", [(3, 3), (2, 3)])
@pytest.mark.parametrize("dilations", [(1, 1), (2, 2), (1, 3), (3, 2)])
@pytest.mark.parametrize("strides, pads, group", [((1, 1), (2, 2, 2, 2), 1), ((2, 1), (0, 3, 1, 0), 2)])
def test_dense_kernel_equals_dilated_conv(kernel, dilations, strides, pads, group):
    rng = rng_for("dense", kernel, dilations, strides, pads, group)
    w = rng.standard_normal((4, 4 // group) + kernel)
    x = rng.standard_normal((1, 4, 12, 13))
    dense = dense_kernel(w, dilations)
    (kh, kw), (dh, dw) = kernel, dilations
    assert dense.shape == (4, 4 // group, (kh - 1) * dh + 1, (kw - 1) * dw + 1)
    # Same input window, so the same pads; the dense kernel runs with dilation 1.
    np.testing.assert_allclose(
        conv2d_ref(x, dense, None, strides, pads, (1, 1), group),
        conv2d_ref(x, w, None, strides, pads, dilations, group),
        **TIGHT,
    )


# --------------------------------------------------------------------------------------
# Parallel branches (docs/rules.md §4)
# --------------------------------------------------------------------------------------

ID = "identity"


def K(kh, kw, pad, d=1):
    """Spec of one conv branch: kernel, pads (int or (t, l, b, r)), dilation."""
    return (kh, kw, four(pad), d)


def make_branches(rng, cin, cout, group, stride, specs):
    out = []
    for spec in specs:
        if spec == ID:  # a BN'd identity branch
            p = diagonal_conv(rng.uniform(0.5, 1.5, cout), rng.standard_normal(cout), group)
            out.append(replace(p, strides=(stride, stride)))
            continue
        kh, kw, pads, d = spec
        out.append(ConvParams(
            weight=rng.standard_normal((cout, cin // group, kh, kw)),
            bias=rng.standard_normal(cout),
            strides=(stride, stride), pads=pads, dilations=(d, d), group=group,
        ))
    return out


def acnet(k):
    return [K(k, k, k // 2), K(1, k, (0, k // 2, 0, k // 2)), K(k, 1, (k // 2, 0, k // 2, 0))]


UNIREPLK = [K(7, 7, 3), K(5, 5, 2), K(3, 3, 2, d=2), K(3, 3, 3, d=3)]

# id: cin, cout, group, stride, input (h, w), branches, merged kernel shape (the largest extent)
MERGE_CASES = {
    "repvgg": (4, 4, 1, 1, (8, 8), [K(3, 3, 1), K(1, 1, 0), ID], (3, 3)),
    "repvgg_identity_first": (4, 4, 1, 1, (6, 7), [ID, K(1, 1, 0), K(3, 3, 1)], (3, 3)),
    "repvgg_down_odd": (3, 5, 1, 2, (7, 9), [K(3, 3, 1), K(1, 1, 0)], (3, 3)),
    "repvgg_down_1x1_first": (3, 5, 1, 2, (9, 7), [K(1, 1, 0), K(3, 3, 1)], (3, 3)),
    "acnet3": (3, 4, 1, 1, (8, 8), acnet(3), (3, 3)),
    "acnet3_s2_odd": (3, 4, 1, 2, (7, 9), acnet(3), (3, 3)),
    "acnet5": (3, 4, 1, 1, (8, 9), acnet(5), (5, 5)),
    "acnet5_s2_odd": (3, 4, 1, 2, (7, 9), acnet(5), (5, 5)),
    "acnet5_s2_odd_1xk_first": (3, 4, 1, 2, (9, 7), acnet(5)[::-1], (5, 5)),
    "unireplk_dilated_dw": (4, 4, 4, 1, (11, 10), UNIREPLK, (7, 7)),
    "unireplk_dilated_dw_s2_odd": (4, 4, 4, 2, (11, 9), UNIREPLK[::-1], (7, 7)),
    "dilated_dense_mix": (3, 4, 1, 1, (9, 9), [K(3, 3, 2, d=2), K(3, 3, 1), K(1, 1, 0)], (5, 5)),
    "grouped_g2": (4, 4, 2, 1, (6, 6), [K(3, 3, 1), K(1, 1, 0), ID], (3, 3)),
    "grouped_g2_s2_odd": (4, 6, 2, 2, (7, 9), [K(3, 3, 1), K(1, 1, 0)], (3, 3)),
    "depthwise": (6, 6, 6, 1, (7, 9), [K(3, 3, 1), K(1, 1, 0), ID], (3, 3)),
    "asym_2x2_end_pad": (3, 4, 1, 1, (7, 9), [K(2, 2, (0, 0, 1, 1)), K(1, 1, 0)], (2, 2)),
    "asym_2x2_end_pad_s2_odd": (3, 4, 1, 2, (7, 9), [K(2, 2, (0, 0, 1, 1)), K(1, 1, 0)], (2, 2)),
    "asym_2x2_begin_pad": (3, 4, 1, 1, (7, 9), [K(1, 1, 0), K(2, 2, (1, 1, 0, 0))], (2, 2)),
    "rect_kernels": (3, 4, 1, 1, (6, 9), [K(3, 5, (1, 2, 1, 2)), K(1, 3, (0, 1, 0, 1)), K(3, 1, (1, 0, 1, 0))], (3, 5)),
}


def check_merge_exact(branches, x, merged):
    """The merged conv's output equals the sum of the branch outputs (shape included)."""
    outs = [conv_params_ref(x, p) for p in branches]
    assert all(o.shape == outs[0].shape for o in outs), "test case bug: branch outputs differ in shape"
    y = conv_params_ref(x, merged)
    assert y.shape == outs[0].shape, f"merged output {y.shape} != branch output {outs[0].shape}"
    np.testing.assert_allclose(y, sum(outs), **TIGHT)


@pytest.mark.parametrize("name", MERGE_CASES)
def test_merge_parallel_is_exact(name):
    cin, cout, group, stride, hw, specs, kernel = MERGE_CASES[name]
    rng = rng_for("merge", name)
    branches = make_branches(rng, cin, cout, group, stride, specs)
    saved = [(p.weight.copy(), p.bias.copy()) for p in branches]
    x = rng.standard_normal((2, cin) + hw)

    merged = merge_parallel(branches)
    assert merged.kernel_shape == kernel
    assert (merged.strides, merged.dilations, merged.group) == ((stride, stride), (1, 1), group)
    np.testing.assert_allclose(merged.bias, sum(p.bias for p in branches), **TIGHT)
    check_merge_exact(branches, x, merged)

    # Checking the output size for this input changes nothing.
    again = merge_parallel(branches, input_size=hw)
    np.testing.assert_array_equal(again.weight, merged.weight)
    assert again.pads == merged.pads
    # The branches are left untouched.
    for p, (w, b) in zip(branches, saved):
        np.testing.assert_array_equal(p.weight, w)
        np.testing.assert_array_equal(p.bias, b)


MISALIGNED = {
    # id: cin, cout, group, input (h, w), branches, union window, whether that window grows
    "shifted_3x3": (3, 4, 1, (7, 9), [K(3, 3, 1), K(3, 3, (0, 0, 2, 2))], (4, 4), True),
    "cross_without_square": (3, 4, 1, (8, 7), [K(1, 3, (0, 1, 0, 1)), K(3, 1, (1, 0, 1, 0))], (3, 3), True),
    # Off-centre, but inside the 3x3: aligned, so no growth is needed.
    "corner_1x1_dw": (4, 4, 4, (7, 6), [K(3, 3, (2, 2, 0, 0)), K(1, 1, 0)], (3, 3), False),
}


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name", MISALIGNED)
def test_merge_parallel_misaligned(name, stride):
    cin, cout, group, hw, specs, window, grows = MISALIGNED[name]
    rng = rng_for("misaligned", name, stride)
    branches = make_branches(rng, cin, cout, group, stride, specs)
    x = rng.standard_normal((2, cin) + hw)
    if grows:
        with pytest.raises(Decline, match="misaligned"):
            merge_parallel(branches)
        merged = merge_parallel(branches, allow_growth=True)
    else:
        merged = merge_parallel(branches)
    assert merged.kernel_shape == window
    check_merge_exact(branches, x, merged)


def conv(cout, cin, k, pads=0, stride=1, group=1, d=1):
    return ConvParams(
        weight=np.ones((cout, cin // group, k, k)), bias=np.zeros(cout),
        strides=(stride, stride), pads=four(pads), dilations=(d, d), group=group,
    )


@pytest.mark.parametrize(
    "branches, match",
    [
        pytest.param([conv(4, 4, 3, 1)], "fewer", id="single_branch"),
        pytest.param([conv(4, 4, 3, 1), conv(4, 4, 1, 0, stride=2)], "strides", id="strides"),
        pytest.param([conv(4, 4, 3, 1), conv(4, 4, 3, 1, group=2)], "groups", id="groups"),
        pytest.param([conv(4, 4, 3, 1), conv(4, 8, 1, 0, group=2)], "groups", id="groups_same_weight_shape"),
        pytest.param([conv(4, 4, 3, 1), conv(6, 4, 1, 0)], "channel", id="cout"),
        pytest.param([conv(4, 4, 3, 1), conv(4, 2, 1, 0)], "channel", id="cin"),
        pytest.param([conv(4, 4, 3, 1), conv(4, 4, 3, (0, 0, 2, 2))], "misaligned", id="misaligned"),
        # With non-negative pads the fused end pad is >= the first branch's end pad, so only a
        # first branch that crops (negative end pad) can reach this decline.
        pytest.param([conv(4, 4, 2, (0, 0, -1, -1)), conv(4, 4, 1, (0, 0, -2, -2))], "negative", id="negative_end_pad"),
    ],
)
def test_merge_parallel_declines(branches, match):
    with pytest.raises(Decline, match=match):
        merge_parallel(branches)


@pytest.mark.parametrize(
    "branches, hw",
    [
        pytest.param([conv(4, 4, 3, 0), conv(4, 4, 1, 0)], (8, 8), id="valid_3x3_plus_1x1"),
        # Stride 2: same output size on even inputs, different on odd ones (the floor).
        pytest.param([conv(4, 4, 3, (1, 1, 0, 0), stride=2), conv(4, 4, 1, 0, stride=2)], (7, 9), id="s2_odd"),
        pytest.param([conv(4, 4, 3, (1, 1, 0, 0), stride=2), conv(4, 4, 1, 0, stride=2)], (8, 9), id="s2_odd_w"),
    ],
)
def test_merge_parallel_declines_when_output_sizes_differ(branches, hw):
    with pytest.raises(Decline, match="differ"):
        merge_parallel(branches, input_size=hw)


@pytest.mark.parametrize("order", [1, -1])
def test_merge_parallel_stride2_floor_even_input_is_exact(order):
    """The branches of the s2_odd decline above agree on even inputs; there the merge is exact.

    Their pad_t + pad_b - extent differ, so the output sizes differ on odd inputs: the merged
    conv must keep the first branch's output size for every input size (the docstring's promise).
    """
    rng = rng_for("floor", order)
    branches = make_branches(rng, 3, 4, 1, 2, [K(3, 3, (1, 1, 0, 0)), K(1, 1, 0)])[::order]
    merged = merge_parallel(branches, input_size=(8, 10))
    assert merged.kernel_shape == (3, 3)
    check_merge_exact(branches, rng.standard_normal((2, 3, 8, 10)), merged)
    for hw in [(7, 9), (8, 9), (9, 10), (5, 5)]:
        x = np.zeros((1, 3) + hw)
        assert conv_params_ref(x, merged).shape == conv_params_ref(x, branches[0]).shape, hw


# --------------------------------------------------------------------------------------
# Pad -> Conv (docs/rules.md §8)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [(0, 0, 0, 0), (1, 2, 0, 3), (2, 2, 2, 2), (0, 0, 1, 0)])
@pytest.mark.parametrize("name", ["plain", "strided", "asym_strided_dilated_grouped", "dilated_rect_grouped"])
def test_pad_into_conv(name, extra):
    p, x = random_conv(rng_for("pad", name, extra), GEOMETRIES[name])
    t, l, b, r = extra
    padded = np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)))
    np.testing.assert_allclose(conv_params_ref(x, pad_into_conv(p, *extra)), conv_params_ref(padded, p), **TIGHT)


@pytest.mark.parametrize("extra", [(-1, 0, 0, 0), (0, -1, 0, 0), (0, 0, -1, 0), (0, 0, 0, -2)])
def test_pad_into_conv_declines_cropping(extra):
    p, _ = random_conv(rng_for("crop"), GEOMETRIES["plain"])
    with pytest.raises(Decline):
        pad_into_conv(p, *extra)


# --------------------------------------------------------------------------------------
# Cost
# --------------------------------------------------------------------------------------


def test_conv_macs():
    grouped = ConvParams(weight=np.zeros((8, 2, 3, 3)), bias=np.zeros(8), group=2)
    assert conv_macs(grouped, (5, 7)) == 8 * 2 * 3 * 3 * 5 * 7 == 5040
    depthwise = ConvParams(weight=np.zeros((6, 1, 1, 1)), bias=np.zeros(6), group=6)
    assert conv_macs(depthwise, (4, 4)) == 96
