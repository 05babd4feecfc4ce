"""The pass manager (fixpoint, replay with limit/deny) and the central escape check."""

from dataclasses import dataclass

import numpy as np
import onnx

from helpers import GraphBuilder
from onnxrep.graph import RepGraph, per_channel
from onnxrep.normalize import import_graph, normalize
from onnxrep.passes import Context, Match, Rewrite, Rule, run_to_fixpoint
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


# ---- what the pass manager guarantees for any rule ----------------------------------------------



@dataclass
class _ReluMatch(Match):
    conv: object
    relu: object

    @property
    def removes(self):
        return [self.conv, self.relu]  # claims the conv too, whoever else reads it

    @property
    def keeps(self):
        return [self.relu.outputs[0]]


class CarelessRule(Rule):
    """Replaces Conv -> Relu by a Relu of the conv's input: wrong, and it never asks whether
    the conv's output is read elsewhere."""

    name = "careless"
    ops = ("Relu",)

    def match(self, ctx, node):
        conv = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
        return _ReluMatch(conv, node) if conv is not None and conv.op == "Conv" else None

    def rewrite(self, ctx, m):
        new = ctx.graph.add_node("Relu", "careless", [m.conv.inputs[0]], [m.relu.outputs[0]])
        return Rewrite(self.name, m.relu.name, (m.conv.name, m.relu.name), (new.name,))


class RaisingRule(CarelessRule):
    """Fails inside match on the first node and inside rewrite on the others."""

    name = "raising"

    def match(self, ctx, node):
        if ctx.memo.setdefault("seen", 0) == 0:
            ctx.memo["seen"] = 1
            raise KeyError("boom in match")
        return super().match(ctx, node)

    def rewrite(self, ctx, m):
        ctx.graph.add_node("Relu", "half", [m.conv.inputs[0]], [ctx.graph.variable("half", m.relu.outputs[0])])
        raise ValueError("boom in rewrite")


def test_pass_manager_refuses_a_careless_rewrite_of_an_escaping_tensor():
    b = GraphBuilder([1, 4, 6, 6])
    c1 = b.conv(b.x, 4, 4)
    b.mark_output(c1)  # escapes as a graph output
    c2 = b.conv(b.x, 4, 4)
    y = b.add(b.node("Relu", [c1]), b.node("Relu", [c2]), b.node("Sigmoid", [c2]))  # c2 read by a Sigmoid
    model = b.build(y)
    ctx = _ctx(model)
    result = run_to_fixpoint(ctx, [CarelessRule()])
    assert result.rewrites == []
    reasons = sorted(d.reason for d in result.declines)
    assert len(reasons) == 2
    assert "is a graph output" in reasons[0] + reasons[1] and "also used by" in reasons[0] + reasons[1]
    assert sum(n.op == "Conv" for n in ctx.graph.graph.nodes) == 2


def test_pass_manager_refuses_a_careless_rewrite_of_a_tensor_read_in_a_subgraph():
    b = GraphBuilder([1, 4, 6, 6])
    c = b.conv(b.x, 4, 4)
    elem = onnx.TensorProto.FLOAT
    body = lambda name: onnx.helper.make_graph(  # noqa: E731
        [onnx.helper.make_node("Neg", [c], [f"{name}_y"])], name, [], [onnx.helper.make_tensor_value_info(f"{name}_y", elem, None)])
    b.inputs.append(onnx.helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []))
    branch = b.node("If", ["cond"], then_branch=body("then"), else_branch=body("else"))
    model = b.build(b.add(b.node("Relu", [c]), branch), output_shape=[1, 4, 6, 6])
    ctx = _ctx(model)
    result = run_to_fixpoint(ctx, [CarelessRule()])
    assert result.rewrites == []
    assert any("read inside a subgraph" in d.reason for d in result.declines), result.declines


def test_exceptions_inside_a_rule_decline_and_leave_the_graph_as_it_was():
    b = GraphBuilder([1, 4, 6, 6])
    y = b.add(b.node("Relu", [b.conv(b.x, 4, 4)]), b.node("Relu", [b.conv(b.x, 4, 4)]))
    model = b.build(y)
    ctx = _ctx(model)
    before = sorted((n.op, tuple(t.name for t in n.inputs), tuple(t.name for t in n.outputs)) for n in ctx.graph.graph.nodes)
    result = run_to_fixpoint(ctx, [RaisingRule()])
    after = sorted((n.op, tuple(t.name for t in n.inputs), tuple(t.name for t in n.outputs)) for n in ctx.graph.graph.nodes)
    assert result.rewrites == [] and before == after
    reasons = sorted(d.reason for d in result.declines)
    assert reasons == ["rewrite undone: the rule failed (ValueError: boom in rewrite)",
                       "the rule failed on this match (KeyError: 'boom in match')"]
