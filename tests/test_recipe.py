"""The README recipe end to end, from an exported model to onnxruntime inference: the export
step (torch.onnx.export, both exporters) is what produced the shipped fixtures
(scripts/export_models.py); from there the recipe's commands run as written."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("exported", ["repvgg_dynamo.onnx", "repvgg_ts.onnx"])
def test_export_then_onnxrep_then_onnxruntime(exported, tmp_path):
    src = ROOT / "models" / exported
    out = tmp_path / "model.rep.onnx"
    p = subprocess.run([sys.executable, "-m", "onnxrep", str(src), str(out), "--report", str(tmp_path / "r.json")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr

    # Inference as a user runs it: default onnxruntime optimizations, a batch of 4.
    before = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    after = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    name = after.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    want, got = before.run(None, {name: x})[0], after.run(None, {name: x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))
