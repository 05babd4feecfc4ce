"""Reading sizes and writing models: inline protobuf when small, external data when large.

Protobuf cannot serialize a message over 2 GiB, so large models (and models that came with
external data) are written with their tensors in one data file beside the model, and handed
to onnxruntime through a temporary folder instead of as bytes.
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable

import onnx
import onnxruntime as ort

from . import runtime

#: Above this many bytes of tensor data a model is written and run with external data.
EXTERNAL_DATA_THRESHOLD = 1 << 30


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of initializer data held in the model (external tensors not counted)."""
    total = 0
    for t in model.graph.initializer:
        total += len(t.raw_data) if t.raw_data else t.ByteSize()
    return total


def uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def needs_external_data(model: onnx.ModelProto) -> bool:
    return tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD


def save(model: onnx.ModelProto, path: str, external: bool, location: str) -> None:
    """Write ``model`` to ``path``; with ``external``, tensors go to ``location`` beside it.

    ``model`` itself is left as it was (onnx.save would rewrite its tensors as references).
    """
    if external:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        onnx.save(copy, path, save_as_external_data=True, all_tensors_to_one_file=True,
                  location=location, size_threshold=1024)
    else:
        onnx.save(model, path)


def session(model: onnx.ModelProto, options: ort.SessionOptions) -> ort.InferenceSession:
    """An onnxruntime CPU session for a model of any size.

    Silent whatever ``options`` say (their log severity is set to fatal-only): onnxruntime's
    errors reach the caller as exceptions reduced to one readable line, at creation and from
    ``run`` alike (see :mod:`onnxrep.runtime`).
    """
    providers = ["CPUExecutionProvider"]
    if not needs_external_data(model):
        return runtime.open_session(model.SerializeToString(), options, providers)
    with tempfile.TemporaryDirectory(prefix="onnxrep-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        save(model, path, True, "model.onnx.data")
        return runtime.open_session(path, options, providers)


def write_model(model: onnx.ModelProto, path: str, atomic_write: Callable, external: bool) -> None:
    """Write atomically: the model file is renamed into place last; its data file, if any,
    is written under its final name first and removed again if the write fails."""
    location = os.path.basename(path) + ".data"
    data = os.path.join(os.path.dirname(os.path.abspath(path)), location)
    try:
        atomic_write(lambda tmp: save(model, tmp, external, location), path)
    except BaseException:
        if external and os.path.exists(data):
            os.unlink(data)
        raise
