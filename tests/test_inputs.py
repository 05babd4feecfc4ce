"""onnxruntime kept quiet (DESIGN 5: errors are one line).

1. onnxruntime prints nothing: no warnings on success, no log lines before an error, and
   its error messages are reduced to their meaning.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from helpers import GraphBuilder

from onnxrep import cli, modelio, runtime

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
    sess = modelio.session(reshape_to_input_shape(), opts)
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
