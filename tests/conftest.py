import os
import sys

# Test modules in sub-folders import the shared helpers as `helpers`.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _store_everything(monkeypatch):
    """With ONNXREP_TEST_STORE_ALL=1, every model with weights is held by a temporary data file
    and every draw's reference values go to disk, whatever their size: the paths large models
    take (docs/architecture.md, "Memory") run on the small test models. CI runs a sample so."""
    if os.environ.get("ONNXREP_TEST_STORE_ALL") == "1":
        from onnxrep import modelio, verify

        monkeypatch.setattr(modelio, "FILE_SESSION_BYTES", 1)
        monkeypatch.setattr(verify, "STORED_RUNS_BYTES", 0)
