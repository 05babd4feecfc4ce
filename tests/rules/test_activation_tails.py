"""An activation's tail (GELU's "* 0.5") before a re-parameterizable block stays, so the
runtime still fuses the activation, while the block itself still collapses.

FastViT exports a stage's downsampling GELU right before a RepMixer block,
``t + s * (mixer(t) - norm(t))``; folding the GELU's trailing ``* 0.5`` into the mixer's conv
saved one Mul and cost onnxruntime one of its Gelu fusions (five kernels instead of one).
"""

import math
import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxrep
from helpers import GraphBuilder, assert_same_outputs, ops


def gelu(b, x, spelling="ts"):
    if spelling == "ts":  # (x * (1 + erf(x / sqrt2))) * 0.5, as TorchScript writes it
        e = b.node("Erf", [b.node("Div", [x, b.const(np.array(math.sqrt(2), np.float32))])])
        inner = b.node("Mul", [x, b.node("Add", [e, b.const(np.array(1.0, np.float32))])])
        return b.node("Mul", [inner, b.const(np.array(0.5, np.float32))])
    raise ValueError(spelling)


def repmixer_after_gelu(c=6, scale=0.5, per_channel_head=False):
    b = GraphBuilder([1, c, 8, 8])
    t = gelu(b, b.bn(b.conv(b.x, c, c, k=3, bias=False), c))
    if per_channel_head:  # a per-channel scale instead: an affine op the block should absorb
        t = b.node("Mul", [t, b.const(b.rand(1, c, 1, 1) + 1.0)])
    # timm's MobileOneBlock as TorchScript exports it: BN folded into each conv, identity BN
    mixer = b.add(b.add(b.conv(t, c, c, k=1, group=c), b.bn(t, c)), b.conv(t, c, c, k=3, group=c))
    diff = b.node("Sub", [mixer, b.bn(t, c)])
    y = b.node("Add", [t, b.node("Mul", [diff, b.const(b.rand(c, 1, 1) + scale)])])
    return b.build(b.node("Relu", [y]))


def fused_gelus(model) -> int:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    with tempfile.TemporaryDirectory() as d:
        so.optimized_model_filepath = os.path.join(d, "opt.onnx")
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        opt = onnx.load(so.optimized_model_filepath)
    return sum(n.op_type in ("Gelu", "FastGelu", "BiasGelu") for n in opt.graph.node)


@pytest.mark.parametrize("skip", [[], ["merge_parallel_add"]], ids=["all_rules", "fallback"])
def test_gelu_tail_before_a_repmixer_stays_and_the_block_collapses(skip):
    """Whichever rule collapses the block (in FastViT's TorchScript export it is the region
    fallback) leaves the GELU's "* 0.5" in place."""
    model = repmixer_after_gelu()
    assert fused_gelus(model) == 1
    out, report = onnxrep.optimize(model, skip=skip)
    assert report.verification.ok and not report.rolled_back
    counts = ops(out)
    assert counts["Conv"] == 2 and counts["BatchNormalization"] == 0 and counts["Sub"] == 0
    assert counts["Erf"] == 1 and counts["Mul"] == 2  # GELU's two Muls, nothing else
    assert fused_gelus(out) == 1
    assert_same_outputs(model, out)


def test_per_channel_scale_at_the_head_is_still_absorbed():
    """The counterpart: a per-channel Mul at the block's input is part of the block."""
    model = repmixer_after_gelu(per_channel_head=True)
    out, report = onnxrep.optimize(model)
    assert report.verification.ok
    counts = ops(out)
    assert counts["Conv"] == 2 and counts["Mul"] == 2, counts  # the per-channel Mul folded
    assert fused_gelus(out) == 1
    assert_same_outputs(model, out)


@pytest.mark.parametrize("op, k", [("Mul", 3), ("Add", 1)])  # a shift before a zero-padded conv is no conv
def test_scalar_head_read_by_the_block_twice_is_kept_inside(op, k):
    """A scalar op whose input the region also reads directly cannot be left out (the region
    would read two activations): it is folded with the rest."""
    c = 4
    b = GraphBuilder([1, c, 8, 8])
    x = b.node("Relu", [b.x])
    s = b.node(op, [x, b.const(np.array(2.0, np.float32))])
    y = b.node("Add", [b.conv(s, c, c, k=k), b.conv(x, c, c, k=k)])
    model = b.build(b.node("Relu", [y]))
    out, report = onnxrep.optimize(model, only=["collapse_affine_region"])
    assert report.verification.ok
    assert ops(out)["Conv"] == 1 and ops(out)[op] == 0, ops(out)
    assert_same_outputs(model, out)


def test_region_probing_is_reused_across_replays_by_content(monkeypatch):
    """Locating a failing rewrite replays the rules; the fallback's probing outcome is kept by the
    region's content, so a replay does not probe the same region again, and a region whose
    weights differ is probed afresh."""
    from onnxrep.graph import RepGraph
    from onnxrep.normalize import import_graph, normalize
    from onnxrep.passes import Context, run_to_fixpoint
    from onnxrep.rules import affine_region, select_rules

    calls = []
    real = affine_region._recover

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(affine_region, "_recover", counting)
    rules = select_rules(["collapse_affine_region"], None, None)
    shared = {}

    def build(model):
        g = normalize(import_graph(model))
        return run_to_fixpoint(Context(RepGraph(g), shared=shared), rules)

    first = build(repmixer_after_gelu())
    probed = len(calls)
    assert probed >= 1 and first.rewrites
    again = build(repmixer_after_gelu())
    assert len(calls) == probed  # the same region: remembered
    assert [r.created for r in again.rewrites] == [r.created for r in first.rewrites]
    other = repmixer_after_gelu(scale=0.75)  # other layer-scale values, same names
    build(other)
    assert len(calls) > probed


def test_region_content_differs_when_a_weight_differs():
    from onnxrep.normalize import import_graph, normalize
    from onnxrep.rules.affine_region import region_content

    def content(model):
        g = normalize(import_graph(model))
        nodes = [n for n in g.nodes if n.op in ("Conv", "Add", "Sub", "Mul", "BatchNormalization")]
        x = g.inputs[0]
        return region_content(nodes, x, g.outputs[0], [])

    assert content(repmixer_after_gelu()) == content(repmixer_after_gelu())
    assert content(repmixer_after_gelu()) != content(repmixer_after_gelu(scale=0.75))
