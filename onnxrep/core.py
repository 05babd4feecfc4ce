"""The optimize pipeline: load -> normalize -> rules to a fixpoint -> verify (bisect and roll
back a failing rewrite) -> report. Nothing is written here; see :mod:`onnxrep.cli` for files."""

from __future__ import annotations

import contextlib
import gc
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Iterable, Iterator, Optional, Sequence, Tuple, Union

import onnx

from .errors import OnnxrepError, UsageError, VerificationError, first_line
from .graph import RepGraph
from .inputs import densify
from .modelio import needs_external_data
from .normalize import (export, import_graph, load_model, normalize, quiet_graphsurgeon, resolve_input_shapes,
                        tensor_shapes, validate)
from .passes import Context, PassResult, RewriteKey, run_to_fixpoint
from .report import Report
from .rules import select_rules
from .runtime import release_memory
from .stats import model_stats
from .store import StoredModel
from .verify import Verifier


def optimize(
    model: Union[str, "os.PathLike[str]", bytes, onnx.ModelProto],
    *,
    input_shapes: Optional[Dict[str, Sequence[int]]] = None,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    only: Optional[Iterable[str]] = None,
    skip: Optional[Iterable[str]] = None,
    enable: Optional[Iterable[str]] = None,
    verify: bool = True,
    verify_draws: int = 5,
    seed: int = 0,
    allow_growth: bool = False,
    rollback: bool = True,
    progress: Optional[Callable[..., None]] = None,
) -> Tuple[onnx.ModelProto, Report]:
    """Re-parameterize a training-structure model into its deploy structure.

    Args:
        model: path (str or os.PathLike) to an .onnx file (external data beside it is read
            too), the serialized model as bytes, or a loaded ModelProto (never modified).
        input_shapes: concrete shapes for inputs with dynamic dims (a dynamic batch axis
            defaults to 1; other dynamic dims must be given). The result keeps its dynamic dims.
        rtol, atol: verification tolerance (docs/verification.md); None picks the defaults for
            the model's computation dtype.
        only, skip: a rule name or several, to restrict to / leave out
            (``onnxrep.rules.DEFAULT_RULES`` lists them).
        enable: rules that are off by default to turn on (``merge_horizontal_convs``).
        verify: compare with the original in onnxruntime; False returns an unverified model.
        verify_draws: number of random input draws compared.
        seed: seed of the random verification inputs (runs are reproducible).
        allow_growth: also apply rewrites that raise FLOPs (misaligned branches, 1x1 -> depthwise
            compositions, concat branches padded with zero taps).
        rollback: on a verification failure, find the rewrite responsible, drop it and keep the
            rest; False raises at the first failure.
        progress: called as ``progress(stage)`` when a stage starts ("normalizing", "rewriting",
            "verifying", "locating a failing rewrite") and ``progress("rewriting", n)`` after
            each rewrite; for a progress display (the CLI shows one on a terminal).

    Returns:
        (optimized model, Report). Raises OnnxrepError (VerificationError) on bad input or when
        no verified result can be produced.
    """
    with optimized(model, input_shapes=input_shapes, rtol=rtol, atol=atol, only=only, skip=skip, enable=enable,
                   verify=verify, verify_draws=verify_draws, seed=seed, allow_growth=allow_growth, rollback=rollback,
                   progress=progress) as (stored, report):
        return stored.load(), report


@contextlib.contextmanager
def optimized(model: Union[str, "os.PathLike[str]", bytes, onnx.ModelProto], **options
              ) -> Iterator[Tuple[StoredModel, Report]]:
    """:func:`optimize` (same arguments) for a caller that writes the result to a file: yields
    the result as a :class:`~onnxrep.store.StoredModel`, whose weights a large result keeps in a
    temporary file until the ``with`` block ends, and the report. ``modelio.save`` writes it
    without loading it whole (docs/architecture.md, "Memory")."""
    o = _Options(**options)  # a TypeError names an unknown option
    with quiet_graphsurgeon():
        stored, report = _optimize(model, o)
    with stored:
        yield stored, report


@dataclass(frozen=True)
class _Options:  # optimize()'s keyword arguments, with the same defaults
    input_shapes: Optional[Dict[str, Sequence[int]]] = None
    rtol: Optional[float] = None
    atol: Optional[float] = None
    only: Optional[Iterable[str]] = None
    skip: Optional[Iterable[str]] = None
    enable: Optional[Iterable[str]] = None
    verify: bool = True
    verify_draws: int = 5
    seed: int = 0
    allow_growth: bool = False
    rollback: bool = True
    progress: Optional[Callable[..., None]] = None


def _silent(stage: str, count: Optional[int] = None) -> None:
    pass


def _optimize(model: Union[str, onnx.ModelProto], o: _Options) -> Tuple[StoredModel, Report]:
    t0 = time.perf_counter()
    progress = o.progress or _silent
    external = False
    notes: list = []
    if isinstance(model, (str, os.PathLike)):
        label = os.fspath(model)
        original, external = load_model(label, notes)
    elif isinstance(model, (bytes, bytearray)):
        label, original = "<bytes>", _parse(bytes(model))
    elif isinstance(model, onnx.ModelProto):
        label, original = "<model>", model
    else:
        raise UsageError(f"optimize() takes a path, bytes or an onnx.ModelProto, not {type(model).__name__}")
    original, note = densify(original, label)  # a copy when there is anything to densify
    notes += [note] if note else []
    validate(original, label)
    rules = select_rules(o.only, o.skip, o.enable)
    shapes = resolve_input_shapes(original, o.input_shapes, label)
    report = Report(input=label, input_shapes=shapes, external_data=external or needs_external_data(original))
    report.warnings.extend(notes)
    overridable = {i.name for i in original.graph.initializer} & {i.name for i in original.graph.input}
    if overridable:
        report.warnings.append(
            f"{len(overridable)} initializer(s) are also graph inputs; they are treated as constants and "
            "the result does not list them as inputs"
        )
    report.timings["load"] = time.perf_counter() - t0

    # The reference runs first and its session is released before the graph is imported, so
    # that its weights are never in memory next to the rewritten graph's (docs/architecture.md).
    verifier = None
    verify_time = 0.0
    if o.verify:
        t2 = time.perf_counter()
        progress("verifying")
        verifier = Verifier(original, shapes, label, rtol=o.rtol, atol=o.atol, draws=o.verify_draws, seed=o.seed)
        release_memory()
        verify_time = time.perf_counter() - t2

    # Normalize once; every build (the first, and each replay while locating a rewrite
    # that fails verification) starts from a copy of the normalized graph.
    t1 = time.perf_counter()
    progress("normalizing")
    normalized = normalize(import_graph(original))
    known_shapes = tensor_shapes(normalized, original, shapes)  # complete where inference alone is not

    shared: dict = {}  # content-keyed results that replays reuse (passes.Context.shared)

    def build(deny: FrozenSet[RewriteKey], limit: Optional[int] = None) -> Tuple[StoredModel, PassResult]:
        graph = normalized.copy()
        progress("rewriting")
        ctx = Context(RepGraph(graph, resolved=known_shapes), allow_growth=o.allow_growth, shared=shared,
                      on_rewrite=lambda n: progress("rewriting", n))
        result = run_to_fixpoint(ctx, rules, deny, limit)
        model = export(graph, original, consume=True)
        del ctx, graph
        gc.collect()  # the rewritten graph holds itself in cycles (graph.COLLECT_BYTES): free its weights now
        # While it is verified, a large result waits in a temporary file that onnxruntime maps,
        # and only its light copy is in memory next to the original (docs/architecture.md).
        return StoredModel(model, spill=verifier is not None), result

    report.before = model_stats(original, shapes, known_shapes)
    candidate, result = build(frozenset())
    report.timings["optimize"] = time.perf_counter() - t1

    try:
        if verifier is not None:
            t2 = time.perf_counter()
            progress("verifying")
            check = verifier.check(candidate)
            deny: FrozenSet[RewriteKey] = frozenset()
            while not check.ok:
                if not result.rewrites:
                    raise VerificationError(f"{label}: {check.describe()}")
                candidate.close()
                progress("locating a failing rewrite")
                bad = _locate(build, verifier, deny, result, check, label)
                if not o.rollback:
                    raise VerificationError(
                        f"{label}: node '{bad.anchor}': rewrite {bad.rule} fails verification; {check.describe()}"
                    )
                report.rolled_back.append(bad)
                deny = deny | {bad.key}
                candidate, result = build(deny)
                check = verifier.check(candidate)
            report.verification = check
            report.timings["verify"] = verify_time + time.perf_counter() - t2
        else:
            report.warnings.append("verification skipped (--no-verify): the result was NOT checked against the original")
    except BaseException:
        candidate.close()
        raise

    report.rewrites = result.rewrites
    report.declines = result.declines
    report.after = model_stats(candidate.light, shapes, known_shapes)
    if report.after.flops > report.before.flops and not o.allow_growth:
        report.warnings.append(f"FLOPs grew from {report.before.flops} to {report.after.flops}")
    report.timings["total"] = time.perf_counter() - t0
    return candidate, report


def _parse(data: bytes) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as exc:
        raise OnnxrepError(f"<bytes>: not a readable ONNX model ({first_line(exc)})") from None
    return model


def _locate(build, verifier: Verifier, deny, result: PassResult, check, label: str):
    """The rewrite responsible for a failed check.

    Verification names the first tensor (in the candidate's order) that differs from the
    original and the node that produces it; the rewrite that created that node is the suspect.
    It is confirmed with two replays (the rewrites before it pass, with it they fail); when
    there is no suspect or it is not confirmed, bisection over the rewrite sequence finds the
    first failing prefix.
    """
    n = len(result.rewrites)
    node = getattr(getattr(check, "first_divergence", None), "node", None)
    suspect = next((i for i in range(n - 1, -1, -1) if node in result.rewrites[i].created), None)

    replays = {n: result}  # prefix -> its PassResult

    def passes(prefix: int) -> bool:
        """Whether the first ``prefix`` rewrites (those not denied) pass verification."""
        model, replays[prefix] = build(deny, prefix)
        with model:
            return verifier.check(model).ok

    if suspect is not None and passes(suspect) and not passes(suspect + 1):
        return result.rewrites[suspect]
    return _bisect(passes, replays, n, label)


def _bisect(passes, replays, n: int, label: str):
    """The first rewrite whose prefix fails verification (prefix 0 must pass); ``replays``
    holds the PassResult of every prefix ``passes`` built."""
    if not passes(0):
        raise VerificationError(f"{label}: the model differs from the original already after normalization")
    lo, hi = 0, n  # prefix lo passes, prefix hi fails
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if passes(mid):
            lo = mid
        else:
            hi = mid
    return replays[hi].rewrites[hi - 1]
