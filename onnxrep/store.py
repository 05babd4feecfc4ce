"""Models held in a temporary folder while onnxruntime runs them (docs/architecture.md, "Memory").

A protobuf message gives its memory back only as a whole (the upb runtime allocates all of a
message's fields from one arena), so a large model cannot be kept in memory without its weights
by clearing them. :class:`StoredModel` therefore writes a model's weights to a data file in a
temporary folder once and keeps only a *light* copy in memory: the same model, with every large
initializer referring to the data file the way external data does. The caller then drops the
model itself.

onnxruntime opens a session on the light copy written beside the data file; it maps the data
file instead of copying it, so the weights exist once, in the page cache, while it runs, and
the session opens in milliseconds. The weights are read back one at a time to write the model
out (:meth:`StoredModel.serialized_chunks`, :meth:`StoredModel.external_payload`) or to load it
(:meth:`StoredModel.load`).

Models with less than ``modelio.FILE_SESSION_BYTES`` of weights, and any model when the temporary
folder has no room, stay in memory as they are; every method works the same on them.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import weakref
from typing import Iterator, Optional, Sequence

import onnx
import onnxruntime as ort
from onnx import numpy_helper

from . import modelio, runtime
from .errors import OnnxrepError

#: The data file's name inside the store's folder.
DATA_NAME = "weights.bin"
#: Tensors of at least this many bytes start on a page of the data file; smaller ones on a
#: multiple of _ALIGN, so every tensor is aligned for any element type and vector loads.
_PAGE_FROM = 64 << 10
_PAGE, _ALIGN = 4096, 64


class StoredModel:
    """One model, held by a temporary data file when large (see the module's docstring).

    ``light`` is the model, except that when ``spilled`` every top-graph initializer stored as
    raw bytes of ``modelio.EXTERNAL_TENSOR_MIN_BYTES`` or more refers to the data file
    (``location`` ``weights.bin``). ``light`` is for reading the structure (nodes, inputs,
    outputs, initializer names, types and dims) and must not be written out by itself; values
    come from :meth:`tensor` and :meth:`array`. Close the store (or use it as a context manager)
    to remove the folder; sessions opened on it keep what they need.
    """

    def __init__(self, model: onnx.ModelProto, spill: bool = True):
        """``spill``: write the weights out when the model is large (False keeps it in memory).
        The store never changes ``model``; when spilled it holds no reference to it."""
        self.tensor_bytes = modelio.tensor_bytes(model)
        self.light = model
        self._folder: Optional[tempfile.TemporaryDirectory] = None
        self._sessions = 0
        if spill and self.tensor_bytes >= modelio.FILE_SESSION_BYTES:
            try:
                self._folder = temporary_folder()
                self.light = _spill(model, os.path.join(self._folder.name, DATA_NAME))
            except OSError as exc:  # no room: the model stays in memory, if one protobuf can hold it
                self.close()
                if self.needs_external_data():
                    raise OnnxrepError(
                        f"{tempfile.gettempdir()}: cannot store the model's {self.tensor_bytes / 2**30:.1f} GiB of "
                        f"weights for onnxruntime ({os.strerror(exc.errno) if exc.errno else exc}); set TMPDIR to a "
                        "folder with room") from None
                self.light = model
        self._initializers = {t.name: t for t in self.light.graph.initializer}

    @property
    def spilled(self) -> bool:
        return self._folder is not None

    def needs_external_data(self) -> bool:
        """Whether the model must be written with external data (modelio.needs_external_data)."""
        return self.tensor_bytes > modelio.EXTERNAL_DATA_THRESHOLD

    def __enter__(self) -> "StoredModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove the temporary folder (the light copy then no longer has its weights)."""
        folder, self._folder = self._folder, None
        if folder is not None:
            folder.cleanup()

    # -- values ---------------------------------------------------------------------------

    def tensor(self, name: str) -> onnx.TensorProto:
        """The initializer ``name`` with its data (a new TensorProto when read from the file)."""
        light = self._initializers[name]
        if not self._refers_to_data(light):
            return light
        return self._fill(onnx.TensorProto(), light)

    def array(self, name: str):
        return numpy_helper.to_array(self.tensor(name))

    def _refers_to_data(self, t: onnx.TensorProto) -> bool:
        return (self._folder is not None and t.data_location == onnx.TensorProto.EXTERNAL
                and _external(t).get("location") == DATA_NAME)

    def _whole(self, dst: onnx.TensorProto, light: onnx.TensorProto) -> None:
        """The initializer ``light`` with its data, in ``dst``."""
        if self._refers_to_data(light):
            self._fill(dst, light)
        else:
            dst.CopyFrom(light)

    def _fill(self, dst: onnx.TensorProto, light: onnx.TensorProto) -> onnx.TensorProto:
        """``light``'s fields in ``dst``, with its data read from the data file."""
        for fd, value in light.ListFields():
            if fd.name not in ("external_data", "data_location"):
                modelio.copy_field(dst, fd, value)
        where = _external(light)
        offset, length = int(where["offset"]), int(where["length"])
        with open(os.path.join(self._folder.name, DATA_NAME), "rb") as f:
            f.seek(offset)
            data = f.read(length)
        if len(data) != length:
            raise OSError(f"{DATA_NAME}: {length} bytes at {offset} expected, {len(data)} read")
        dst.raw_data = data
        return dst

    # -- onnxruntime ----------------------------------------------------------------------

    def session(self, options: ort.SessionOptions, extra_outputs: Sequence[onnx.ValueInfoProto] = (),
                light: Optional[onnx.ModelProto] = None) -> runtime.Session:
        """A CPU session on the model (or on ``light``: a variant of :attr:`light`, such as a
        graph with other nodes over the same initializers), with ``extra_outputs`` appended to
        its outputs without copying the model: a serialized ``ModelProto`` holding only those
        outputs is concatenated to the model's serialization, which protobuf parses as the
        model with the outputs appended (docs/architecture.md, "Memory")."""
        light = self.light if light is None else light
        providers = ["CPUExecutionProvider"]
        extra = b""
        if extra_outputs:
            extra = onnx.ModelProto(graph=onnx.GraphProto(output=list(extra_outputs))).SerializeToString()
        if self._folder is None:
            return _memory_session(light, options, extra, providers)
        self._sessions += 1
        path = os.path.join(self._folder.name, f"model-{self._sessions}.onnx")
        try:
            with open(path, "wb") as f:
                f.write(light.SerializeToString())
                f.write(extra)
            session = runtime.open_session(path, options, providers)
        finally:
            _unlink(path)  # onnxruntime has read it; the data file stays mapped
        session._onnxrep_store = self  # the data file lives at least as long as the session
        return session

    # -- writing ----------------------------------------------------------------------------

    def serialized_chunks(self) -> Iterator[bytes]:
        """The model's serialization in pieces, as :func:`modelio.serialized_chunks`, reading
        one weight at a time back from the data file."""
        if self._folder is None:
            yield from modelio.serialized_chunks(self.light)
            return
        yield modelio.skeleton(self.light).SerializeToString()
        for t in self.light.graph.initializer:
            piece = onnx.ModelProto()
            dst = piece.graph.initializer.add()
            self._whole(dst, t)
            data = piece.SerializeToString()
            del piece, dst
            yield data

    def external_payload(self, location: str, fd: int) -> bytes:
        """For a model file with external data: write the weights to ``fd`` (a new data file) and
        return the serialized model that refers to them as ``location``. The data file is copied
        as it is, so offsets stay the same; initializers in subgraphs stay inline."""
        model = onnx.ModelProto()
        model.CopyFrom(self.light)  # light: no weights to copy
        if self._folder is None:
            modelio.move_tensors(model, fd, location)
            return model.SerializeToString()
        with open(os.path.join(self._folder.name, DATA_NAME), "rb") as src, os.fdopen(os.dup(fd), "wb") as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
        for t in model.graph.initializer:
            if self._refers_to_data(t):
                where = _external(t)
                _refer(t, location, int(where["offset"]), int(where["length"]))
        return model.SerializeToString()

    def load(self) -> onnx.ModelProto:
        """The whole model in memory (weights read back one at a time)."""
        if self._folder is None:
            return self.light
        model = modelio.skeleton(self.light)
        for t in self.light.graph.initializer:
            self._whole(model.graph.initializer.add(), t)
        return model


def session(model: onnx.ModelProto, options: ort.SessionOptions,
            extra_outputs: Sequence[onnx.ValueInfoProto] = ()) -> runtime.Session:
    """An onnxruntime CPU session for a model of any size (``model`` is not changed).

    A large model is stored (:class:`StoredModel`) for the session, which keeps the data file
    until it is closed; see :meth:`StoredModel.session` for ``extra_outputs``. Silent whatever
    ``options`` say (their log severity is set to fatal-only): onnxruntime's errors reach the
    caller as exceptions reduced to one readable line, at creation and from ``run`` alike (see
    :mod:`onnxrep.runtime`).
    """
    held = StoredModel(model)
    try:
        opened = held.session(options, extra_outputs)
    except BaseException:
        held.close()
        raise
    weakref.finalize(opened, held.close)  # the store made for this session goes with it
    return opened


def _memory_session(model: onnx.ModelProto, options, extra: bytes, providers) -> runtime.Session:
    return runtime.open_session(model.SerializeToString() + extra, options, providers)


def _spill(model: onnx.ModelProto, path: str) -> onnx.ModelProto:
    """Write ``model``'s large raw initializers to ``path`` and return the light copy."""
    light = modelio.skeleton(model)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        offset = 0
        for t in model.graph.initializer:
            dst = light.graph.initializer.add()
            itemsize = modelio.ITEMSIZE.get(t.data_type)
            size = math.prod(t.dims) * itemsize if itemsize else 0
            if (t.data_location == onnx.TensorProto.EXTERNAL or not t.HasField("raw_data")
                    or size < modelio.EXTERNAL_TENSOR_MIN_BYTES):
                dst.CopyFrom(t)
                continue
            for fd_, value in t.ListFields():
                if fd_.name != "raw_data":
                    modelio.copy_field(dst, fd_, value)
            data = t.raw_data
            pad = -offset % (_PAGE if len(data) >= _PAGE_FROM else _ALIGN)
            if pad:
                modelio.write_all(fd, bytes(pad))
                offset += pad
            modelio.write_all(fd, data)
            _refer(dst, DATA_NAME, offset, len(data))
            offset += len(data)
            del data
    finally:
        os.close(fd)
    return light


def temporary_folder() -> tempfile.TemporaryDirectory:
    """A temporary folder whose removal does not fail on a file onnxruntime still maps (Windows
    refuses to delete those; the folder is then left to the system's cleaning)."""
    try:
        return tempfile.TemporaryDirectory(prefix="onnxrep-", ignore_cleanup_errors=True)
    except TypeError:  # Python < 3.10
        return tempfile.TemporaryDirectory(prefix="onnxrep-")


def _refer(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Make ``t`` (which holds no data) refer to ``length`` bytes at ``offset`` of ``location``."""
    del t.external_data[:]
    t.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value


def _external(t: onnx.TensorProto) -> dict:
    return {e.key: e.value for e in t.external_data}


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
