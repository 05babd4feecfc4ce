"""What onnxrep accepts as input (DESIGN 5, "Bad input"), and onnxruntime kept quiet.

1. onnxruntime prints nothing: no warnings on success, no log lines before an error, and
   its error messages are reduced to their meaning.
2. Malformed models get one line naming the file and the node (exit 2), never a traceback
   from onnx-graphsurgeon or onnxruntime; models onnxruntime runs are not refused for being
   untidy (nodes out of order, outputs without a declared shape, stale value_info).
3. Exporter leftovers: an unconverted framework op in the default domain, with binary
   attributes, is named with its op.
4. Sparse initializers are densified on load, and the result is verified.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path
from typing import List

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import GraphBuilder, assert_same_outputs, ops

import onnxrep
from onnxrep import cli, runtime, store
from onnxrep.errors import OnnxrepError
from onnxrep.normalize import load_model, validate

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


def run_cli(*args, subprocess_run: bool = False):
    argv = [str(a) for a in args]
    if subprocess_run:
        p = subprocess.run([sys.executable, "-m", "onnxrep", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
        return p.returncode, p.stdout, p.stderr
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue()


def assert_one_line(rc: int, out: str, err: str, *needles: str, code: int = 2) -> None:
    assert rc == code, err
    assert out == ""
    assert "Traceback" not in err and "\x1b" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())  # no checker: these are deliberately odd
    return path


# --------------------------------------------------------------------------------------
# 1. onnxruntime stays quiet
# --------------------------------------------------------------------------------------


def test_success_prints_nothing_with_quiet(tmp_path):
    # dynamo=True, optimize=False: onnxruntime's constant folding used to print ~50 warnings
    rc, out, err = run_cli(MODELS / "dbb_slice_dynamo_noopt.onnx", "-q", "-o", tmp_path / "out.onnx", subprocess_run=True)
    assert (rc, out, err) == (0, "", "")


def function_arity_mismatch() -> onnx.ModelProto:
    """Passes onnx's checks; onnxruntime refuses it when it builds the session."""
    f = onnx.FunctionProto(name="Act", domain="local", input=["a"], output=["b"],
                           node=[helper.make_node("Relu", ["a"], ["b"])], opset_import=[helper.make_opsetid("", 17)])
    b = GraphBuilder([1, 4, 8, 8])
    y = b.conv(b.x, 4, 4)
    b.nodes.append(helper.make_node("Act", [y, y], ["z"], domain="local", name="act"))
    graph = helper.make_graph(b.nodes, "g", b.inputs, [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 8, 8])],
                              b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                              functions=[f])
    model.ir_version = 8
    return model


def reshape_to_input_shape() -> onnx.ModelProto:
    """onnxruntime builds the session, then fails while running it (the shape comes from an
    int64 input that verification draws at random)."""
    b = GraphBuilder([1, 4, 8, 8])
    b.inputs.append(helper.make_tensor_value_info("shape", TensorProto.INT64, [2]))
    y = b.node("Reshape", [b.conv(b.x, 4, 4), "shape"])
    graph = helper.make_graph(b.nodes, "g", b.inputs, [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("make, needle", [
    (function_arity_mismatch, "Number of actual parameters cannot exceed number of formal parameters"),
    (reshape_to_input_shape, "cannot be reshaped"),
], ids=["at_session_creation", "while_running"])
def test_onnxruntime_error_is_one_line(make, needle, tmp_path):
    path = save(make(), tmp_path / "m.onnx")
    rc, out, err = run_cli(path, "-q", subprocess_run=True)
    assert_one_line(rc, out, err, str(path), needle)
    assert "[ONNXRuntimeError]" not in err and "/onnxruntime_src/" not in err


def test_session_is_silent_whatever_the_options(capfd):
    opts = ort.SessionOptions()
    opts.log_severity_level = 0  # verbose
    sess = store.session(reshape_to_input_shape(), opts)
    assert opts.log_severity_level == runtime.QUIET
    with pytest.raises(Exception) as info:
        sess.run(None, {"x": np.zeros((1, 4, 8, 8), np.float32), "shape": np.array([5, 7], np.int64)})
    assert str(info.value).startswith("Non-zero status code returned while running Reshape node")
    assert "The input tensor cannot be reshaped to the requested shape" in str(info.value)
    assert capfd.readouterr() == ("", "")


ORT_MESSAGES = {
    "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Reshape node. Name:'' Status Message: "
    "/onnxruntime_src/onnxruntime/core/providers/cpu/tensor/reshape_helper.h:91 onnxruntime::ReshapeHelper::ReshapeHelper"
    "(const onnxruntime::TensorShape&, onnxruntime::TensorShapeVector&, bool) input_shape_size == size was false. "
    "The input tensor cannot be reshaped to the requested shape. Input shape:{2,3}, requested shape:{5}\n":
    "Non-zero status code returned while running Reshape node. Name:'' Status Message: The input tensor cannot be "
    "reshaped to the requested shape. Input shape:{2,3}, requested shape:{5}",
    "[ONNXRuntimeError] : 1 : FAIL : Exception during initialization: /onnxruntime_src/onnxruntime/core/graph/"
    "function_utils.cc:443 void onnxruntime::function_utils::Inliner::bind(google::protobuf::RepeatedPtrField<std::"
    "__cxx11::basic_string<char> >&, const google::protobuf::RepeatedPtrField<std::__cxx11::basic_string<char> >&) "
    "[with bool isOutput = false] actuals.size() <= formals.size() was false. Number of actual parameters cannot "
    "exceed number of formal parameters\n":
    "Exception during initialization: Number of actual parameters cannot exceed number of formal parameters",
    "[ONNXRuntimeError] : 1 : FAIL : Fatal error: com.example:Frobnicate(-1) is not a registered function/op":
    "Fatal error: com.example:Frobnicate(-1) is not a registered function/op",
    "something else entirely\nsecond line": "something else entirely",
}


@pytest.mark.parametrize("raw, expected", ORT_MESSAGES.items(), ids=["run", "init", "plain", "other"])
def test_onnxruntime_message_is_reduced_to_its_meaning(raw, expected):
    assert runtime.message(RuntimeError(raw)) == expected


# --------------------------------------------------------------------------------------
# 2. Malformed models
# --------------------------------------------------------------------------------------


def block_model() -> onnx.ModelProto:
    """A RepVGG-style block: two conv+BN branches and a BN identity, summed."""
    b = GraphBuilder([1, 4, 8, 8])
    y = b.add(b.bn(b.conv(b.x, 4, 4, k=3, bias=False), 4), b.bn(b.conv(b.x, 4, 4, k=1, bias=False), 4), b.bn(b.x, 4))
    return b.build(b.node("Relu", [y]), output_shape=[1, 4, 8, 8])


def errors_for(model: onnx.ModelProto) -> str:
    with pytest.raises(OnnxrepError) as info:
        validate(model, "m.onnx")
    return str(info.value)


def mutate_dangling_input(m):
    m.graph.node[1].input[0] = "nowhere"


def mutate_duplicate_output(m):
    m.graph.node[1].output[0] = m.graph.node[0].output[0]


def mutate_cycle(m):
    m.graph.node[0].input[0] = m.graph.node[-1].output[0]


def mutate_unknown_elem_type(m):
    m.graph.input[0].type.tensor_type.elem_type = 99


def mutate_initializer_length(m):
    t = m.graph.initializer[0]
    t.raw_data = t.raw_data[:-4]


def mutate_initializer_extra_data(m):
    t = m.graph.initializer[0]
    t.raw_data = t.raw_data + b"\0\0\0\0"


def mutate_initializer_type(m):
    m.graph.initializer[0].data_type = 12345


def mutate_duplicate_initializer(m):
    m.graph.initializer.add().CopyFrom(m.graph.initializer[0])


def mutate_negative_dim(m):
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_value = -8


def mutate_empty_list_attribute(m):
    conv = m.graph.node[0]
    for a in conv.attribute:
        if a.name == "dilations":
            del a.ints[:]


def mutate_attribute_bytes(m):
    conv = m.graph.node[0]
    for a in list(conv.attribute):
        if a.name == "strides":
            conv.attribute.remove(a)
    conv.attribute.append(helper.make_attribute("auto_pad", b"\xffNOTSET"))


def mutate_schema(m):
    m.graph.node[0].attribute.append(helper.make_attribute("frobnication", 3))


def _set_attribute(node, name, value):
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


def mutate_conv_group_zero(m):
    _set_attribute(m.graph.node[0], "group", 0)


def mutate_conv_kernel_shape(m):
    _set_attribute(m.graph.node[0], "kernel_shape", [5, 5])


def mutate_conv_bias_shape(m):
    conv = m.graph.node[0]
    conv.input.append(conv.input[1])  # the weight as bias: 144 values where 4 are needed


def mutate_huge_input(m):
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 1 << 40


MALFORMED = {
    # mutation: text the message must contain (besides the file)
    "dangling_input": (mutate_dangling_input, "input 'nowhere' is not produced", "node 'BatchNormalization_"),
    "duplicate_output": (mutate_duplicate_output, "one producer", "node 'Conv_"),
    "cycle": (mutate_cycle, "cycle", "node '"),
    "unknown_elem_type": (mutate_unknown_elem_type, "element type 99", "'x'"),
    "initializer_length": (mutate_initializer_length, "572 bytes", "initializer 'w_"),
    "initializer_extra_data": (mutate_initializer_extra_data, "raw data has 580 bytes", "need 576", "'w_"),
    "initializer_type": (mutate_initializer_type, "element type 12345", "initializer 'w_"),
    "duplicate_initializer": (mutate_duplicate_initializer, "declared twice", "'w_"),
    "negative_dim": (mutate_negative_dim, "negative size -8 at axis 2", "'x'"),
    "empty_list_attribute": (mutate_empty_list_attribute, "'dilations' is an empty list", "node 'Conv_"),
    "attribute_bytes": (mutate_attribute_bytes, "'auto_pad'", "binary", "node 'Conv_"),
    "schema": (mutate_schema, "frobnication", "node 'Conv_"),
    "huge_input": (mutate_huge_input, "input 'x'", "elements"),
    "conv_group_zero": (mutate_conv_group_zero, "group is 0", "node 'Conv_"),
    "conv_kernel_shape": (mutate_conv_kernel_shape, "kernel_shape [5, 5] does not match weight 'w_", "node 'Conv_"),
    "conv_bias_shape": (mutate_conv_bias_shape, "bias 'w_0' has shape [4, 4, 3, 3]; weight 'w_0' needs [4]", "node 'Conv_"),
}


@pytest.mark.parametrize("case", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_model_is_one_line(case, tmp_path):
    mutate, *needles = case
    model = block_model()
    mutate(model)
    path = save(model, tmp_path / "bad.onnx")
    assert_one_line(*run_cli(path, "-q"), str(path), *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def test_name_that_is_not_utf8(tmp_path):
    data = block_model().SerializeToString()
    name = b"Relu_"
    i = data.index(name)
    data = data[:i] + b"\xff" + data[i + 1 :]  # same length: still parses
    path = tmp_path / "bad.onnx"
    path.write_bytes(data)
    rc, out, err = run_cli(path)
    assert_one_line(rc, out, err, str(path), "not UTF-8 text", "\\xffelu_")


def test_validate_names_nodes_inside_subgraphs():
    model = block_model()
    def body(source):  # a subgraph may read the outer graph's tensors ('x'), not unknown ones
        return helper.make_graph([helper.make_node("Relu", [source], ["r"], name="inner")], "body", [],
                                 [helper.make_tensor_value_info("r", TensorProto.FLOAT, None)])

    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    model.graph.node.append(helper.make_node("If", ["cond"], ["unused"], name="branch", then_branch=body("ghost"),
                                             else_branch=body("x")))
    assert "node 'branch' (If) > then_branch > node 'inner' (Relu): input 'ghost'" in errors_for(model)


UNTIDY = {
    # onnxruntime runs these, and onnxrep rewrote them before it had input checks
    "nodes_out_of_order": lambda m: m.graph.node.reverse(),
    "output_without_shape": lambda m: m.graph.output[0].type.tensor_type.ClearField("shape"),
    "stale_value_info": lambda m: m.graph.value_info.append(
        helper.make_tensor_value_info(m.graph.node[0].output[0], TensorProto.FLOAT, [1, 2, 3])),
    "initializer_listed_as_input": lambda m: m.graph.input.append(
        helper.make_tensor_value_info(m.graph.initializer[0].name, TensorProto.FLOAT, list(m.graph.initializer[0].dims))),
}


@pytest.mark.parametrize("mutate", UNTIDY.values(), ids=UNTIDY.keys())
def test_untidy_but_runnable_model_is_rewritten(mutate):
    model = block_model()
    mutate(model)
    out, report = onnxrep.optimize(model)
    assert report.verification.ok
    assert ops(out)["Conv"] == 1
    assert_same_outputs(block_model(), out)


def test_model_outside_op_type_constraints_is_not_refused():
    # Conv has no bfloat16 in its schema (opset 17) and onnxruntime's CPU Conv cannot run it,
    # but whether a rule handles it (verification off) is the rules' call: type constraints
    # are not the input checks' to enforce
    model = block_model()
    for t in model.graph.initializer:
        t.CopyFrom(helper.make_tensor(t.name, TensorProto.BFLOAT16, t.dims, numpy_helper.to_array(t).ravel()))
    for vi in list(model.graph.input) + list(model.graph.output):
        vi.type.tensor_type.elem_type = TensorProto.BFLOAT16
    del model.graph.value_info[:]
    validate(model, "m.onnx")
    out, report = onnxrep.optimize(model, verify=False)
    assert ops(out)["Conv"] >= 1


def test_out_of_memory_is_a_one_line_error(tmp_path, monkeypatch):
    # a model whose declared sizes exhaust memory somewhere onnxrep did not foresee
    def boom(*args, **kwargs):
        raise MemoryError("Unable to allocate 768. GiB for an array with shape (1, 3, 16, 2147483648)")

    monkeypatch.setattr(cli, "optimized", boom)
    path = save(block_model(), tmp_path / "m.onnx")
    assert_one_line(*run_cli(path), str(path), "out of memory", "768. GiB")


def test_message_with_a_line_break_in_a_name_stays_one_line(tmp_path):
    model = block_model()
    model.graph.node[0].name = "two\nlines"
    model.graph.node[0].input[1] = "nowhere"
    path = save(model, tmp_path / "m.onnx")
    assert_one_line(*run_cli(path), "node 'two\\nlines'")


# --------------------------------------------------------------------------------------
# 3. Exporter leftovers
# --------------------------------------------------------------------------------------


def tf2onnx_leftover() -> onnx.ModelProto:
    """tf2onnx output with an unconverted TF op left in the default domain."""
    b = GraphBuilder([1, 4, 8, 8])
    y = b.conv(b.x, 4, 4)
    call = helper.make_node("StatefulPartitionedCall", [y], ["z"], name="model/head/StatefulPartitionedCall",
                            config_proto=b"\x08\xff\xfe", f="__inference_head_123")
    b.nodes.append(call)
    graph = helper.make_graph(b.nodes, "tf", b.inputs, [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], producer_name="tf2onnx")
    model.ir_version = 8
    return model


def test_unconverted_tf_op_is_named(tmp_path):
    path = save(tf2onnx_leftover(), tmp_path / "tf.onnx")
    rc, out, err = run_cli(path, "-q")
    assert_one_line(rc, out, err, str(path), "node 'model/head/StatefulPartitionedCall'",
                    "'StatefulPartitionedCall' is not an ONNX operator", "opset 15")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tf.onnx"]


def test_op_newer_than_the_model_opset_is_named():
    b = GraphBuilder([1, 4, 8, 8])
    model = b.build(b.node("Gelu", [b.conv(b.x, 4, 4)]), opset=20)
    model.opset_import[0].version = 17
    assert "'Gelu' exists from opset 20 on; the model imports opset 17" in errors_for(model)


# --------------------------------------------------------------------------------------
# 4. Sparse initializers
# --------------------------------------------------------------------------------------


def sparse_block() -> onnx.ModelProto:
    """block_model() with its conv weights stored as sparse initializers (the 1x1 with
    linearized indices, the 3x3 with coordinates, some taps zero)."""
    model = block_model()
    for t in list(model.graph.initializer):
        if len(t.dims) != 4:
            continue
        w = numpy_helper.to_array(t).copy()
        w[:, :, 0, 0] = 0
        nz = np.argwhere(w != 0)
        if t.dims[2] == 1:
            indices = np.ravel_multi_index(nz.T, w.shape).astype(np.int64)
        else:
            indices = nz.astype(np.int64)
        values = numpy_helper.from_array(w[tuple(nz.T)], t.name)
        sparse = helper.make_sparse_tensor(values, numpy_helper.from_array(indices, t.name + "_indices"), list(w.shape))
        model.graph.initializer.remove(t)
        model.graph.sparse_initializer.append(sparse)
    return model


def test_sparse_initializers_are_densified_verified_and_correct(tmp_path):
    model = sparse_block()
    assert len(model.graph.sparse_initializer) == 2
    path = save(model, tmp_path / "sparse.onnx")
    out = tmp_path / "out.onnx"
    rc, stdout, err = run_cli(path, "-o", out)
    assert rc == 0, err
    assert "verified" in stdout
    assert "warning: 2 sparse initializer(s)" in stdout  # the report says what was changed
    result = onnx.load(out)
    assert not result.graph.sparse_initializer
    assert ops(result)["Conv"] == 1
    assert_same_outputs(model, result)  # onnxruntime runs the sparse original as it is

    warnings: List[str] = []
    loaded, _ = load_model(str(path), warnings)
    assert not loaded.graph.sparse_initializer and len(warnings) == 1
    assert "2 sparse initializer(s)" in warnings[0] and "dense" in warnings[0]


def test_sparse_model_given_as_proto_is_not_modified():
    model = sparse_block()
    before = model.SerializeToString()
    out, report = onnxrep.optimize(model)
    assert model.SerializeToString() == before
    assert report.verification.ok and ops(out)["Conv"] == 1
    assert any("sparse initializer" in w for w in report.warnings)
    assert_same_outputs(model, out)


def test_sparse_initializer_with_index_out_of_range(tmp_path):
    model = sparse_block()
    model.graph.sparse_initializer[0].indices.raw_data = np.full(
        len(model.graph.sparse_initializer[0].indices.raw_data) // 8, 10**6, np.int64).tobytes()
    path = save(model, tmp_path / "bad.onnx")
    assert_one_line(*run_cli(path), str(path), "sparse initializer 'w_")
