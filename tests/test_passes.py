"""The pass manager (fixpoint, replay with limit/deny) and the central escape check."""

import numpy as np

from helpers import GraphBuilder
from onnxrep.graph import RepGraph, per_channel
from onnxrep.normalize import import_graph, normalize
from onnxrep.passes import Context, run_to_fixpoint
from onnxrep.rules import DEFAULT_RULES


def _ctx(model):
    graph = normalize(import_graph(model))
    return Context(RepGraph(graph))


def _two_blocks():
    b = GraphBuilder([1, 4, 8, 8])
    y = b.x
    for _ in range(2):
        y = b.node("Relu", [b.add(b.bn(b.conv(y, 4, 4, k=3, bias=False), 4), b.bn(b.conv(y, 4, 4, k=1, bias=False), 4), b.bn(y, 4))])
    return b.build(y)


def test_fixpoint_is_deterministic_and_replayable():
    model = _two_blocks()
    full = run_to_fixpoint(_ctx(model), DEFAULT_RULES)
    again = run_to_fixpoint(_ctx(model), DEFAULT_RULES)
    assert [r.key for r in full.rewrites] == [r.key for r in again.rewrites]
    assert len(full.rewrites) == 6  # 4 Conv+BN folds, 2 branch merges
    prefix = run_to_fixpoint(_ctx(model), DEFAULT_RULES, limit=3)
    assert [r.key for r in prefix.rewrites] == [r.key for r in full.rewrites[:3]]


def test_denied_rewrite_is_skipped_and_reported():
    model = _two_blocks()
    full = run_to_fixpoint(_ctx(model), DEFAULT_RULES)
    merge = next(r for r in full.rewrites if r.rule == "merge_parallel_add")
    ctx = _ctx(model)
    specific = [r for r in DEFAULT_RULES if not r.late]  # the fallback would merge the block too
    result = run_to_fixpoint(ctx, specific, deny=frozenset({merge.key}))
    assert merge.key not in [r.key for r in result.rewrites]
    assert any(d.node == merge.anchor and "rolled back" in d.reason for d in result.declines)
    assert sum(1 for n in ctx.graph.graph.nodes if n.op == "Conv") == 3


def test_escape_check_names_the_escaping_tensor():
    b = GraphBuilder([1, 4, 6, 6])
    c = b.conv(b.x, 4, 4)
    r = b.node("Relu", [c])
    y = b.node("Add", [b.bn(c, 4), r])
    ctx = _ctx(b.build(y))
    nodes = {n.op: n for n in ctx.graph.graph.nodes}
    reason = ctx.graph.escapes([nodes["Conv"], nodes["BatchNormalization"]], keep=nodes["BatchNormalization"].outputs)
    assert reason is not None and "also used by" in reason
    assert ctx.graph.escapes([nodes["Relu"]], keep=nodes["Relu"].outputs) is None


def test_per_channel_accepts_only_channel_broadcasts():
    c = 6
    assert np.allclose(per_channel(np.arange(6.0).reshape(1, 6, 1, 1), c, 4), np.arange(6.0))
    assert np.allclose(per_channel(np.arange(6.0).reshape(6, 1, 1), c, 4), np.arange(6.0))
    assert np.allclose(per_channel(np.float32(2.0), c, 4), 2.0)
    assert per_channel(np.arange(6.0), c, 4) is None  # lines up with W
    assert per_channel(np.ones((1, 6, 2, 1)), c, 4) is None  # varies over H
    assert per_channel(np.ones((2, 6, 1, 1)), c, 4) is None  # would broadcast the batch
    assert per_channel(np.ones((1, 1, 6, 1, 1)), c, 4) is None  # higher rank
