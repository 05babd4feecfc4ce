"""Sequential composition, AvgPool, depth concat and group recovery against a direct conv."""

import zlib

import numpy as np
import pytest

from helpers import conv_params_ref
from onnxrep.kernels import (
    ConvParams,
    Decline,
    avgpool_conv,
    compose_sequential,
    concat_parallel,
    densify_groups,
    regroup,
)

TIGHT = dict(rtol=1e-10, atol=1e-10)


def conv(rng, cout, cin, k, stride=1, pads=0, d=1, group=1, bias=True):
    kh, kw = (k, k) if isinstance(k, int) else k
    return ConvParams(
        weight=rng.standard_normal((cout, cin // group, kh, kw)),
        bias=rng.standard_normal(cout) if bias else np.zeros(cout),
        strides=(stride, stride) if isinstance(stride, int) else stride,
        pads=(pads,) * 4 if isinstance(pads, int) else pads,
        dilations=(d, d),
        group=group,
    )


def avgpool_ref(x, k, s, pads):
    """Direct AveragePool with count_include_pad=1."""
    return conv_params_ref(x, avgpool_conv(x.shape[1], (k, k), (s, s), pads, True))


SEQUENTIAL = {
    # name: (conv1 args, conv2 args, input hw)
    "3x3_then_1x1": ((6, 4, 3, 1, 1), (5, 6, 1), (9, 8)),
    "3x3s2_then_1x1": ((6, 4, 3, 2, 1), (5, 6, 1), (9, 8)),
    "1x1_then_3x3_unpadded": ((6, 4, 1, 1, 0), (5, 6, 3, 1, 0), (9, 8)),
    "3x3_then_3x3_unpadded": ((6, 4, 3, 1, 1), (5, 6, 3, 1, 0), (9, 8)),
    "3x3s2_then_3x3s2_unpadded": ((6, 4, 3, 2, 1), (5, 6, 3, 2, 0), (13, 11)),
    "5x5s2_then_3x3_unpadded": ((6, 4, 5, 2, 2), (5, 6, 3, 1, 0), (14, 15)),
    "dilated_then_1x1": ((6, 4, 3, 1, 2, 2), (5, 6, 1), (9, 9)),
}


@pytest.mark.parametrize("name", SEQUENTIAL)
def test_compose_sequential_is_exact(name):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    a1, a2, hw = SEQUENTIAL[name]
    p1, p2 = conv(rng, *a1), conv(rng, *a2)
    x = rng.standard_normal((2, p1.in_channels) + hw)
    fused = compose_sequential(p1, p2)
    np.testing.assert_allclose(conv_params_ref(x, fused), conv_params_ref(conv_params_ref(x, p1), p2), **TIGHT)


def test_compose_1x1_without_bias_then_padded_kxk_is_exact():
    rng = np.random.default_rng(1)
    p1 = conv(rng, 16, 8, 1, bias=False)
    p2 = conv(rng, 8, 16, 3, pads=1, d=2)
    x = rng.standard_normal((1, 8, 7, 9))
    fused = compose_sequential(p1, p2)
    assert fused.kernel_shape == (3, 3) and fused.dilations == (2, 2)
    np.testing.assert_allclose(conv_params_ref(x, fused), conv_params_ref(conv_params_ref(x, p1), p2), **TIGHT)


def test_compose_declines_when_padding_meets_a_bias():
    rng = np.random.default_rng(2)
    with pytest.raises(Decline, match="bias is not zero"):
        compose_sequential(conv(rng, 16, 8, 1), conv(rng, 8, 16, 3, pads=1))
    with pytest.raises(Decline, match="not a stride-1 1x1"):
        compose_sequential(conv(rng, 16, 8, 3, pads=1, bias=False), conv(rng, 8, 16, 3, pads=1))


def test_compose_grouped_keeps_groups():
    rng = np.random.default_rng(3)
    p1 = conv(rng, 8, 8, 3, pads=1, group=2)
    p2 = conv(rng, 8, 8, 1, group=2)
    fused = compose_sequential(p1, p2)
    assert fused.group == 2
    x = rng.standard_normal((1, 8, 6, 6))
    np.testing.assert_allclose(conv_params_ref(x, fused), conv_params_ref(conv_params_ref(x, p1), p2), **TIGHT)


def test_compose_1x1_then_avgpool_dbb_branch():
    rng = np.random.default_rng(4)
    p1 = conv(rng, 6, 4, 1, pads=1)  # the border then holds conv1's bias, as DBB's BNAndPad does
    pool = avgpool_conv(6, (3, 3), (2, 2), (0, 0, 0, 0), True)
    x = rng.standard_normal((1, 4, 9, 9))
    fused = compose_sequential(p1, pool)
    assert fused.kernel_shape == (3, 3) and fused.strides == (2, 2) and fused.group == 1
    np.testing.assert_allclose(conv_params_ref(x, fused), conv_params_ref(conv_params_ref(x, p1), pool), **TIGHT)


def test_avgpool_conv_matches_average_and_declines_exclusive_padding():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 3, 6, 6))
    y = avgpool_ref(x, 2, 2, (0, 0, 0, 0))
    np.testing.assert_allclose(y, x.reshape(1, 3, 3, 2, 3, 2).mean(axis=(3, 5)), **TIGHT)
    with pytest.raises(Decline, match="count_include_pad"):
        avgpool_conv(3, (3, 3), (1, 1), (1, 1, 1, 1), False)


def test_concat_parallel_is_exact_and_declines_growth():
    rng = np.random.default_rng(6)
    branches = [conv(rng, 3, 4, 3, pads=1), conv(rng, 2, 4, (1, 3), pads=(0, 1, 0, 1)), conv(rng, 5, 4, 1)]
    x = rng.standard_normal((1, 4, 7, 8))
    with pytest.raises(Decline, match="more MACs"):
        concat_parallel(branches)
    fused = concat_parallel(branches, allow_growth=True)
    assert fused.kernel_shape == (3, 3)
    want = np.concatenate([conv_params_ref(x, p) for p in branches], axis=1)
    np.testing.assert_allclose(conv_params_ref(x, fused), want, **TIGHT)
    shifted = [branches[0], conv(rng, 2, 4, 3, pads=(0, 0, 2, 2))]
    with pytest.raises(Decline, match="misaligned"):
        concat_parallel(shifted)
    grown = concat_parallel(shifted, allow_growth=True)
    want = np.concatenate([conv_params_ref(x, p) for p in shifted], axis=1)
    np.testing.assert_allclose(conv_params_ref(x, grown), want, **TIGHT)


def test_concat_of_depthwise_branches_stays_grouped():
    rng = np.random.default_rng(7)
    branches = [conv(rng, 4, 4, 3, pads=1, group=4), conv(rng, 4, 4, 3, pads=1, group=4)]
    fused = concat_parallel(branches)
    x = rng.standard_normal((1, 4, 5, 5))
    np.testing.assert_allclose(
        conv_params_ref(x, fused), np.concatenate([conv_params_ref(x, p) for p in branches], axis=1), **TIGHT
    )
    # channel order [b0 c0..c3, b1 c0..c3] is not a depthwise layout: dense unless it fits
    assert fused.group in (1, 2, 4)


@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_regroup_recovers_block_diagonal_structure(group):
    rng = np.random.default_rng(group)
    p = conv(rng, 8, 8, 3, pads=1, group=group)
    dense = densify_groups(p)
    assert dense.group == 1
    back = regroup(dense)
    assert back.group == group
    x = rng.standard_normal((1, 8, 5, 5))
    np.testing.assert_allclose(conv_params_ref(x, back), conv_params_ref(x, p), **TIGHT)
