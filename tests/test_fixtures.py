"""Every shipped fixture, in every exporter dialect, ends in its deploy structure, verified.

For each model in models/manifest.json: exactly the expected number of Convs (one per block),
no BatchNormalization, no Add left, and outputs equal to the original within the default
tolerance on inputs independent of onnxrep's own verification draws.
"""

import json
import os

import onnx
import pytest

import onnxrep
from helpers import assert_same_outputs, ops

MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")
with open(os.path.join(MODELS, "manifest.json")) as f:
    MANIFEST = json.load(f)
CORE = [e for e in MANIFEST if e.get("tier", 1) == 1]
EXTENDED = [e for e in MANIFEST if e.get("tier", 1) == 2]
GROWTH = [e for e in MANIFEST if e["expected_conv_allow_growth"] != e["expected_conv"]]


@pytest.mark.parametrize(
    "entries, families",
    [
        (CORE, {"repvgg", "acnet", "mobileone", "orepa_scale"}),
        (EXTENDED, {"dbb_slice", "dbb_padsub", "orepa", "unireplk", "inception", "concat", "chain_nobias",
                    "chain_bias", "bsconv_u", "bsconv_s", "repvgg1d", "repvgg3d", "acnet3d", "unireplk1d"}),
    ],
    ids=["core", "extended"],
)
def test_manifest_covers_every_family_in_three_dialects(entries, families):
    assert families <= {e["family"] for e in entries}
    for family in {e["family"] for e in entries}:
        assert sorted(e["exporter"] for e in entries if e["family"] == family) == ["dynamo", "dynamo_noopt", "ts"]


@pytest.mark.parametrize("entry", CORE, ids=[e["file"] for e in CORE])
def test_core_fixture_reparameterizes(entry):
    path = os.path.join(MODELS, entry["file"])
    original = onnx.load(path)
    out, report = onnxrep.optimize(path)
    assert not report.rolled_back, report.rolled_back  # every rewrite verified on the first try
    counts = ops(out)
    assert counts["Conv"] == entry["expected_conv"] == entry["blocks"]
    assert counts["BatchNormalization"] == 0
    assert counts["Add"] == 0
    assert report.verification.ok and report.verification.max_abs_error < 1e-5
    assert report.after.flops < report.before.flops
    onnx.checker.check_model(out, full_check=True)
    assert [i.name for i in out.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in out.graph.output] == [o.name for o in original.graph.output]
    assert out.opset_import == original.opset_import
    assert_same_outputs(original, out, batch=2 if entry.get("dynamic_batch") else 1)


@pytest.mark.parametrize("entry", EXTENDED, ids=[e["file"] for e in EXTENDED])
def test_extended_fixture_reparameterizes_without_growth(entry):
    path = os.path.join(MODELS, entry["file"])
    original = onnx.load(path)
    out, report = onnxrep.optimize(path)
    assert not report.rolled_back, report.rolled_back  # every rewrite verified on the first try
    counts = ops(out)
    assert counts["Conv"] == entry["expected_conv"], entry["expected_note"]
    assert counts["BatchNormalization"] == 0
    assert report.verification.ok and report.verification.max_abs_error < 2e-5
    assert report.after.flops <= report.before.flops
    onnx.checker.check_model(out, full_check=True)
    assert_same_outputs(original, out, batch=2 if entry.get("dynamic_batch") else 1)


@pytest.mark.parametrize("entry", GROWTH, ids=[e["file"] for e in GROWTH])
def test_growth_rewrites_only_with_allow_growth(entry):
    path = os.path.join(MODELS, entry["file"])
    out, report = onnxrep.optimize(path, allow_growth=True)
    assert not report.rolled_back, report.rolled_back
    assert ops(out)["Conv"] == entry["expected_conv_allow_growth"], entry["expected_note"]
    assert report.after.flops > report.before.flops
    assert_same_outputs(onnx.load(path), out)


PADSUB = [e for e in EXTENDED if e["family"] == "dbb_padsub"]


@pytest.mark.parametrize("entry", PADSUB, ids=[e["file"] for e in PADSUB])
def test_dbb_pad_sub_add_spelling_needs_no_fallback(entry):
    """The specific rules alone (border pad, composition, AvgPool, absorbed growth) finish DBB."""
    path = os.path.join(MODELS, entry["file"])
    out, report = onnxrep.optimize(path, skip=["collapse_affine_region"])
    assert not report.rolled_back, report.rolled_back
    assert ops(out)["Conv"] == entry["expected_conv"]
    assert {"fold_border_pad_into_conv", "compose_sequential_convs"} <= set(report.rules_applied())
    assert_same_outputs(onnx.load(path), out)


HORIZONTAL = [e for e in EXTENDED if "expected_conv_enable_horizontal" in e]


@pytest.mark.parametrize("entry", HORIZONTAL, ids=[e["file"] for e in HORIZONTAL])
def test_horizontal_merge_only_when_enabled(entry):
    path = os.path.join(MODELS, entry["file"])
    out, report = onnxrep.optimize(path, enable="merge_horizontal_convs")
    assert not report.rolled_back, report.rolled_back
    assert ops(out)["Conv"] == entry["expected_conv_enable_horizontal"], entry["expected_note"]
    assert ops(out)["Split"] == 1 and report.after.flops <= report.before.flops
    assert_same_outputs(onnx.load(path), out)
