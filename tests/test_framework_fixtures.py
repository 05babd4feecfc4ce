"""Fixtures exported by other frameworks reach their deploy structure, verified.

Each folder ``models/<exporter>/`` (tf2onnx, paddle2onnx, jax2onnx, ...) holds small exported
models and a ``manifest.json`` written by the export script in scripts/. Every entry names the
file, the framework and exporter versions it came from, and the deploy reference: the operator
counts of the same network exported in its deploy structure (``deploy_ops``). onnxrep must reach
at most those counts for each operator listed in ``compare_ops`` and leave no per-channel
``Mul`` (a Mul by a constant) when ``no_channel_mul`` is set, with outputs equal to the original
on inputs independent of onnxrep's own verification draws.
"""

import glob
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxrep
from helpers import assert_same_outputs, ops

MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")


def _entries():
    out = []
    for manifest in sorted(glob.glob(os.path.join(MODELS, "*", "manifest.json"))):
        folder = os.path.dirname(manifest)
        with open(manifest) as f:
            for entry in json.load(f):
                out.append(dict(entry, path=os.path.join(folder, entry["file"]),
                                id=os.path.relpath(os.path.join(folder, entry["file"]), MODELS)))
    return out


ENTRIES = _entries()


def _channel_muls(model: onnx.ModelProto) -> int:
    """Mul nodes with an initializer or Constant operand: per-channel scales a fold should absorb."""
    consts = {i.name for i in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return sum(1 for n in model.graph.node if n.op_type == "Mul" and any(i in consts for i in n.input))


def test_manifests_are_complete():
    for e in ENTRIES:
        for key in ("file", "framework", "exporter", "family", "dynamic_batch", "deploy_ops", "compare_ops"):
            assert key in e, (e["id"], key)
        assert os.path.isfile(e["path"]), e["id"]


#: The newest default-domain opset every supported onnxruntime runs (1.18.1, the minimum, runs 21).
RUNTIME_OPSET_FLOOR = 21


def _newer_than_the_runtime(model: onnx.ModelProto):
    """Why the installed onnxruntime cannot run ``model`` when its opset is newer than the oldest
    supported onnxruntime's (jax2onnx writes opset 23), else None: such a fixture is skipped on an
    old runtime, never on one that loads it."""
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset <= RUNTIME_OPSET_FLOOR:
        return None
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
        return f"opset {opset}: onnxruntime {ort.__version__} cannot load it ({str(exc).splitlines()[0][:100]})"
    return None


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["id"] for e in ENTRIES])
def test_framework_fixture_reaches_deploy_structure(entry):
    original = onnx.load(entry["path"])
    reason = _newer_than_the_runtime(original)
    if reason:
        pytest.skip(reason)
    out, report = onnxrep.optimize(entry["path"])
    assert report.verification.ok
    counts = ops(out)
    for op in entry["compare_ops"]:
        assert counts[op] <= entry["deploy_ops"].get(op, 0), (op, dict(counts), entry["deploy_ops"])
    if entry.get("no_channel_mul"):
        assert _channel_muls(out) == 0, dict(counts)
    onnx.checker.check_model(out, full_check=True)
    assert [i.name for i in out.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in out.graph.output] == [o.name for o in original.graph.output]
    assert_same_outputs(original, out, batch=2 if entry["dynamic_batch"] else 1)
    np.testing.assert_array_less(report.after.flops - 1, report.before.flops)
