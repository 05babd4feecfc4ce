"""The Python API takes what users have: a path (str or Path), bytes, a ModelProto; one rule
name or several; and prints a readable report."""

from pathlib import Path

import onnx
import pytest

import onnxrep
from helpers import ops

MODEL = Path(__file__).resolve().parents[1] / "models" / "repvgg_ts.onnx"


@pytest.mark.parametrize("kind", ["str", "path", "bytes", "proto"])
def test_optimize_accepts_paths_bytes_and_protos(kind):
    given = {"str": str(MODEL), "path": MODEL, "bytes": MODEL.read_bytes(), "proto": onnx.load(str(MODEL))}[kind]
    before = onnx.load(str(MODEL)).SerializeToString()
    out, report = onnxrep.optimize(given)
    assert ops(out)["Conv"] == 5 and report.verification.ok
    if kind == "proto":
        assert given.SerializeToString() == before  # never modified


def test_only_takes_one_name_or_several():
    _, one = onnxrep.optimize(MODEL, only="merge_parallel_add")
    _, several = onnxrep.optimize(MODEL, only=["merge_parallel_add", "fold_bn_into_conv"])
    assert one.rules_applied() == several.rules_applied() == {"merge_parallel_add": 5}
    with pytest.raises(onnxrep.UsageError, match="unknown rule 'm'"):
        onnxrep.optimize(MODEL, only=["m"])


def test_bad_model_arguments_are_one_line_errors():
    with pytest.raises(onnxrep.OnnxrepError, match="not a readable ONNX model"):
        onnxrep.optimize(b"\x08\xff garbage")
    with pytest.raises(onnxrep.UsageError, match="not int"):
        onnxrep.optimize(3)


def test_report_prints_as_its_summary():
    _, report = onnxrep.optimize(MODEL)
    text = str(report)
    assert text == report.summary()
    assert "Conv 10 -> 5" in text and "verified" in text and "Report(" not in text


def test_save_writes_atomically_and_round_trips(tmp_path):
    out, _ = onnxrep.optimize(MODEL)
    target = tmp_path / "m.rep.onnx"
    assert onnxrep.save(out, target) is None  # no data file for a small model
    assert onnx.load(str(target)).SerializeToString() == out.SerializeToString()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.rep.onnx"]


def test_optimized_hands_over_the_result_for_writing(tmp_path, monkeypatch):
    from onnxrep import modelio

    monkeypatch.setattr(modelio, "FILE_SESSION_BYTES", 1)  # store even this small model
    want, _ = onnxrep.optimize(MODEL)
    with onnxrep.optimized(MODEL, only=None) as (model, report):
        assert model.spilled and report.verification.ok
        assert onnxrep.save(model, tmp_path / "out.onnx") is None
    assert not model.spilled  # its temporary folder is gone
    assert onnx.load(str(tmp_path / "out.onnx")).SerializeToString() == want.SerializeToString()
    with pytest.raises(TypeError, match="verfy"):
        with onnxrep.optimized(MODEL, verfy=False):
            pass
