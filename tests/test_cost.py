"""One cost model: what a rule predicts a rewrite costs (onnxrep.cost) is what the report then
measures (onnxrep.stats), FLOP for FLOP."""

import numpy as np
import pytest

import onnxrep
from helpers import GraphBuilder
from onnxrep.cost import conv_flops
from onnxrep.kernels import ConvParams


def _repvgg():
    b = GraphBuilder([1, 4, 9, 7])
    scaled = b.node("Mul", [b.conv(b.x, 4, 4, k=1, pad=0, bias=False), b.const(b.rand(1, 4, 1, 1))])
    return b.build(b.add(b.conv(b.x, 4, 4, k=3, bias=False), scaled, b.x, b.const(b.rand(1, 4, 1, 1))))


def _chain():
    b = GraphBuilder([1, 4, 9, 7])
    return b.build(b.conv(b.conv(b.x, 4, 8, k=3, stride=2), 8, 6, k=1, pad=0))


def _region():
    b = GraphBuilder([1, 4, 9, 7])
    return b.build(b.conv(b.node("Neg", [b.conv(b.x, 4, 6, k=1, bias=False)]), 6, 6, k=3))


def _signed_with_rest():
    b = GraphBuilder([1, 4, 9, 7])
    s = b.node("Sub", [b.conv(b.x, 4, 4, k=3), b.conv(b.x, 4, 4, k=1, pad=0)])
    return b.build(b.node("Add", [s, b.node("Relu", [b.x])]))


def _unsized(b):
    """x through Reshape(x, Concat(Max(Shape(x)[0:1], 1), [C, H, W])): shape inference cannot
    follow Max, so under a dynamic batch every size after it is unknown to it."""
    n = b.node("Slice", [b.node("Shape", [b.x]), b.const(np.array([0])), b.const(np.array([1]))])
    target = b.node("Concat", [b.node("Max", [n, b.const(np.array([1]))]), b.const(np.array([4, 9, 7]))], axis=0)
    return b.node("Reshape", [b.x, target])


def _chain_unsized():
    b = GraphBuilder(["N", 4, 9, 7])
    return b.build(b.conv(b.conv(_unsized(b), 4, 8, k=3, stride=2), 8, 6, k=1, pad=0), opset=13,
                   output_shape=["N", 6, 5, 4])


@pytest.mark.parametrize("build, rules", [
    (_repvgg, ["merge_parallel_add"]),
    (_signed_with_rest, ["merge_parallel_add"]),
    (_chain, ["compose_sequential_convs"]),
    (_region, ["collapse_affine_region"]),
    (_chain_unsized, ["compose_sequential_convs"]),
], ids=["merge", "signed-merge", "compose", "region", "compose-unsized"])
def test_predicted_cost_is_the_measured_cost(build, rules):
    model = build()
    out, report = onnxrep.optimize(model, only=rules)
    assert len(report.rewrites) == 1 and report.rewrites[0].flops is not None, report.rewrites
    before, after = report.rewrites[0].flops
    assert before > after
    assert report.before.flops - report.after.flops == before - after


def test_conv_flops_counts_bias_only_when_present():
    p = ConvParams(weight=np.ones((2, 3, 3, 3)), bias=np.zeros(2))
    assert conv_flops(p, (4, 5)) == 2 * 2 * 3 * 9 * 20
    assert conv_flops(ConvParams(weight=p.weight, bias=np.ones(2)), (4, 5)) == 2 * 2 * 3 * 9 * 20 + 2 * 20
    assert conv_flops(p, (4, 5), pool=True) == 2 * 3 * 9 * 20
