"""store.StoredModel: a large model held by a temporary data file while onnxruntime runs it,
with only a light copy in memory; and the verifier's reference values kept on disk
(docs/architecture.md, "Memory"). Byte counts are measured by scripts, not asserted here."""

import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from dataclasses import replace
from onnx import helper

import onnxrep
from helpers import GraphBuilder, assert_equal_per_channel, ops, random_feeds, run
from onnxrep import cli, modelio, store, verify
from onnxrep.rules import parallel_add
from onnxrep.store import StoredModel


def _model(c=32, blocks=2, dtype=np.float32):
    """RepVGG blocks with c x c x 3 x 3 weights (36 KiB at c=32: above the inline size) and
    small BN vectors (below it), plus a 0-d initializer."""
    b = GraphBuilder([1, c, 8, 8], dtype=dtype)
    x = b.x
    for _ in range(blocks):
        x = b.node("Relu", [b.add(b.bn(b.conv(x, c, c, k=3, bias=False), c), b.bn(b.conv(x, c, c, k=1, bias=False), c),
                                  b.bn(x, c))])
    x = b.node("Mul", [x, b.const(np.array(0.5, dtype=dtype))])
    return b.build(x)


def _parsed(data: bytes) -> bytes:
    """``data`` parsed and serialized again: pieces written one at a time parse as the model
    but are not byte for byte its SerializeToString."""
    model = onnx.ModelProto()
    model.ParseFromString(data)
    return model.SerializeToString()


def _opts():
    o = ort.SessionOptions()
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return o


@pytest.fixture
def spill_all(monkeypatch):
    """Every model with weights is stored on disk, whatever its size."""
    monkeypatch.setattr(modelio, "FILE_SESSION_BYTES", 1)


@pytest.fixture
def temp_dir(tmp_path, monkeypatch):
    """The temporary folder onnxrep's stores are made in (to see what is left there)."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _offsets(light):
    out = {}
    for t in light.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            where = {e.key: e.value for e in t.external_data}
            assert where["location"] == store.DATA_NAME
            out[t.name] = (int(where["offset"]), int(where["length"]))
    return out


def test_a_stored_model_keeps_only_a_light_copy_and_reads_every_weight_back(spill_all, temp_dir):
    model = _model()
    before = model.SerializeToString()
    held = StoredModel(model)
    assert held.spilled and held.tensor_bytes == modelio.tensor_bytes(model)
    offsets = _offsets(held.light)
    big = {t.name for t in model.graph.initializer if len(t.raw_data) >= modelio.EXTERNAL_TENSOR_MIN_BYTES}
    assert set(offsets) == big and len(big) == 4  # the four conv weights; BN vectors and the scalar stay inline
    assert held.light.ByteSize() < model.ByteSize() // 10
    # aligned: large tensors on pages, the rest on 64 bytes
    for name, (offset, length) in offsets.items():
        assert offset % (4096 if length >= 64 << 10 else 64) == 0
    for t in model.graph.initializer:
        assert held.tensor(t.name).SerializeToString() == t.SerializeToString()
        np.testing.assert_array_equal(held.array(t.name), onnx.numpy_helper.to_array(t))
    # written out in pieces and loaded back: the model
    assert _parsed(b"".join(held.serialized_chunks())) == before
    assert held.load().SerializeToString() == before
    assert model.SerializeToString() == before  # the model itself untouched
    folder = held._folder.name
    assert os.listdir(temp_dir) == [os.path.basename(folder)]
    held.close()
    assert os.listdir(temp_dir) == []


def test_sessions_on_a_stored_model_compute_what_the_model_does_and_outlive_its_folder(spill_all, temp_dir):
    model = _model()
    inner = [n.output[0] for n in model.graph.node if n.op_type == "Add"][:2]
    extra = [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in inner]
    feeds = random_feeds(model)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.extend(extra)
    want = run(copy, feeds)
    held = StoredModel(model)
    session = held.session(_opts(), extra)
    assert [o.name for o in session.get_outputs()] == [model.graph.output[0].name] + inner
    held.close()  # the weights stay mapped for the session
    got = session.run(None, feeds)
    assert len(got) == 3
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert os.listdir(temp_dir) == []


def test_a_variant_of_the_light_copy_runs_on_the_same_weights(spill_all):
    model = _model()
    held = StoredModel(model)
    variant = onnx.ModelProto()
    variant.CopyFrom(held.light)
    out = variant.graph.output[0].name
    variant.graph.node[-1].op_type = "Add"  # x * 0.5 -> x + 0.5
    got = held.session(_opts(), light=variant).run(None, random_feeds(model))[0]
    want = run(model, random_feeds(model))[0]
    np.testing.assert_allclose(got, want / 0.5 + 0.5, rtol=1e-5, atol=1e-5)
    assert out == model.graph.output[0].name
    held.close()


def test_a_small_model_or_one_without_room_stays_in_memory(monkeypatch, temp_dir):
    monkeypatch.setattr(modelio, "FILE_SESSION_BYTES", 32 << 20)  # the default (see conftest.py)
    model = _model()
    assert not StoredModel(model).spilled  # below FILE_SESSION_BYTES
    monkeypatch.setattr(modelio, "FILE_SESSION_BYTES", 1)

    def no_room(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "_spill", no_room)
    held = StoredModel(model)
    assert not held.spilled and held.light is model
    assert held.load() is model and _parsed(b"".join(held.serialized_chunks())) == model.SerializeToString()
    np.testing.assert_array_equal(held.session(_opts()).run(None, random_feeds(model))[0],
                                  run(model, random_feeds(model))[0])
    assert os.listdir(temp_dir) == []  # the folder made before the failure is gone
    # a model too large for one protobuf cannot be kept in memory for onnxruntime
    monkeypatch.setattr(modelio, "EXTERNAL_DATA_THRESHOLD", 1)
    with pytest.raises(onnxrep.OnnxrepError, match="No space left on device.*set TMPDIR"):
        StoredModel(model)


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external"])
def test_saving_a_stored_model_writes_the_model(spill_all, tmp_path, external):
    model = _model()
    held = StoredModel(model)
    path = tmp_path / "out.onnx"
    data = modelio.save(held, str(path), external)
    assert (data is not None) == external
    if not external:
        assert _parsed(path.read_bytes()) == model.SerializeToString()
    loaded = onnx.load(str(path))
    assert [t.name for t in loaded.graph.initializer] == [t.name for t in model.graph.initializer]
    for a, b in zip(loaded.graph.initializer, model.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
    onnx.checker.check_model(str(path))
    feeds = random_feeds(model)
    np.testing.assert_array_equal(run(loaded, feeds)[0], run(model, feeds)[0])
    held.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out.onnx"] + ([os.path.basename(data)] if data else []))


def test_optimize_and_the_command_line_verify_from_stores_and_leave_no_temporary_files(spill_all, temp_dir, tmp_path):
    model = _model(blocks=3)
    out, report = onnxrep.optimize(model)
    assert report.verification.ok and ops(out)["Conv"] == 3 and ops(out)["BatchNormalization"] == 0
    src = tmp_path / "in.onnx"
    onnx.save(model, str(src))
    assert cli.main([str(src), "-o", str(tmp_path / "cli.onnx"), "-q"]) == 0
    assert _parsed((tmp_path / "cli.onnx").read_bytes()) == out.SerializeToString()
    assert os.listdir(temp_dir) == []


def test_a_rollback_with_stored_candidates_leaves_no_temporary_files(spill_all, temp_dir, monkeypatch):
    real = parallel_add.merge_parallel

    def wrong(*args, **kwargs):  # wrong for the grouped block only
        p = real(*args, **kwargs)
        return replace(p, bias=p.bias + 0.05) if p.group == 2 else p

    monkeypatch.setattr(parallel_add, "merge_parallel", wrong)
    b = GraphBuilder([1, 32, 8, 8])
    x = b.x
    for g in (1, 2):
        x = b.node("Relu", [b.add(b.bn(b.conv(x, 32, 32, k=3, group=g), 32), b.bn(b.conv(x, 32, 32, k=1, pad=0, group=g), 32),
                                  b.bn(x, 32))])
    model = b.build(x)
    out, report = onnxrep.optimize(model)
    assert report.rolled_back and report.verification.ok
    assert ops(out)["Conv"] == 3  # one block merged, the other keeps its two convs
    assert_equal_per_channel(model, out, random_feeds(model))
    assert os.listdir(temp_dir) == []
    with pytest.raises(onnxrep.VerificationError):
        onnxrep.optimize(model, rollback=False)
    assert os.listdir(temp_dir) == []


# -- the verifier's reference values on disk -------------------------------------------------


def _verdicts(model, candidate, **kwargs):
    v = verify.Verifier(model, {"x": [1, model.graph.input[0].type.tensor_type.shape.dim[1].dim_value, 8, 8]}, "m",
                        **kwargs)
    result = v.check(candidate)
    return v, result, [(c.name, c.ok, c.ratio, c.error) for c in sorted(result.diverging + result.outputs,
                                                                          key=lambda c: c.name)]


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "float16"])
def test_reference_values_on_disk_give_the_same_verdicts(monkeypatch, temp_dir, dtype):
    model = _model(c=8, dtype=dtype)
    wrong = onnx.ModelProto()
    wrong.CopyFrom(model)
    w = next(t for t in wrong.graph.initializer if len(t.dims) == 4)
    arr = onnx.numpy_helper.to_array(w).copy()
    arr[0] += 1
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    in_memory = [_verdicts(model, c)[1:] for c in (model, wrong)]
    monkeypatch.setattr(verify, "STORED_RUNS_BYTES", 0)
    v, *on_disk_right = _verdicts(model, model)
    assert v._folder is not None and all(isinstance(r, verify._RunOnDisk) for r in v._expected[0])
    assert len(os.listdir(v._folder.name)) == verify.DEFAULT_DRAWS
    on_disk = [on_disk_right, _verdicts(model, wrong)[1:]]
    assert [r.ok for r, _ in in_memory] == [r.ok for r, _ in on_disk] == [True, False]
    assert [r.tensors_compared for r, _ in in_memory] == [r.tensors_compared for r, _ in on_disk]
    assert [d for _, d in in_memory] == [d for _, d in on_disk]
    assert in_memory[1][0].first_divergence == on_disk[1][0].first_divergence
    del v
    assert os.listdir(temp_dir) == []


def test_reference_values_on_disk_are_trimmed_to_the_budget(monkeypatch):
    model = _model(c=8)
    monkeypatch.setattr(verify, "STORED_RUNS_BYTES", 0)
    full = verify.Verifier(model, {"x": [1, 8, 8, 8]}, "m")
    small = verify.Verifier(model, {"x": [1, 8, 8, 8]}, "m", tensor_budget=3 * 8 * 8 * 8 * 4 * verify.DEFAULT_DRAWS)
    assert 0 < len(small.tensors) - 1 < len(full.tensors) - 1
    kept = set(small.tensors)
    for run_ in small._expected[0]:
        assert set(verify._values(run_)) == kept
    assert small._stored <= 3 * 8 * 8 * 8 * 4 * verify.DEFAULT_DRAWS
    assert small.check(model).ok


def test_the_rounding_noise_is_measured_the_same_on_a_stored_original(monkeypatch):
    """The perturbed originals are variants of the stored original's light copy (no copy of its
    weights): the noise they measure is the one measured in memory."""
    model = _model(c=8)
    measured = []
    for spill in (False, True):
        if spill:
            monkeypatch.setattr(modelio, "FILE_SESSION_BYTES", 1)
        v = verify.Verifier(model, {"x": [1, 8, 8, 8]}, "m")
        assert v._measure_noise()
        measured.append(v._noise)
    (a,), (b,) = measured  # one input shape
    assert len(a) == len(b) == verify.DEFAULT_DRAWS
    for da, db in zip(a, b):
        assert set(da) == set(db) and len(da) > 1
        assert any(np.any(x > 0) for x in da.values())  # the perturbation moved something
        for name in da:
            np.testing.assert_array_equal(da[name], db[name])


def test_an_interrupted_run_leaves_no_temporary_files(spill_all, temp_dir, tmp_path, monkeypatch):
    model = _model()
    src = tmp_path / "in.onnx"
    onnx.save(model, str(src))
    monkeypatch.setattr(verify, "STORED_RUNS_BYTES", 0)
    seen = []

    def interrupted(self, candidate):
        seen.append(sorted(os.listdir(temp_dir)))
        raise KeyboardInterrupt

    monkeypatch.setattr(verify.Verifier, "check", interrupted)
    assert cli.main([str(src), "-o", str(tmp_path / "out.onnx"), "-q"]) == 130
    assert len(seen[0]) == 2  # the reference values and the candidate were stored
    assert os.listdir(temp_dir) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "tmp"]


def test_the_command_line_writes_external_data_from_a_store(spill_all, temp_dir, tmp_path):
    """An input with external data gets an output with external data, written from the store:
    the data file is the store's, copied, and the model refers to it under its own name."""
    model = _model(blocks=3)
    want, _ = onnxrep.optimize(model)
    src = tmp_path / "in.onnx"
    onnx.save(model, str(src), save_as_external_data=True, location="in.onnx.data", size_threshold=1024)
    out = tmp_path / "out.onnx"
    assert cli.main([str(src), "-o", str(out), "-q"]) == 0
    data = modelio.data_files(str(out))
    assert len(data) == 1 and os.path.basename(data[0]).startswith("out.onnx.")
    loaded = onnx.load(str(out))
    assert [t.name for t in loaded.graph.initializer] == [t.name for t in want.graph.initializer]
    for a, b in zip(loaded.graph.initializer, want.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
    assert os.listdir(temp_dir) == []


def test_a_session_onnxruntime_refuses_leaves_no_temporary_folder(spill_all, temp_dir):
    model = _model()
    model.graph.node[-1].op_type = "NoSuchOp"
    with pytest.raises(Exception) as failure:
        store.session(model, _opts())
    # removed at once, not when the store is collected (the traceback still holds it here)
    assert failure.value is not None and os.listdir(temp_dir) == []
