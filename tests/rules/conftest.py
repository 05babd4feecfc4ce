"""Every rule test runs with rollback turned into a failure: a rule's rewrite must verify on
the first try. A rollback would mean the rule wrote a wrong model that verification caught,
which a rule test must never hide."""

import pytest

from onnxrep import core


@pytest.fixture(autouse=True)
def no_rollback(monkeypatch):
    def fail(build, verifier, deny, result, check, label):
        raise AssertionError(f"a rewrite failed verification and would have been rolled back: {check.describe()}")

    monkeypatch.setattr(core, "_locate", fail)
