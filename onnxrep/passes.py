"""Fixpoint pass manager.

Each rule (``onnxrep/rules/*.py``) names the op types it anchors on and offers two steps:

* ``match(ctx, node)`` inspects the graph without changing it and returns a match object, a
  string saying why it declines (shown with ``-v``), or None when the node is simply not its
  pattern;
* ``rewrite(ctx, match)`` changes the graph and returns a :class:`Rewrite` record.

A pass visits every live node once, in order, and gives it to the enabled rules anchored on its
op type; the first rule that matches rewrites it. Passes repeat until one changes nothing. The
graph is only mutated between matches, never while one is in progress.

Rewrites are deterministic, so a run can be replayed with ``limit`` (stop after that many
rewrites) and ``deny`` (skip those rewrite keys): that is how verification bisects a failure to
one rewrite and rolls it back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Tuple

from .graph import RepGraph

RewriteKey = Tuple[str, str]


@dataclass(frozen=True)
class Rewrite:
    """One applied rewrite: which rule, at which anchor node, what it replaced and made."""

    rule: str
    anchor: str
    replaced: Tuple[str, ...]
    created: Tuple[str, ...]
    detail: str = ""

    @property
    def key(self) -> RewriteKey:
        return (self.rule, self.anchor)


@dataclass(frozen=True)
class Decline:
    rule: str
    node: str
    reason: str


@dataclass
class Context:
    """What rules see: the graph being rewritten and the options that affect their checks."""

    graph: RepGraph
    allow_growth: bool = False
    #: Rules may remember expensive results here (e.g. regions already probed and declined).
    memo: Dict[Any, Any] = field(default_factory=dict)


class Rule:
    """Base class of a rewrite rule; see the module docstring for the protocol."""

    name: str = ""
    ops: Tuple[str, ...] = ()
    summary: str = ""
    #: Late rules (horizontal merging, the affine-region fallback) only run once the other
    #: rules have reached their fixpoint, so they never pre-empt a more specific rewrite.
    late: bool = False

    def match(self, ctx: Context, node) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def rewrite(self, ctx: Context, match) -> Rewrite:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class PassResult:
    rewrites: List[Rewrite] = field(default_factory=list)
    declines: List[Decline] = field(default_factory=list)
    passes: int = 0


def run_to_fixpoint(
    ctx: Context,
    rules: Sequence[Rule],
    deny: FrozenSet[RewriteKey] = frozenset(),
    limit: Optional[int] = None,
    max_passes: int = 100,
) -> PassResult:
    by_op: Dict[str, List[Rule]] = {}
    for rule in rules:
        for op in rule.ops:
            by_op.setdefault(op, []).append(rule)

    result = PassResult()
    declined: Dict[Tuple[str, str], str] = {}
    graph = ctx.graph
    changed, with_late = True, False
    while result.passes < max_passes:
        if not changed:
            if with_late or not any(r.late for r in rules):
                break
            with_late = True  # the early rules are done: give the late ones a pass
        else:
            with_late = False
        changed = False
        result.passes += 1
        for node in list(graph.graph.nodes):
            if not node.outputs:  # removed earlier in this pass
                continue
            for rule in by_op.get(node.op, ()):
                if rule.late and not with_late:
                    continue
                m = rule.match(ctx, node)
                if m is None:
                    continue
                if isinstance(m, str):
                    declined[(rule.name, node.name)] = m
                    continue
                if (rule.name, node.name) in deny:
                    declined[(rule.name, node.name)] = "rolled back: this rewrite failed verification"
                    continue
                if limit is not None and len(result.rewrites) >= limit:
                    graph.compact()
                    result.declines = _live_declines(graph, declined)
                    return result
                result.rewrites.append(rule.rewrite(ctx, m))
                declined.pop((rule.name, node.name), None)
                changed = True
                break
        graph.compact()
    result.declines = _live_declines(graph, declined)
    return result


def _live_declines(graph: RepGraph, declined: Dict[Tuple[str, str], str]) -> List[Decline]:
    live = {n.name for n in graph.graph.nodes}
    return [Decline(rule, node, reason) for (rule, node), reason in declined.items() if node in live]
