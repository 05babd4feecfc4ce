"""External data: models stored with external tensors (or too large for one protobuf) are
read, verified and written with their tensors in a data file beside the output."""

import os
import re

import onnx

from helpers import GraphBuilder, assert_same_outputs, ops
from onnxrep import modelio
from onnxrep.cli import main


def _block_model():
    b = GraphBuilder([1, 8, 8, 8])
    y = b.add(b.bn(b.conv(b.x, 8, 8, k=3, bias=False), 8), b.bn(b.conv(b.x, 8, 8, k=1, bias=False), 8), b.bn(b.x, 8))
    return b.build(b.node("Relu", [y]))


def _data_file(model_path) -> str:
    """The name of the one data file beside ``model_path`` that the model refers to."""
    (data,) = modelio.data_files(str(model_path))
    assert os.path.dirname(data) == os.path.dirname(str(model_path)) and os.path.isfile(data)
    assert re.fullmatch(r".*\.[0-9a-f]{8}\.data", data)  # a name of its own: see docs/files.md
    return os.path.basename(data)


def test_external_data_input_gives_external_data_output(tmp_path):
    model = _block_model()
    src = tmp_path / "in" / "model.onnx"
    src.parent.mkdir()
    stored = onnx.ModelProto()
    stored.CopyFrom(model)  # onnx.save turns the tensors of what it saves into references
    onnx.save(stored, str(src), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    out = tmp_path / "model.rep.onnx"
    assert main([str(src), "-o", str(out), "-q"]) == 0
    assert _data_file(out).startswith("model.rep.onnx.")
    written = onnx.load(str(out), load_external_data=False)
    assert modelio.uses_external_data(written)
    loaded = onnx.load(str(out))
    assert ops(loaded) == {"Conv": 1, "Relu": 1}
    assert_same_outputs(model, loaded)


def test_large_models_are_verified_and_written_with_external_data(tmp_path, monkeypatch):
    # Stand-in for the 2 GiB protobuf limit: lower the threshold instead of writing gigabytes.
    monkeypatch.setattr(modelio, "EXTERNAL_DATA_THRESHOLD", 1024)
    model = _block_model()
    src = tmp_path / "model.onnx"
    onnx.save(model, str(src))
    out = tmp_path / "out.onnx"
    assert main([str(src), "-o", str(out), "-q"]) == 0
    assert modelio.uses_external_data(onnx.load(str(out), load_external_data=False))
    assert _data_file(out).startswith("out.onnx.")
    assert_same_outputs(model, onnx.load(str(out)))


def test_failed_write_leaves_no_data_file(tmp_path, monkeypatch):
    monkeypatch.setattr(modelio, "EXTERNAL_DATA_THRESHOLD", 1024)

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    src = tmp_path / "model.onnx"
    onnx.save(_block_model(), str(src))
    out = tmp_path / "out.onnx"
    assert main([str(src), "-o", str(out), "-q"]) == 2  # an OS error is the user's to fix: exit 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
