"""Linear layers: parallel Gemm/MatMul heads on one input summed (RepViT's distilled head,
(head(x) + head_dist(x)) / 2) become one Gemm; per-feature affine ops after a rank-2 Gemm fold."""

import numpy as np

import onnxrep
from helpers import GraphBuilder, assert_equal_per_channel, ops


def feeds(shape):
    return {"x": np.random.default_rng(2).standard_normal(shape).astype(np.float32)}


def distilled_head(bn: bool = True):
    b = GraphBuilder(["N", 8])
    x = b.bn(b.x, 8) if bn else b.x
    head = b.node("Gemm", [x, b.const(b.rand(5, 8)), b.const(b.rand(5))], transB=1)
    dist = b.node("Add", [b.node("MatMul", [x, b.const(b.rand(8, 5))]), b.const(b.rand(5))])
    return b.build(b.node("Div", [b.add(head, dist), b.const(np.float32(2.0))]))


def test_distilled_head_with_its_bn_is_one_gemm():
    model = distilled_head()
    out, report = onnxrep.optimize(model)
    assert ops(out) == {"Gemm": 1}, report.summary(verbose=True)
    assert_equal_per_channel(model, out, feeds([3, 8]))


def test_summed_heads_only_the_merge():
    model = distilled_head(bn=False)
    out, report = onnxrep.optimize(model, only=["merge_parallel_add"])
    assert ops(out) == {"Gemm": 1, "Div": 1}
    assert_equal_per_channel(model, out, feeds([3, 8]))


def test_identity_next_to_a_square_linear_layer_merges():
    b = GraphBuilder([4, 6])
    model = b.build(b.add(b.node("Gemm", [b.x, b.const(b.rand(6, 6))]), b.x))
    out, _ = onnxrep.optimize(model, only=["merge_parallel_add"])
    assert ops(out) == {"Gemm": 1}
    assert_equal_per_channel(model, out, feeds([4, 6]))


def test_token_matmuls_of_rank_3_stay():
    # [B, N, C] @ [C, D]: axis 1 is tokens, not features; nothing here is per-channel
    b = GraphBuilder([1, 4, 6])
    y = b.add(b.node("MatMul", [b.x, b.const(b.rand(6, 3))]), b.node("MatMul", [b.x, b.const(b.rand(6, 3))]))
    model = b.build(b.node("Mul", [y, b.const(b.rand(3))]))
    out, _ = onnxrep.optimize(model)
    assert ops(out) == ops(model)
