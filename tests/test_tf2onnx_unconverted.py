"""tf2onnx exports that keep TensorFlow ops are refused with one line naming the node.

Keras compiles grouped convolutions into a nested (XLA) function; tf2onnx 1.17 leaves it as a
``StatefulPartitionedCall`` (Keras 3, with a binary ``config_proto`` attribute) or a
``PartitionedCall`` (tf-keras) node in the default domain (scripts/export_tf.py).
"""

import contextlib
import glob
import io
import os

import onnx
import pytest

from onnxrep import cli

FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "tf2onnx", "unconverted")
FILES = sorted(glob.glob(os.path.join(FOLDER, "*.onnx")))


def test_there_are_unconverted_exports():
    assert len(FILES) >= 2


@pytest.mark.parametrize("path", FILES, ids=[os.path.basename(p) for p in FILES])
def test_unconverted_tf_op_is_a_one_line_input_error(path, tmp_path):
    model = onnx.load(path)
    tf_nodes = [n for n in model.graph.node if n.op_type in ("StatefulPartitionedCall", "PartitionedCall")]
    assert tf_nodes
    out, stdout, stderr = tmp_path / "out.onnx", io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = cli.main([path, "-o", str(out)])
    assert rc == cli.EXIT_INPUT
    err = stderr.getvalue().strip().splitlines()
    assert len(err) == 1, err
    assert any(f"'{n.name}'" in err[0] for n in tf_nodes), err[0]
    assert "not an ONNX operator" in err[0]
    assert not out.exists()
