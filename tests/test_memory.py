"""How a run keeps memory down: sessions from files with appended outputs, lazy weights through
normalization, replaced weights freed during rewriting (docs/architecture.md, "Memory").

These check the mechanisms, not byte counts: peak memory is measured by scripts/bench_scale.py
and scripts/bench.py, not asserted in tests.
"""

import gc
import tempfile
import weakref

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import helper

import onnxrep
from helpers import GraphBuilder, ops, random_feeds, run
from onnxrep import graph as graph_module
from onnxrep import modelio, store
from onnxrep.graph import RepGraph
from onnxrep.normalize import import_graph, normalize
from onnxrep.passes import Context, run_to_fixpoint
from onnxrep.rules import select_rules


def _chain(blocks=3, c=8):
    b = GraphBuilder([1, c, 8, 8])
    x = b.x
    for _ in range(blocks):
        x = b.node("Relu", [b.add(b.bn(b.conv(x, c, c, k=3, bias=False), c), b.bn(b.conv(x, c, c, k=1, bias=False), c),
                                  b.bn(x, c))])
    return b.build(x)


def _opts():
    o = ort.SessionOptions()
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return o


@pytest.mark.parametrize("via_file", [False, True], ids=["bytes", "file"])
def test_session_appends_outputs_without_copying_the_model(monkeypatch, via_file):
    model = _chain()
    if via_file:
        monkeypatch.setattr(modelio, "FILE_SESSION_BYTES", 0)
    inner = [n.output[0] for n in model.graph.node if n.op_type == "Add"][:2]
    extra = [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in inner]
    before = model.SerializeToString()
    session = store.session(model, _opts(), extra)
    assert model.SerializeToString() == before  # the model itself is untouched
    names = [o.name for o in session.get_outputs()]
    assert names == [model.graph.output[0].name] + inner
    feeds = random_feeds(model)
    got = session.run(None, feeds)
    # The same values from a copy that declares the outputs the ordinary way.
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.extend(extra)
    want = run(copy, feeds)
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_session_falls_back_to_bytes_when_no_temporary_file_can_be_written(monkeypatch):
    model = _chain()
    monkeypatch.setattr(modelio, "FILE_SESSION_BYTES", 0)

    def no_room(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tempfile, "TemporaryDirectory", no_room)
    session = store.session(model, _opts())
    feeds = random_feeds(model)
    np.testing.assert_array_equal(session.run(None, feeds)[0], run(model, feeds)[0])


def test_optimize_verifies_through_file_sessions(monkeypatch):
    monkeypatch.setattr(modelio, "FILE_SESSION_BYTES", 0)
    out, report = onnxrep.optimize(_chain())
    assert report.verification.ok and not report.rolled_back
    assert ops(out)["Conv"] == 3 and ops(out)["BatchNormalization"] == 0


def test_normalization_leaves_weights_unread(monkeypatch):
    """The normalized graph shares the loaded model's weights instead of copying them: only
    small constants (shapes, pads) are read while normalizing."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    loaded = []
    real = LazyValues.load

    def load(self):
        loaded.append(int(np.prod(self.shape)))
        return real(self)

    monkeypatch.setattr(LazyValues, "load", load)
    model = _chain(c=32)  # 32x32x3x3 weights: above the size inference keeps values for
    g = normalize(import_graph(model))
    assert all(n <= 4096 for n in loaded), loaded  # small constants at most, no conv weight
    conv = next(n for n in g.nodes if n.op == "Conv")
    assert conv.inputs[1].values.shape == (32, 32, 3, 3)
    assert loaded[-1:] == [32 * 32 * 9]  # read now, on first use


def test_replaced_weights_are_freed_during_rewriting(monkeypatch):
    """onnx-graphsurgeon's objects reference themselves, so a replaced weight waits for the
    cycle collector; the graph runs it once enough weight bytes were orphaned."""
    monkeypatch.setattr(graph_module, "COLLECT_BYTES", 1)
    g = normalize(import_graph(_chain(blocks=2)))
    first_conv = next(n for n in g.nodes if n.op == "Conv")
    old = weakref.ref(first_conv.inputs[1].values)
    del first_conv
    gc.disable()  # only the graph's own collection may free it
    try:
        ctx = Context(RepGraph(g))
        result = run_to_fixpoint(ctx, select_rules(None, None, None))
        assert result.rewrites
        assert old() is None
    finally:
        gc.enable()


def test_replaced_weights_wait_for_the_collector_below_the_threshold(monkeypatch):
    """The counterpart: with a threshold never reached, the same weight is still alive after
    rewriting (so the test above can fail)."""
    monkeypatch.setattr(graph_module, "COLLECT_BYTES", 1 << 60)
    g = normalize(import_graph(_chain(blocks=2)))
    first_conv = next(n for n in g.nodes if n.op == "Conv")
    old = weakref.ref(first_conv.inputs[1].values)
    del first_conv
    gc.disable()
    try:
        ctx = Context(RepGraph(g))
        assert run_to_fixpoint(ctx, select_rules(None, None, None)).rewrites
        assert old() is not None
    finally:
        gc.enable()
    gc.collect()
    assert old() is None


def test_default_tensor_budget_follows_the_weights():
    from onnxrep.verify import TENSOR_BUDGET_MAX_BYTES, TENSOR_BUDGET_MIN_BYTES, default_tensor_budget

    assert default_tensor_budget(_chain()) == TENSOR_BUDGET_MIN_BYTES
    big = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        [onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=[1 << 30])]))  # dims alone decide
    assert default_tensor_budget(big) == TENSOR_BUDGET_MAX_BYTES



def test_tensor_bytes_sizes_raw_tensors_from_their_dims():
    from onnx import numpy_helper

    raw = [numpy_helper.from_array(np.ones(s, dt), f"t{i}") for i, (s, dt) in
           enumerate([((3, 4), np.float32), ((5,), np.float16), ((2, 2), np.int64), ((7,), np.bool_), ((), np.float64)])]
    typed = helper.make_tensor("typed", onnx.TensorProto.FLOAT, [3], [1.0, 2.0, 3.0])  # float_data, not raw
    external = numpy_helper.from_array(np.ones(1000, np.float32), "ext")
    external.data_location = onnx.TensorProto.EXTERNAL
    external.ClearField("raw_data")
    g = helper.make_graph([], "g", [], [], raw + [typed, external])
    want = sum(len(t.raw_data) for t in raw) + typed.ByteSize()
    assert modelio.tensor_bytes(helper.make_model(g)) == want


@pytest.mark.parametrize("consume", [False, True])
def test_export_holds_each_weight_once(consume):
    """export() builds the model's initializers one by one (no list of them copied twice
    more); consuming, it drops each rewritten weight from the graph once it is in the model;
    untouched weights are copied from the original without renaming the original's tensors."""
    from onnxrep.normalize import export
    model = _chain(blocks=2)
    before = model.SerializeToString()
    g = normalize(import_graph(model))
    run_to_fixpoint(Context(RepGraph(g)), select_rules(None, None, None))
    rewritten = [t for t in g.tensors().values() if isinstance(t, gs.Constant)
                 and isinstance(t._values, np.ndarray)]
    assert rewritten
    sizes = {t.name: t.values.size for t in rewritten}
    out = export(g, model, consume=consume)
    assert {i.name for i in out.graph.initializer} >= set(sizes)
    assert {i.name: int(np.prod(i.dims)) for i in out.graph.initializer if i.name in sizes} == sizes
    assert all((t._values.size == 0) == consume for t in rewritten)
    assert model.SerializeToString() == before
    onnx.checker.check_model(out)
    feeds = random_feeds(model)
    np.testing.assert_allclose(run(out, feeds)[0], run(model, feeds)[0], rtol=1e-4, atol=1e-5)


def test_serialized_chunks_parse_as_the_model_and_hold_one_tensor_each():
    model = _chain(blocks=2)
    model.graph.doc_string = "graph doc"
    helper.set_model_props(model, {"k": "v"})
    before = model.SerializeToString()
    chunks = list(modelio.serialized_chunks(model))
    assert model.SerializeToString() == before
    assert len(chunks) == 1 + len(model.graph.initializer)
    assert max(len(c) for c in chunks[1:]) < 2 * max(len(t.SerializeToString()) for t in model.graph.initializer)
    parsed = onnx.ModelProto()
    parsed.ParseFromString(b"".join(chunks))
    assert parsed.SerializeToString() == before
