"""What a run did: statistics before and after, every rewrite, declines, verification, timings.

The JSON form (:meth:`Report.to_dict`, ``--report``) is versioned by ``SCHEMA_VERSION``; every
field is documented in the README ("JSON report"). A run that fails writes a shorter report
(:func:`failure_dict`) with the same schema version, status and error.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from . import __version__
from .passes import Declined, Rewrite
from .stats import ModelStats
from .verify import VerifyResult


#: Bumped when a field of the JSON report changes meaning or disappears (additions keep it).
SCHEMA_VERSION = 1


@dataclass
class Report:
    input: str
    before: Optional[ModelStats] = None
    after: Optional[ModelStats] = None
    rewrites: List[Rewrite] = field(default_factory=list)
    declines: List[Declined] = field(default_factory=list)
    rolled_back: List[Rewrite] = field(default_factory=list)
    verification: Optional[VerifyResult] = None
    input_shapes: Dict[str, List[int]] = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)
    output: Optional[str] = None
    #: the result is written with its tensors in a data file beside it (large or external input)
    external_data: bool = False
    #: file sizes in bytes (model file plus its data files), when known
    input_bytes: Optional[int] = None
    output_bytes: Optional[int] = None

    @property
    def status(self) -> str:
        """'ok' (verified), 'unverified' (--no-verify), or 'unchanged' (verified, but every
        rewrite was rolled back or none applied)."""
        if self.verification is None:
            return "unverified"
        return "ok" if self.rewrites else "unchanged"

    def rules_applied(self) -> Dict[str, int]:
        return dict(Counter(r.rule for r in self.rewrites))

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "onnxrep_version": __version__,
            "status": self.status,
            "input": self.input,
            "output": self.output,
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "external_data": self.external_data,
            "input_shapes": self.input_shapes,
            "before": self.before.to_dict() if self.before else None,
            "after": self.after.to_dict() if self.after else None,
            "rules_applied": self.rules_applied(),
            "rewrites": [asdict(r) for r in self.rewrites],
            "declines": [asdict(d) for d in self.declines],
            "rolled_back": [asdict(r) for r in self.rolled_back],
            "verification": _verification_dict(self.verification),
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
            "warnings": self.warnings,
        }

    def __str__(self) -> str:
        return self.summary()

    def summary(self, verbose: bool = False) -> str:
        lines = [f"onnxrep: {self.input} -> {self.output or '(not written)'}"]
        b, a = self.before, self.after
        if b and a:
            at = ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in self.input_shapes.items())
            lines.append(
                f"  nodes {b.nodes} -> {a.nodes} | Conv {b.convs} -> {a.convs} | "
                f"params {_si(b.params)} -> {_si(a.params)} | FLOPs {_si(b.flops)} -> {_si(a.flops)} (at {at})"
            )
            lines += _op_table(b.ops, a.ops)
        if self.input_bytes is not None and self.output_bytes is not None:
            lines.append(f"  size {_bytes(self.input_bytes)} -> {_bytes(self.output_bytes)}")
        applied = self.rules_applied()
        lines.append("  rewrites: " + (", ".join(f"{k} x{v}" for k, v in applied.items()) if applied else "none"))
        for r in self.rolled_back:
            lines.append(f"  rolled back: {r.rule} at '{r.anchor}' (failed verification; the rest was kept)")
        if self.rolled_back and not self.rewrites:
            lines.append("  warning: every rewrite failed verification and was rolled back: the result computes "
                         "exactly what the input does, unchanged in structure")
        if self.declines and not verbose:
            lines.append(f"  {len(self.declines)} match(es) declined (-v shows why)")
        if self.verification is not None:
            lines.append("  " + self.verification.describe())
        else:
            lines.append("  NOT VERIFIED (--no-verify)")
        if self.timings:
            lines.append("  time: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items()))
        for w in self.warnings:
            lines.append(f"  warning: {w}")
        if verbose:
            for r in self.rewrites:
                cost = f", FLOPs {r.flops[0]} -> {r.flops[1]}" if r.flops else ""
                lines.append(f"  + {r.rule} at '{r.anchor}': {r.detail} [{len(r.replaced)} nodes -> {len(r.created)}{cost}]")
            for d in self.declines:
                lines.append(f"  - {d.rule} declined at '{d.node}': {d.reason}")
        return "\n".join(lines)


def failure_dict(input: str, status: str, error: str, output: Optional[str] = None) -> dict:
    """The JSON report of a run that produced no result (status 'verification_failed' or
    'error'): the same schema version, what failed and why."""
    return {"schema_version": SCHEMA_VERSION, "onnxrep_version": __version__, "status": status,
            "input": input, "output": output, "error": error}


def _op_table(before: Dict[str, int], after: Dict[str, int]) -> List[str]:
    """Per-op-type counts before and after, for the op types that changed, and the total."""
    changed = sorted((op for op in set(before) | set(after) if before.get(op, 0) != after.get(op, 0)),
                     key=lambda op: (-before.get(op, 0), op))
    if not changed:
        return []
    width = max(len(op) for op in changed + ["total"])
    rows = [f"  {'op':{width}s}  before  after"]
    for op in changed:
        rows.append(f"  {op:{width}s}  {before.get(op, 0):6d}  {after.get(op, 0):5d}")
    rows.append(f"  {'total':{width}s}  {sum(before.values()):6d}  {sum(after.values()):5d}")
    return rows


def _bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _verification_dict(v: Optional[VerifyResult]):
    if v is None:
        return None
    first = v.first_divergence
    return {
        "ok": v.ok,
        "criterion": v.criterion(),
        "dtype": v.dtype,
        "rtol": v.rtol,
        "floor_rel": v.floor_rel,
        "atol": v.atol,
        "draws": v.draws,
        "draw_kinds": v.draw_kinds,
        "shapes": v.shapes,
        "max_abs_error": v.max_abs_error,
        "max_error_ratio": v.max_error_ratio,
        "worst_tensor": asdict(v.worst_tensor) if v.worst_tensor else None,
        "tensors_compared": v.tensors_compared,
        "first_divergence": asdict(first) if first else None,
        "diverging": [asdict(c) for c in v.diverging[:10]],
        "outputs": [asdict(o) for o in v.outputs],
        "notes": v.notes,
    }


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))
