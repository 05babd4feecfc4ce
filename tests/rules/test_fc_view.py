"""merge_conv_into_fc_view: RepMLP's locality injection, a conv on the image view of a tensor
added to the FC on its flat view, folded into the FC; and the BN after the FC's channel split."""

import numpy as np
import pytest

import onnxrep
from helpers import GraphBuilder, assert_equal_per_channel, ops

S, H, W = 4, 3, 3
P = H * W


def i64(*v):
    return np.array(v, np.int64)


def locality_block(fc_groups=S, conv_groups=S, k=3, conv_reads_other=False, outer=True, bn=True):
    """x [N, S, h, w] -> FC on the flat view (+ BN over S after the split) + conv on the image view."""
    b = GraphBuilder(["N", S, H, W])
    flat = b.node("Reshape", [b.x, b.const(i64(-1, S * P, 1, 1))])
    fc = b.node("Conv", [flat, b.const(b.rand(S * P, S * P // fc_groups, 1, 1)), b.const(b.rand(S * P))],
                kernel_shape=[1, 1], group=fc_groups)
    a = b.node("Reshape", [fc, b.const(i64(-1, S, H, W))])
    if bn:
        a = b.bn(a, S)
    image = b.node("Relu", [b.x]) if conv_reads_other else b.x
    c = b.conv(image, S, S, k=k, group=conv_groups)
    if bn:
        c = b.bn(c, S)
    if outer:
        target = b.const(i64(-1, 1, 1, S, H, W))
        a, c = b.node("Reshape", [a, target]), b.node("Reshape", [c, target])
    y = b.node("Add", [a, c])
    return b.build(y, output_shape=["N", 1, 1, S, H, W] if outer else ["N", S, H, W])


def check(model, out):
    for batch in (1, 3):
        feeds = {"x": np.random.default_rng(batch).standard_normal((batch, S, H, W)).astype(np.float32)}
        assert_equal_per_channel(model, out, feeds)


@pytest.mark.parametrize("fc_groups, conv_groups", [(S, S), (2, S), (1, S), (1, 2), (2, 2), (1, 1)])
@pytest.mark.parametrize("outer", [True, False])
def test_conv_on_the_image_view_merges_into_the_fc(fc_groups, conv_groups, outer):
    model = locality_block(fc_groups, conv_groups, outer=outer)
    out, report = onnxrep.optimize(model)
    assert ops(out)["Conv"] == 1
    assert "BatchNormalization" not in ops(out) and "Add" not in ops(out)
    assert "merge_conv_into_fc_view" in {r.rule for r in report.rewrites}
    assert not report.rolled_back
    check(model, out)


def test_a_wider_kernel_than_the_image_merges_too():
    model = locality_block(k=5)
    out, report = onnxrep.optimize(model)
    assert ops(out)["Conv"] == 1
    check(model, out)


def test_conv_groups_not_inside_the_fc_groups_decline():
    # FC in 4 groups (one per channel), conv in 2 (mixes channel pairs): no block structure fits
    model = locality_block(fc_groups=S, conv_groups=2, bn=False)
    out, report = onnxrep.optimize(model, only=["merge_conv_into_fc_view"])
    assert ops(out) == ops(model)
    assert any("groups" in d.reason for d in report.declines if d.rule == "merge_conv_into_fc_view")


def test_conv_on_another_tensor_stays():
    model = locality_block(conv_reads_other=True, bn=False)
    out, _ = onnxrep.optimize(model, only=["merge_conv_into_fc_view"])
    assert ops(out) == ops(model)


def test_conv_that_resizes_the_image_stays():
    b = GraphBuilder(["N", S, H, W])
    flat = b.node("Reshape", [b.x, b.const(i64(-1, S * P, 1, 1))])
    fc = b.node("Conv", [flat, b.const(b.rand(S * P, P, 1, 1))], kernel_shape=[1, 1], group=S)
    a = b.node("Reshape", [fc, b.const(i64(-1, S, H, W))])
    c = b.conv(b.x, S, S, k=3, pad=0, group=S)  # 3x3 -> 1x1: not the image view's shape
    model = b.build(b.node("Add", [b.node("ReduceMean", [a], axes=[2, 3], keepdims=1), c]),
                    output_shape=["N", S, 1, 1])
    out, _ = onnxrep.optimize(model, only=["merge_conv_into_fc_view"])
    assert ops(out) == ops(model)


# ---- fold_bn_through_reshape: BN after a 1x1-output conv whose channels a Reshape splits ----


def fc_split_bn(target):
    b = GraphBuilder(["N", S * P, 1, 1])
    fc = b.node("Conv", [b.x, b.const(b.rand(S * P, S * P, 1, 1)), b.const(b.rand(S * P))], kernel_shape=[1, 1])
    r = b.node("Reshape", [fc, b.const(i64(*target))])
    return b.build(b.node("Relu", [b.bn(r, target[1])]), output_shape=["N", *target[1:]])


@pytest.mark.parametrize("target", [(-1, S, H, W), (-1, S, P), (-1, S * H, W), (-1, S * P, 1)])
def test_bn_after_a_channel_split_folds_into_the_fc(target):
    model = fc_split_bn(target)
    out, report = onnxrep.optimize(model, only=["fold_bn_through_reshape"])
    assert ops(out) == {"Conv": 1, "Reshape": 1, "Relu": 1}
    for batch in (1, 2):
        feeds = {"x": np.random.default_rng(batch).standard_normal((batch, S * P, 1, 1)).astype(np.float32)}
        assert_equal_per_channel(model, out, feeds)


def test_bn_after_a_reshape_that_moves_samples_stays():
    # [N, 36, 1, 1] -> [2, S, ...]: a constant first dim that is not the batch
    b = GraphBuilder([4, S * P, 1, 1])
    fc = b.node("Conv", [b.x, b.const(b.rand(S * P, S * P, 1, 1))], kernel_shape=[1, 1])
    r = b.node("Reshape", [fc, b.const(i64(2, S * 2, H, W))])
    model = b.build(b.node("Relu", [b.bn(r, S * 2)]))
    out, _ = onnxrep.optimize(model, only=["fold_bn_through_reshape"])
    assert ops(out)["BatchNormalization"] == 1


def test_bn_after_a_reshape_of_a_conv_with_a_spatial_output_stays():
    # the conv's output is 2x2 in space: its channels are not contiguous per sample
    b = GraphBuilder(["N", 8, 2, 2])
    fc = b.node("Conv", [b.x, b.const(b.rand(8, 8, 1, 1))], kernel_shape=[1, 1])
    r = b.node("Reshape", [fc, b.const(i64(-1, 4, 8))])
    model = b.build(b.node("Relu", [b.bn(r, 4)]), output_shape=["N", 4, 8])
    out, _ = onnxrep.optimize(model, only=["fold_bn_through_reshape"])
    assert ops(out)["BatchNormalization"] == 1
