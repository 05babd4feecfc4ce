"""propagate_transposes: layout changes move out of the way, so later rules see NCHW blocks.

tf2onnx and jax2onnx keep Keras/JAX's NHWC layout around every conv: Transpose(x, [0,3,1,2])
before it, Transpose(y, [0,2,3,1]) after it, and elementwise ops (BN spelled as Mul/Add, Relu,
the Adds joining branches) in NHWC between, with per-channel constants on the last axis. A
Transpose only moves data, so three identities let the rule remove them exactly
(docs/rules.md §11):

* **Compose / cancel.** ``Transpose(Transpose(v, r), s) = Transpose(v, c)`` with
  ``c[k] = r[s[k]]``; when ``c`` is the identity, readers of the outer output read ``v`` (before
  a graph output, the producer of ``v`` writes the output name itself).
* **Dedupe.** Two ``Transpose(x, p)`` nodes compute the same tensor: readers of the second
  read the first (conv branches of one block each reading their own transposed input).
* **Flip an elementwise region.** For elementwise ops (Add/Sub/Mul/Div/Max/Min/Pow/PRelu with
  operands of the output's rank or constants, unary activations, Clip, Cast),
  ``T(f(a, b), p) = f(T(a, p), T(b, p))``. A constant of rank ``r <= R`` (numpy broadcasting
  prepends ones) becomes ``transpose(reshape(c, [1]*(R-r) + shape(c)), p)``: a per-channel
  ``[C]`` on the last NHWC axis becomes ``[C, 1, 1]`` for NCHW; a scalar stays as it is; a
  constant that varies over several axes is permuted with them. A connected region of such
  ops is recomputed in the permuted layout: every operand entering the region is transposed
  by ``p`` (nothing to do when it is ``Transpose(v, p^-1)``, or when a ``Transpose(u, p)``
  already exists), and every result leaving it is transposed back by ``p^-1`` (nothing to do
  when its reader was ``Transpose(y, p)``: that node's output is now computed directly).

Before (RepVGG block, tf2onnx):
    t = Transpose(x, [0,3,1,2]);  y = Conv3(t) + Conv1(t) + Transpose(Add(Mul(x, s[C]), b[C]), [0,3,1,2])
After:
    t = Transpose(x, [0,3,1,2]);  y = Conv3(t) + Conv1(t) + Add(Mul(t, s[C,1,1]), b[C,1,1])
which merge_parallel_add then turns into one Conv.

Cost: a rewrite never makes more Transpose nodes than it removes; a region is flipped only when
it removes strictly more than it adds, so no work is duplicated and the rule terminates.
Declines: ops outside the list (anything with an axis attribute, Reshape, Softmax, reductions),
operands of another rank than the output (only constants may broadcast from a lower rank),
unknown ranks, a region whose flip would not remove Transposes, a Transpose whose output is a
graph output or read inside a subgraph where removing it would rename that tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import Decline
from ..graph import const_value, producer, static_shape
from ..passes import Context, Match, Rewrite, Rule

#: Elementwise ops whose every input is broadcast against the others (multidirectional), or
#: (PRelu) whose second input broadcasts to the first: all inputs are laid out like the output.
BROADCAST = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Mod", "PRelu"}
#: Unary elementwise ops (attributes, if any, are not about axes).
UNARY = {
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu",
    "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal", "Erf", "Softplus", "Softsign", "Floor",
    "Ceil", "Round", "Sign", "Identity", "Cast", "Gelu", "Mish", "ThresholdedRelu", "Sin", "Cos",
}
#: Ops whose first input is laid out like the output and the others are scalars (left alone).
FIRST_ONLY = {"Clip"}

_DEFAULT_DOMAINS = (None, "", "ai.onnx")


def perm_of(node) -> Optional[Tuple[int, ...]]:
    """The permutation of a Transpose node (the default reverses the axes), or None when it
    cannot be known (no perm and an input of unknown rank) or is not a permutation."""
    perm = node.attrs.get("perm")
    if perm is None:
        shape = static_shape(node.inputs[0])
        if shape is None:
            return None
        return tuple(range(len(shape) - 1, -1, -1))
    perm = tuple(int(p) for p in perm)
    if sorted(perm) != list(range(len(perm))):
        return None
    return perm


def compose(r, s) -> Tuple[int, ...]:
    """Transpose(Transpose(v, r), s) == Transpose(v, compose(r, s))."""
    return tuple(r[k] for k in s)


def inverse(p) -> Tuple[int, ...]:
    inv = [0] * len(p)
    for k, a in enumerate(p):
        inv[a] = k
    return tuple(inv)


def is_identity(p) -> bool:
    return all(k == a for k, a in enumerate(p))


def permute_shape(shape, p):
    return None if shape is None or len(shape) != len(p) else [shape[a] for a in p]


def permute_constant(value: np.ndarray, p) -> np.ndarray:
    """A constant operand of an elementwise op of rank len(p), laid out for the permuted op:
    broadcast to rank R by leading ones, permuted, then leading ones dropped again."""
    value = np.asarray(value)
    rank = len(p)
    full = value.reshape((1,) * (rank - value.ndim) + value.shape)
    out = np.transpose(full, p)
    while out.ndim > 0 and out.shape[0] == 1:
        out = out[0]
    return out


def _is_transpose(node) -> bool:
    return node is not None and node.op == "Transpose" and node.domain in _DEFAULT_DOMAINS \
        and len(node.inputs) == 1 and len(node.outputs) == 1


def _layout_inputs(node) -> List[int]:
    """Indices of the inputs laid out like the output."""
    if node.op in FIRST_ONLY:
        return [0]
    return list(range(len(node.inputs)))


def _eligible(g, node, rank: int) -> bool:
    """An elementwise node of the main graph whose output has rank ``rank`` and whose layout
    operands are activations of that rank or constants of at most that rank."""
    if node.op not in BROADCAST | UNARY | FIRST_ONLY or node.domain not in _DEFAULT_DOMAINS:
        return False
    if len(node.outputs) != 1 or not node.inputs or not g.in_main_graph(node):
        return False
    if node.op in UNARY and len(node.inputs) != 1:
        return False
    if any(isinstance(a, gs.Graph) for a in node.attrs.values()):
        return False
    shape = static_shape(node.outputs[0])
    if shape is None or len(shape) != rank:
        return False
    variables = 0
    for i in _layout_inputs(node):
        t = node.inputs[i]
        if not t.name:
            return False
        value = const_value(t)
        if value is not None:
            if value.ndim > rank:
                return False
            continue
        s = static_shape(t)
        if s is None or len(s) != rank:
            return False
        variables += 1
    return variables > 0


def _existing_transpose(g, t, perm, exclude=()) -> Optional[object]:
    """A live main-graph Transpose(t, perm) node, if there is one."""
    for c in g.consumers(t):
        if _is_transpose(c) and id(c) not in exclude and perm_of(c) == tuple(perm):
            return c
    return None


# ---- matches ----------------------------------------------------------------------------


@dataclass
class RewireMatch(Match):
    """Replace ``old`` by ``new`` in every reader: the readers are re-created reading ``new``
    (cancel: ``new`` is the input of an inverse pair; dedupe: an identical Transpose)."""

    kind: str
    anchor: object
    dead: List[object]  # Transposes removed with no replacement
    readers: List[object]
    old: object
    new: object

    @property
    def removes(self):
        return list(self.dead) + list(self.readers)

    @property
    def keeps(self):
        return [t for r in self.readers for t in r.outputs if t.name]


@dataclass
class ComposeMatch(Match):
    outer: object
    inner_dead: bool
    inner: object
    perm: Tuple[int, ...]

    @property
    def removes(self):
        return [self.outer] + ([self.inner] if self.inner_dead else [])

    @property
    def keeps(self):
        return [self.outer.outputs[0]]


@dataclass
class FlipMatch(Match):
    anchor: object
    perm: Tuple[int, ...]
    region: List[object]
    #: boundary inputs: tensor -> ("use", tensor) | ("new", source, perm) (a new Transpose)
    inputs: Dict[str, tuple]
    #: boundary outputs: name -> (tensor, absorbed Transpose or None, [(Transpose, perm)] re-made, needs itself)
    outputs: Dict[str, tuple]
    dead_inputs: List[object]
    added: int
    removed: int

    @property
    def removes(self):
        out = list(self.region) + list(self.dead_inputs)
        for _, absorbed, remade, _ in self.outputs.values():
            out += ([absorbed] if absorbed is not None else []) + [t for t, _ in remade]
        return out

    @property
    def keeps(self):
        keep = []
        for y, absorbed, remade, itself in self.outputs.values():
            keep += [y] if itself else []
            keep += [absorbed.outputs[0]] if absorbed is not None else []
            keep += [t.outputs[0] for t, _ in remade]
        return keep


class PropagateTransposes(Rule):
    name = "propagate_transposes"
    ops = ("Transpose",)
    summary = "Transposes cancel, compose, dedupe and move through elementwise ops (NHWC exports -> NCHW blocks)"

    def match(self, ctx: Context, node):
        g = ctx.graph
        if not _is_transpose(node) or node.domain not in _DEFAULT_DOMAINS:
            return None
        perm = perm_of(node)
        if perm is None:
            raise Decline(f"Transpose '{node.name}' has no usable perm (unknown rank or not a permutation)")
        x, y = node.inputs[0], node.outputs[0]
        inner = producer(x)
        if is_identity(perm):
            if g.pinned(y):
                return _cancel_into_producer(g, node, [node], x)
            return _rewire(g, "identity", node, [node], y, x)
        if _is_transpose(inner) and g.in_main_graph(inner) and perm_of(inner) is not None:
            c = compose(perm_of(inner), perm)
            inner_dead = g.sole_consumer(x) is node
            if is_identity(c):
                if g.pinned(y) and inner_dead:
                    return _cancel_into_producer(g, node, [node, inner], inner.inputs[0])
                return _rewire(g, "cancel", node, [node] + ([inner] if inner_dead else []), y, inner.inputs[0])
            return ComposeMatch(node, inner_dead, inner, c)
        twin = _existing_transpose(g, x, perm, exclude={id(node)})
        if twin is not None and not g.pinned(y):
            return _rewire(g, "dedupe", node, [node], y, twin.outputs[0])
        return _best_flip(g, node, perm)

    def rewrite(self, ctx: Context, m) -> Rewrite:
        g = ctx.graph
        if isinstance(m, ComposeMatch):
            t = g.add_node("Transpose", m.outer.name, [m.inner.inputs[0]], [m.outer.outputs[0]], {"perm": list(m.perm)})
            replaced = [n.name for n in m.removes]
            return Rewrite(self.name, m.outer.name, tuple(replaced), (t.name,), "compose")
        if isinstance(m, RenameMatch):
            outputs = [m.new if o is m.old else o for o in m.source.outputs]
            clone = g.add_node(m.source.op, m.source.name, list(m.source.inputs), outputs, dict(m.source.attrs))
            clone.domain = m.source.domain
            return Rewrite(self.name, m.anchor.name, tuple(n.name for n in m.removes), (clone.name,),
                           "cancel before a graph output")
        if isinstance(m, RewireMatch):
            created = [_clone(g, r, m.old, m.new).name for r in m.readers]
            return Rewrite(self.name, m.anchor.name, tuple(n.name for n in m.removes), tuple(created), m.kind)
        return _flip(g, self.name, m)


def _rewire(g, kind, anchor, dead, old, new) -> RewireMatch:
    if g.pinned(old):
        raise Decline(f"'{old.name}' is a graph output or read inside a subgraph; removing "
                      f"'{anchor.name}' would rename it")
    readers = list({id(r): r for r in old.outputs}.values())  # a node may read it twice
    for r in readers:
        if any(isinstance(a, gs.Graph) for a in r.attrs.values()):
            raise Decline(f"'{r.name}' has a subgraph and is not re-created")
    return RewireMatch(kind, anchor, dead, readers, old, new)


@dataclass
class RenameMatch(Match):
    """An inverse pair (or an identity Transpose) before a graph output: the producer of its
    input writes the output itself (``source`` re-created with ``old`` renamed to ``new``)."""

    anchor: object
    pair: List[object]
    source: object
    old: object
    new: object

    @property
    def removes(self):
        return list(self.pair) + [self.source]

    @property
    def keeps(self):
        return [self.new] + [t for t in self.source.outputs if t.name and t is not self.old]


def _cancel_into_producer(g, outer, pair, v) -> RenameMatch:
    source = producer(v)
    if source is None or g.pinned(v) or g.sole_consumer(v) is not pair[-1]:
        raise Decline(f"'{outer.outputs[0].name}' is a graph output and '{v.name}' is not "
                      "an intermediate read only by the inverse pair")
    if any(isinstance(a, gs.Graph) for a in source.attrs.values()):
        raise Decline(f"'{source.name}' has a subgraph and is not re-created")
    return RenameMatch(outer, list(pair), source, v, outer.outputs[0])


def _clone(g, node, old, new):
    """``node`` again, reading ``new`` where it read ``old``, writing the same outputs."""
    inputs = [new if t is old else t for t in node.inputs]
    outputs = list(node.outputs)
    clone = g.add_node(node.op, node.name, inputs, outputs, dict(node.attrs))
    clone.domain = node.domain
    return clone


# ---- region flips ---------------------------------------------------------------------------


def _grow(g, seeds, rank: int, up: bool, down: bool) -> List[object]:
    region, seen, stack = [], set(), [s for s in seeds]
    while stack:
        n = stack.pop()
        if id(n) in seen or not _eligible(g, n, rank):
            continue
        seen.add(id(n))
        region.append(n)
        if up:
            for i in _layout_inputs(n):
                p = producer(n.inputs[i])
                if p is not None and id(p) not in seen:
                    stack.append(p)
        if down:
            for c in g.consumers(n.outputs[0]):
                if id(c) not in seen:
                    stack.append(c)
    return region


def _best_flip(g, node, perm):
    """The cheapest flip of an elementwise region next to ``node``, if it removes Transposes."""
    rank = len(perm)
    x, y = node.inputs[0], node.outputs[0]
    candidates = []
    before = producer(x)
    if before is not None:  # the region producing x, computed in the permuted layout
        for up, down in ((True, True), (True, False)):
            candidates.append((_grow(g, [before], rank, up, down), perm))
    readers = g.consumers(y)
    if readers:  # the region reading y, computed in y's input's layout
        for up, down in ((True, True), (False, True)):
            candidates.append((_grow(g, readers, rank, up, down), inverse(perm)))
    best, reasons = None, []
    for region, p in candidates:
        if not region:
            continue
        try:
            m = _plan(g, node, region, p)
        except Decline as exc:
            reasons.append(str(exc))
            continue
        if best is None or m.removed - m.added > best.removed - best.added:
            best = m
    if best is None:
        if reasons:
            raise Decline(reasons[0])
        return None
    return best


def _plan(g, anchor, region, p) -> FlipMatch:
    inside = {id(n) for n in region}
    produced = {t.name for n in region for t in n.outputs}
    pinv = inverse(p)
    inputs: Dict[str, tuple] = {}
    dead_inputs, added, removed = [], 0, 0
    for n in region:
        for i in _layout_inputs(n):
            u = n.inputs[i]
            if const_value(u) is not None or u.name in produced or u.name in inputs:
                continue
            src = producer(u)
            if _is_transpose(src) and g.in_main_graph(src) and perm_of(src) is not None:
                v, c = src.inputs[0], compose(perm_of(src), p)
                if is_identity(c):
                    inputs[u.name] = ("use", v)
                else:
                    twin = _existing_transpose(g, v, c)
                    inputs[u.name] = ("use", twin.outputs[0]) if twin is not None else ("new", v, c)
                    added += twin is None
                if not g.pinned(u) and all(id(r) in inside for r in u.outputs):
                    dead_inputs.append(src)
                    removed += 1
                continue
            twin = _existing_transpose(g, u, p)
            if twin is not None:
                inputs[u.name] = ("use", twin.outputs[0])
            else:
                inputs[u.name] = ("new", u, p)
                added += 1
    outputs: Dict[str, tuple] = {}
    for n in region:
        y = n.outputs[0]
        absorbed, remade, itself = None, [], g.pinned(y)
        for r in y.outputs:
            if id(r) in inside:
                continue
            if _is_transpose(r) and g.in_main_graph(r) and perm_of(r) is not None:
                c = compose(pinv, perm_of(r))
                if is_identity(c) and absorbed is None:
                    absorbed = r
                    removed += 1
                    continue
                if not is_identity(c):
                    remade.append((r, c))
                    continue
                raise Decline(f"'{y.name}' is read by two identical Transposes (deduplicated first)")
            itself = True
        if absorbed is not None or remade or itself:
            outputs[y.name] = (y, absorbed, remade, itself)
            added += itself
    leaving = {id(a) for _, a, _, _ in outputs.values() if a is not None}
    leaving |= {id(t) for _, _, remade, _ in outputs.values() for t, _ in remade}
    if any(id(t) in leaving for t in dead_inputs):
        raise Decline("a Transpose both leaves and re-enters the region")
    if added >= removed:
        raise Decline(f"moving the layout change through {len(region)} elementwise op(s) would remove "
                      f"{removed} Transpose(s) and add {added}")
    return FlipMatch(anchor, tuple(p), list(region), inputs, outputs, dead_inputs, added, removed)


def _flip(g, rule_name: str, m: FlipMatch) -> Rewrite:
    p, pinv = m.perm, inverse(m.perm)
    created = []
    new_of: Dict[str, object] = {}  # region output name -> its permuted tensor
    for name, (y, absorbed, remade, itself) in m.outputs.items():
        if absorbed is not None:
            new_of[name] = absorbed.outputs[0]
    for n in m.region:
        y = n.outputs[0]
        if y.name not in new_of:
            t = g.variable(f"{y.name}.{'nchw' if p == (0, 3, 1, 2) else 'permuted'}", y)
            t.shape = permute_shape(static_shape(y), p)
            new_of[y.name] = t
    entering: Dict[str, object] = {}
    for name, how in m.inputs.items():
        if how[0] == "use":
            entering[name] = how[1]
        else:
            _, src, perm = how
            t = g.variable(f"{src.name}.permuted", src)
            t.shape = permute_shape(static_shape(src), perm)
            created.append(g.add_node("Transpose", f"{src.name}.transpose", [src], [t], {"perm": list(perm)}).name)
            entering[name] = t
    for n in m.region:
        layout = set(_layout_inputs(n))
        ins = []
        for i, t in enumerate(n.inputs):
            value = const_value(t)
            if i not in layout:
                ins.append(t)
            elif value is not None:
                new = permute_constant(value, p)
                ins.append(t if new.shape == value.shape and np.array_equal(new, value)
                           else g.constant(f"{t.name}.permuted", new, value.dtype))
            elif t.name in new_of:
                ins.append(new_of[t.name])
            else:
                ins.append(entering[t.name])
        node = g.add_node(n.op, n.name, ins, [new_of[n.outputs[0].name]], dict(n.attrs))
        created.append(node.name)
    for name, (y, absorbed, remade, itself) in m.outputs.items():
        if itself:
            created.append(g.add_node("Transpose", f"{y.name}.transpose", [new_of[name]], [y], {"perm": list(pinv)}).name)
        for t, c in remade:
            created.append(g.add_node("Transpose", t.name, [new_of[name]], [t.outputs[0]], {"perm": list(c)}).name)
    detail = f"{len(m.region)} elementwise op(s) to perm {list(p)}: -{m.removed} +{m.added} Transpose(s)"
    return Rewrite(rule_name, m.anchor.name, tuple(n.name for n in m.removes), tuple(created), detail)
