"""Property-based tests of ``onnxrep.optimize`` on random re-parameterizable blocks.

The models come from ``strategies.py`` (random kernel sizes 1..7, square / 1xK / Kx1, strides 1
and 2, symmetric and asymmetric pads, dilations 1..3, groups 1 / 2 / depthwise; branches conv,
conv+BN, identity, BN-only, 1x1 -> AvgPool, 1x1 -> KxK, DBB's bias-valued border
pad(y - v) + v, Concat, Relu inside a branch; 1..3 blocks; opsets 11..21), written in several
spellings: per-channel Mul / Div / Add / Sub / c - y / scalar Mul (and a spatial Mul that is not
per-channel), pads as a Pad node (with and without the opset-18 axes input, zero or non-zero
value), auto_pad, weights shared between convs, count_include_pad=0, operand order, chained or
balanced Add trees, a branch that broadcasts over channels, intermediates that are graph
outputs, dynamic batch.

Properties:

1. ``optimize`` returns a model whose outputs equal the original's on fresh inputs, without
   rolling anything back, or raises a clean ``OnnxrepError`` (never another exception type).
   A rollback means a rule produced a wrong rewrite that verification had to catch, and a
   ``VerificationError`` on these valid float32 models means either normalization changed the
   model or no rewrite could be isolated: both are failures here, not clean refusals.
2. FLOPs never grow by default.
3. Fully linear, aligned blocks separated by Relu collapse to exactly one Conv per block.

Settings (environment): ``ONNXREP_PROPERTY_PROFILE`` "ci" (default: 25 examples per property,
no shrinking) or "thorough" (300 examples, shrinking to a minimal failing model);
``ONNXREP_PROPERTY_EXAMPLES`` overrides the count. Examples are derandomized (the same every
run); ``ONNXREP_PROPERTY_RANDOM=1`` draws fresh ones instead.
Tolerances are helpers.assert_same_outputs' defaults (rtol 1e-4, atol 1e-5 against max|ref|).
"""

from __future__ import annotations

import os
from collections import Counter

import onnx
import pytest
from hypothesis import HealthCheck, Phase, given, note, settings

import onnxrep
from helpers import assert_same_outputs, ops
from strategies import linear_model_specs, model_specs, runnable_model

PROFILE = os.environ.get("ONNXREP_PROPERTY_PROFILE", "ci")
_DEFAULT_EXAMPLES = {"ci": 25, "thorough": 300}
EXAMPLES = int(os.environ.get("ONNXREP_PROPERTY_EXAMPLES", str(_DEFAULT_EXAMPLES.get(PROFILE, 25))))
RANDOM = os.environ.get("ONNXREP_PROPERTY_RANDOM", "0") not in ("", "0")

_COMMON = dict(
    deadline=None,
    derandomize=not RANDOM,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
# "ci": fixed examples and no shrinking, so a failing property costs seconds, not minutes (the
# failing example is still printed in full, with a one-line-per-block description).
settings.register_profile("onnxrep-ci", max_examples=EXAMPLES,
                          phases=[Phase.explicit, Phase.generate, Phase.target], **_COMMON)
# "thorough": more examples and shrinking to a minimal failing model.
settings.register_profile("onnxrep-thorough", max_examples=EXAMPLES, **_COMMON)
#: Applied per test (loading a profile globally would change other modules' hypothesis settings).
PROPERTY = settings(settings.get_profile(f"onnxrep-{PROFILE}"))


def _summary(report) -> str:
    return report.summary(verbose=True) if report is not None else "(no report)"


def _optimize(model):
    """(optimized model, report), or (None, exception) for a clean OnnxrepError refusal."""
    try:
        return onnxrep.optimize(model)
    except onnxrep.VerificationError as exc:
        pytest.fail(f"VerificationError on a valid model (normalization or an unisolated rewrite is wrong): {exc}")
    except onnxrep.OnnxrepError as exc:
        return None, exc


@PROPERTY
@given(spec=model_specs())
def test_outputs_equal_or_clean_refusal(spec):
    model = runnable_model(spec)
    out, report = _optimize(model)
    if out is None:
        note(f"declined cleanly: {report}")
        return
    note(_summary(report))
    assert not report.rolled_back, (
        "a rewrite failed onnxrep's own verification and was rolled back: "
        + "; ".join(f"{r.rule} at '{r.anchor}' ({r.detail})" for r in report.rolled_back)
    )
    onnx.checker.check_model(out, full_check=True)
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    assert_same_outputs(model, out, batch=2 if spec.dynamic_batch else 1)
    # A Relu inside a branch (or between blocks) is not linear: nothing may remove it.
    assert ops(out)["Relu"] == ops(model)["Relu"]


@PROPERTY
@given(spec=model_specs())
def test_flops_never_grow_by_default(spec):
    model = runnable_model(spec)
    out, report = _optimize(model)
    if out is None:
        return
    note(_summary(report))
    assert report.after.flops <= report.before.flops, (
        f"FLOPs grew {report.before.flops} -> {report.after.flops}; rewrites: "
        + "; ".join(f"{r.rule} at '{r.anchor}': {r.detail}" for r in report.rewrites)
    )


@PROPERTY
@given(spec=linear_model_specs())
def test_linear_aligned_blocks_collapse_to_one_conv_each(spec):
    """Blocks drawn by ``linear_model_specs``, each exactly one conv of its main branch's window:

    * Add of branches on the block input, all with the block's stride and groups: the main
      branch (Conv, dilation 1, optional bias / BN / per-channel affine op) and any of: Conv or
      Conv+BN (dilated or not, 1xK / Kx1 / square) whose window lies inside the main window;
      identity and BN-only (stride 1, Cout == Cin, "same" output); 1x1 -> KxK and
      1x1 -> AvgPool(count_include_pad=1) inside the main window whose first conv is bias-free
      (no bias, no BN) when the second op pads, or whose border is written bias-valued as
      pad(y - v) + v, or whose second op does not pad (then a first bias / BN is fine);
    * Concat of group-1 Conv / Conv+BN branches that share one window (no zero taps).

    Convs may be spelled with a zero Pad node before them, auto_pad, or weights shared with an
    earlier conv; per-channel Mul / Div / Add / Sub / c - y / scalar Mul may follow any branch.
    Excluded (not one conv, or one that costs more): Relu inside a branch, spatially varying
    constants, non-zero Pad values, count_include_pad=0 with pads, a first bias under zero
    padding, misaligned windows, dilated main branches, grouped or unequal Concat branches.

    Every such block equals one conv with the main branch's window and groups, which costs no
    more than the main branch alone, so collapsing it is exact and never raises FLOPs.
    """
    model = runnable_model(spec)
    try:
        out, report = onnxrep.optimize(model)
    except onnxrep.OnnxrepError as exc:
        pytest.fail(f"optimize refused a linear, aligned model: {exc}")
    note(_summary(report))
    assert not report.rolled_back
    relus = sum(1 for block in spec.blocks if block.relu)
    # a block whose conv only scales and shifts each channel (1x1, stride 1, diagonal) is then
    # lowered to Mul and/or Add (Identity when it is the identity)
    lowered = sum(1 for r in report.rewrites if r.rule == "lower_channel_affine_conv")
    counts = ops(out)
    elementwise = sum(counts.pop(op, 0) for op in ("Mul", "Add", "Identity"))
    assert counts == Counter({"Conv": len(spec.blocks) - lowered, "Relu": relus}) - Counter(), (
        f"expected {len(spec.blocks)} Conv ({lowered} lowered) and {relus} Relu, got {dict(ops(out))}; declines: "
        + "; ".join(f"{d.rule} at '{d.node}': {d.reason}" for d in report.declines)
    )
    assert lowered <= elementwise <= 2 * lowered, dict(ops(out))
    assert_same_outputs(model, out, batch=2 if spec.dynamic_batch else 1)


# --------------------------------------------------------------------------------------
# Bugs the properties above found, fixed since: their minimal reproductions stay as tests.
# --------------------------------------------------------------------------------------


def _flops(model):
    out, report = onnxrep.optimize(model)
    assert_same_outputs(model, out)
    return out, report


def test_regression_zero_bias_of_merged_convs_counts_as_flops():
    from helpers import GraphBuilder

    b = GraphBuilder([1, 1, 5, 5])
    y = b.node("Concat", [b.conv(b.x, 1, 1, k=1, bias=False), b.conv(b.x, 1, 1, k=1, bias=False)], axis=1)
    _, report = _flops(b.build(y))
    assert report.after.flops <= report.before.flops  # 100 -> 150


def test_regression_dilated_branch_merged_into_dense_kernel():
    from helpers import GraphBuilder

    b = GraphBuilder([1, 4, 8, 8])
    y = b.add(b.conv(b.x, 4, 4, k=3, dilation=2, bias=False), b.bn(b.x, 4))
    _, report = _flops(b.build(y))
    assert report.after.flops <= report.before.flops  # 3x3 d2 + BN -> dense 5x5: 19200 -> 51456


def test_regression_horizontal_merge_densifies_dilated_convs():
    from helpers import GraphBuilder

    b = GraphBuilder([1, 4, 8, 8])
    outs = [b.node("Relu", [b.conv(b.x, 4, 2, k=3, dilation=2)]) for _ in range(3)]
    _, report = _flops(b.build(b.node("Concat", outs, axis=1)))
    assert report.after.flops <= report.before.flops  # 28416 -> 77568


def test_regression_border_pad_fold_without_composition_raises_flops():
    import numpy as np
    from helpers import GraphBuilder

    b = GraphBuilder([1, 8, 8, 8])
    v = b.rand(1, 2, 1, 1)
    c = b.node("Conv", [b.x, b.const(b.rand(2, 8, 1, 1)), b.const(v.reshape(2))])
    pads = b.const(np.array([0, 0, 2, 2, 0, 0, 2, 2], np.int64))
    y = b.node("Add", [b.node("Pad", [b.node("Sub", [c, b.const(v)]), pads]), b.const(v)])
    _, report = _flops(b.build(b.conv(y, 2, 8, k=5, pad=0)))
    assert report.after.flops <= report.before.flops  # 54592 -> 56608


def test_regression_1x1_then_avgpool_composed_into_costlier_conv():
    from helpers import GraphBuilder

    b = GraphBuilder([1, 5, 5, 5])
    y = b.conv(b.x, 5, 5, k=1, group=5, bias=False)
    y = b.node("AveragePool", [y], kernel_shape=[6, 6], strides=[2, 2], pads=[2, 4, 4, 2], count_include_pad=1)
    _, report = _flops(b.build(y))
    assert report.after.flops <= report.before.flops  # 295 -> 3285


def test_regression_symbolic_batch_splits_add_tree():
    import numpy as np
    from helpers import GraphBuilder

    b = GraphBuilder(["N", 4, 5, 5])
    p = b.node("Pad", [b.x, b.const(np.array([3, 3, 3, 3], np.int64)), "", b.const(np.array([2, 3], np.int64))])
    left = b.add(b.conv(p, 4, 4, k=7, pad=0), b.bn(b.x, 4))
    mid = b.conv(b.x, 4, 1, k=1, pad=0, bias=False)
    right = b.add(b.x, b.conv(mid, 1, 4, k=7, pad=3))
    model = b.build(b.node("Relu", [b.add(left, right)]), opset=18)
    out, _ = onnxrep.optimize(model)
    assert_same_outputs(model, out, batch=2)
    assert ops(out) == {"Conv": 1, "Relu": 1}  # with a static batch it is; here 3 Conv + 2 Add
