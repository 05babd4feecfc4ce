"""Fixpoint pass manager: the one place that decides whether a rewrite may happen.

Each rule (``onnxrep/rules/*.py``) names the op types it anchors on and offers two steps:

* ``match(ctx, node)`` inspects the graph without changing it. It returns a :class:`Match`
  (what the rewrite needs, and which nodes it replaces), None when the node is simply not its
  pattern, or raises :class:`~onnxrep.errors.Decline` with the reason it does not apply;
* ``rewrite(ctx, match)`` adds the replacement nodes and returns a :class:`Rewrite` record.
  It never re-reads the graph (the match carries what it needs) and never removes nodes.

What the manager guarantees for every rule (docs/architecture.md):

* **escapes**: before a rewrite, every tensor the matched nodes produce, other than those the
  replacement produces again (``Match.keeps``), must be read only by matched nodes: not by a
  graph output, another node, or a node inside an If/Loop/Scan body. Matched nodes must be
  live nodes of the main graph. Otherwise the match is declined with the reason;
* **containment**: a Decline or any other exception inside ``match`` declines that match (an
  unexpected one with its type and first line); an exception inside ``rewrite``, or a
  replacement that reads a removed tensor, undoes the rewrite and declines it. The run goes on;
* **removal**: the manager disconnects ``Match.removes`` itself once the replacement exists;
* **no warnings**: folding arithmetic runs under ``np.errstate(all="ignore")``; non-finite
  folded constants are refused where they are made (:meth:`RepGraph.constant`).

A pass visits every live node once, in order, and gives it to the enabled rules anchored on its
op type; the first rule that matches rewrites it. Passes repeat until one changes nothing; then
the late rules get a pass each, one rule at a time in their order (any change goes back to the
early rules), so that no late rule pre-empts an earlier one's rewrite. Last, the final rules
get one pass each: they lower what the others leave into its cheapest spelling (a depthwise 1x1
Conv into Mul/Add), a form the others would fold back, so nothing runs after them. The graph
is only mutated between matches, never while one is in progress. Rewrites are deterministic,
so a run can be replayed with ``limit`` (stop after that many rewrites) and ``deny`` (skip
those rewrite keys): that is how a verification failure is traced to one rewrite and rolled
back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

import numpy as np

from .errors import Decline, first_line
from .graph import RepGraph

RewriteKey = Tuple[str, str]


class Match:
    """Base of every rule's match: what its rewrite replaces.

    Subclasses (dataclasses) carry what ``rewrite`` needs and define:

    * ``removes``: the nodes the rewrite replaces (the manager removes them afterwards);
    * ``keeps``: tensors among their outputs that the replacement produces again under the
      same name (usually the one output of the matched pattern).
    """

    @property
    def removes(self) -> Sequence[Any]:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def keeps(self) -> Sequence[Any]:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(frozen=True)
class Rewrite:
    """One applied rewrite: which rule, at which anchor node, what it replaced and made."""

    rule: str
    anchor: str
    replaced: Tuple[str, ...]
    created: Tuple[str, ...]
    detail: str = ""
    #: (before, after) FLOPs of the replaced and the new nodes as the rule predicted them with
    #: onnxrep.cost, where it did (None: the rule does not weigh cost)
    flops: Optional[Tuple[int, int]] = None

    @property
    def key(self) -> RewriteKey:
        return (self.rule, self.anchor)


@dataclass(frozen=True)
class Declined:
    """A match a rule declined, and why."""

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
    #: Results that stay valid across the builds of one run (the first, and each replay while a
    #: failing rewrite is located), keyed by the content they were computed from, never by
    #: names alone: a name can stand for other values in another build.
    shared: Dict[Any, Any] = field(default_factory=dict)
    #: Called with the number of rewrites so far after each one (a progress display).
    on_rewrite: Optional[Callable[[int], None]] = None


class Rule:
    """Base class of a rewrite rule; see the module docstring for the protocol."""

    name: str = ""
    ops: Tuple[str, ...] = ()
    summary: str = ""
    #: Late rules (horizontal merging, the affine-region fallback) only run once the other
    #: rules have reached their fixpoint, so they never pre-empt a more specific rewrite.
    late: bool = False
    #: Final rules run once each, after every other rule has converged, and nothing runs
    #: after them: they lower the result into the form the runtime runs fastest, which the
    #: other rules would otherwise fold back.
    final: bool = False
    #: Off by default (``enable`` / ``--enable`` or ``only`` turn it on): a rewrite whose benefit
    #: depends on the runtime (e.g. one conv + Split is slower than separate convs on one CPU thread).
    default: bool = True

    def match(self, ctx: Context, node) -> Optional[Match]:  # pragma: no cover - interface
        raise NotImplementedError

    def rewrite(self, ctx: Context, match) -> Rewrite:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class PassResult:
    rewrites: List[Rewrite] = field(default_factory=list)
    declines: List[Declined] = field(default_factory=list)
    passes: int = 0


def try_match(ctx: Context, rule: Rule, node) -> Any:
    """``rule.match`` with the manager's guarantees: a Match that passed the escape check,
    None, or the reason (a string) it was declined. Never raises (except KeyboardInterrupt)."""
    try:
        with np.errstate(all="ignore"):
            m = rule.match(ctx, node)
        if m is None:
            return None
        ctx.graph.check_replaceable(m.removes, m.keeps)
        return m
    except Decline as exc:
        return str(exc) or "declined"
    except Exception as exc:  # a bug or an input the rule did not foresee: decline, go on
        return f"the rule failed on this match ({type(exc).__name__}: {first_line(exc)})"


def try_rewrite(ctx: Context, rule: Rule, m: Match) -> Any:
    """Apply a checked match; returns the Rewrite, or the reason it was undone."""
    try:
        with np.errstate(all="ignore"):
            return ctx.graph.apply(lambda: rule.rewrite(ctx, m), m.removes, m.keeps)
    except Decline as exc:
        return f"rewrite undone: {exc}"
    except Exception as exc:
        return f"rewrite undone: the rule failed ({type(exc).__name__}: {first_line(exc)})"


def run_to_fixpoint(
    ctx: Context,
    rules: Sequence[Rule],
    deny: FrozenSet[RewriteKey] = frozenset(),
    limit: Optional[int] = None,
    max_passes: int = 100,
) -> PassResult:
    result = PassResult()
    declined: Dict[Tuple[str, str], str] = {}
    graph = ctx.graph
    main = [r for r in rules if not r.final]
    late = [r for r in main if r.late]
    # stage None: the early rules only; stage i: the early rules and late rule i. Late rules take
    # turns in their order, each only once the early ones and the late ones before it change
    # nothing, so that one never pre-empts another's rewrite (horizontal merging splitting the
    # convs a region would have collapsed). Any change goes back to the early rules.
    changed, stage = True, None
    try:
        while result.passes < max_passes:
            if not changed:
                stage = 0 if stage is None else stage + 1
                if stage >= len(late):
                    break
            else:
                stage = None
            active = [r for r in main if not r.late or (stage is not None and r is late[stage])]
            changed = _one_pass(ctx, active, deny, limit, result, declined)
        for rule in rules:
            if rule.final:
                _one_pass(ctx, [rule], deny, limit, result, declined)
    except _LimitReached:
        pass
    graph.compact()
    result.declines = _live_declines(graph, declined)
    return result


class _LimitReached(Exception):
    """The replay limit of rewrites is reached: the run stops where it is."""


def _one_pass(ctx: Context, rules: Sequence[Rule], deny: FrozenSet[RewriteKey], limit: Optional[int],
              result: PassResult, declined: Dict[Tuple[str, str], str]) -> bool:
    """Visit every live node once with ``rules``; whether anything was rewritten."""
    by_op: Dict[str, List[Rule]] = {}
    for rule in rules:
        for op in rule.ops:
            by_op.setdefault(op, []).append(rule)
    graph = ctx.graph
    changed = False
    result.passes += 1
    for node in list(graph.graph.nodes):
        if not node.outputs:  # removed earlier in this pass
            continue
        for rule in by_op.get(node.op, ()):
            key = (rule.name, node.name)
            m = try_match(ctx, rule, node)
            if m is None:
                continue
            if isinstance(m, str):
                declined[key] = m
                continue
            if key in deny:
                declined[key] = "rolled back: this rewrite failed verification"
                continue
            if limit is not None and len(result.rewrites) >= limit:
                raise _LimitReached
            done = try_rewrite(ctx, rule, m)
            if isinstance(done, str):
                declined[key] = done
                continue
            result.rewrites.append(done)
            if ctx.on_rewrite is not None:
                ctx.on_rewrite(len(result.rewrites))
            declined.pop(key, None)
            changed = True
            break
    graph.compact()
    return changed


def _live_declines(graph: RepGraph, declined: Dict[Tuple[str, str], str]) -> List[Declined]:
    live = {n.name for n in graph.graph.nodes}
    return [Declined(rule, node, reason) for (rule, node), reason in declined.items() if node in live]
