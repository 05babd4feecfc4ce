"""Reading sizes and writing files: inline protobuf when small, external data when large.

Protobuf cannot serialize a message over 2 GiB, so large models (and models that came with
external data) are written with their tensors in one data file beside the model, and handed
to onnxruntime through a temporary folder instead of as bytes.

Every file onnxrep writes goes through :func:`save` (models) or :func:`write_text` (reports).
The protocol is described in docs/files.md; in short:

- A regular file (or a path that does not exist yet) is written under a temporary name in its
  folder and renamed over the target, so a reader sees the old file or the new one, never a
  part. A model's data file gets a name of its own (``out.onnx.<8 hex>.data``), is written the
  same way and is renamed into place before the model that refers to it; the data file of the
  model that was replaced is removed last, and only if onnxrep made it (its name says so).
- Character devices, FIFOs and open descriptors (``/dev/null``, a pipe, ``/dev/stdout``) are
  written straight through: a rename would replace the device node with a regular file.
- Any failure or interrupt before the model's rename removes every file this write created and
  leaves the earlier files as they were. OS errors become a one-line :class:`OnnxrepError`.
"""

from __future__ import annotations

import math
import contextlib
import errno
import mmap
import os
import re
import secrets
import stat
import sys
from typing import BinaryIO, Callable, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Union

import numpy as np
import onnx
from onnx.external_data_helper import set_external_data

from .errors import OnnxrepError

#: Above this many bytes of tensor data a model is written and run with external data.
EXTERNAL_DATA_THRESHOLD = 1 << 30

#: With external data, tensors of at least this many bytes go to the data file (as onnx.save).
EXTERNAL_TENSOR_MIN_BYTES = 1024

#: Temporary files are ``.onnxrep-XXXXXXXX.tmp`` in the folder of the file being written.
TEMP_PREFIX, TEMP_SUFFIX = ".onnxrep-", ".tmp"

_CHUNK = 8 << 20  # bytes per os.write: bounded memory views, and an interrupt is seen between chunks
_SCAN_LIMIT = 16 << 20  # larger model files are searched for "location" before being parsed


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of initializer data held in the model (external tensors not counted).

    A tensor stored as raw bytes is sized from its dims, without reading the bytes (which the
    protobuf runtime would copy out); other encodings by their serialized size."""
    total = 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            continue
        size = ITEMSIZE.get(t.data_type) if t.HasField("raw_data") else None
        total += math.prod(t.dims) * size if size else t.ByteSize()
    return total


ITEMSIZE = {k: np.dtype(v).itemsize for k, v in (
    (onnx.TensorProto.FLOAT, np.float32), (onnx.TensorProto.DOUBLE, np.float64), (onnx.TensorProto.FLOAT16, np.float16),
    (onnx.TensorProto.BFLOAT16, np.uint16), (onnx.TensorProto.INT8, np.int8), (onnx.TensorProto.UINT8, np.uint8),
    (onnx.TensorProto.INT16, np.int16), (onnx.TensorProto.UINT16, np.uint16), (onnx.TensorProto.INT32, np.int32),
    (onnx.TensorProto.UINT32, np.uint32), (onnx.TensorProto.INT64, np.int64), (onnx.TensorProto.UINT64, np.uint64),
    (onnx.TensorProto.BOOL, np.bool_))}


def uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def needs_external_data(model: onnx.ModelProto) -> bool:
    return tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD


# --------------------------------------------------------------------------------------
# Tensors and the data files a model file refers to
# --------------------------------------------------------------------------------------


def graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and, recursively, the bodies of its If/Loop/Scan nodes."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from graphs(g)


def _graph_initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers of ``graph`` and of its bodies (what onnx.save moves to external data)."""
    for g in graphs(graph):
        yield from g.initializer


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto a model file can hold, wherever it is (any of them may be external)."""

    def in_nodes(nodes) -> Iterator[onnx.TensorProto]:
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("sparse_tensor"):
                    yield attr.sparse_tensor.values
                    yield attr.sparse_tensor.indices
                for s in attr.sparse_tensors:
                    yield s.values
                    yield s.indices
                if attr.HasField("g"):
                    yield from in_graph(attr.g)
                for g in attr.graphs:
                    yield from in_graph(g)

    def in_graph(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
        yield from graph.initializer
        for s in graph.sparse_initializer:
            yield s.values
            yield s.indices
        yield from in_nodes(graph.node)

    yield from in_graph(model.graph)
    for function in model.functions:
        yield from in_nodes(function.node)


def _location(tensor: onnx.TensorProto) -> Optional[str]:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return next((e.value for e in tensor.external_data if e.key == "location"), None)


def _may_refer_to_data(path: str) -> bool:
    """False when the file certainly holds no external-data reference (cheap for big files)."""
    size = os.path.getsize(path)
    if size <= _SCAN_LIMIT:
        return size > 0
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        return m.find(b"location") >= 0


def data_files(path: str) -> List[str]:
    """Absolute paths of the external data files the model file at ``path`` refers to.

    Locations are resolved against the folder of ``path`` as given (as onnx and onnxruntime
    do). Empty when the file does not exist, is not a regular file, is not a readable model or
    has no external tensors: this never fails and never reads a FIFO or a device.
    """
    try:
        if not os.path.isfile(path) or not _may_refer_to_data(path):
            return []
        model = onnx.load(path, load_external_data=False)
    except Exception:  # not a model: it refers to nothing
        return []
    folder = os.path.dirname(os.path.abspath(path))
    found: List[str] = []
    for tensor in _all_tensors(model):
        location = _location(tensor)
        if location:
            p = os.path.normpath(os.path.join(folder, location))
            if p not in found:
                found.append(p)
    return found


def same_file(a: str, b: str) -> bool:
    """Whether two paths name the same file: same real path (symlinks, ``./x`` and ``x``,
    ``..``) or, both existing, the same inode (hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# --------------------------------------------------------------------------------------
# Where a path leads: a regular file to replace, or a device/FIFO/descriptor to write through
# --------------------------------------------------------------------------------------


class Target(NamedTuple):
    """How a path is written. ``kind``: "file" (temp file + rename; ``path`` is the regular
    file itself, symlinks resolved), "stream" (a character device or FIFO, opened and written
    through) or "fd" (an alias of an open descriptor such as /dev/stdout: written to ``fd``)."""

    kind: str
    path: str
    fd: int = -1


def _fd_alias(path: str) -> Optional[int]:
    """The descriptor number when ``path`` (or a symlink on the way) is /dev/stdout, /dev/fd/N,
    /proc/self/fd/N and the like. Writing to the open descriptor keeps what the shell set up
    (``>>`` appends; a pipe stays a pipe), where reopening the path would truncate."""
    names = {"/dev/stdin": 0, "/dev/stdout": 1, "/dev/stderr": 2}
    fd_dir = re.compile(r"/(?:dev|proc/(?:self|thread-self|%d)(?:/task/\d+)?)/fd/(\d+)" % os.getpid())
    p = os.path.abspath(path)
    for _ in range(40):  # the kernel's own symlink limit
        if p in names:
            return names[p]
        m = fd_dir.fullmatch(p)
        if m:
            return int(m.group(1))
        if not os.path.islink(p):
            return None
        p = os.path.normpath(os.path.join(os.path.dirname(p), os.readlink(p)))
    return None


def _error(path: str, exc: OSError, what: str = "cannot write") -> OnnxrepError:
    reason = os.strerror(exc.errno) if exc.errno else (str(exc) or type(exc).__name__)
    return OnnxrepError(f"{path}: {what}: {reason}")


def target(path: str) -> Target:
    """How ``path`` would be written, or a one-line OnnxrepError when it cannot be."""
    fd = _fd_alias(path)
    if fd is not None:
        try:
            os.fstat(fd)
        except OSError as exc:
            raise _error(path, exc) from None
        return Target("fd", path, fd)
    real = os.path.realpath(path)  # a symlink is followed: its target is written, the link kept
    try:
        st = os.stat(real)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise _error(path, exc) from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise OnnxrepError(f"{path}: is a directory")
    if st is not None and (stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
        return Target("stream", path)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OnnxrepError(f"{path}: not a regular file, character device or FIFO")
    folder = os.path.dirname(real)
    if not os.path.isdir(folder):
        raise OnnxrepError(f"{path}: folder {folder} does not exist")
    return Target("file", real)


def check_writable(path: str, external: bool = False) -> Target:
    """Refuse early (one-line OnnxrepError) what :func:`save` / :func:`write_text` would
    refuse later, so that a long run does not end in an error that was known at the start."""
    t = target(path)
    if external and t.kind != "file":
        raise OnnxrepError(f"{path}: not a regular file; a model with external data needs one "
                           "(its data file cannot be placed beside a device or FIFO)")
    if t.kind == "file":
        folder = os.path.dirname(t.path)
        if external and os.path.realpath(os.path.dirname(os.path.abspath(path))) != folder:
            raise OnnxrepError(f"{path}: is a symlink to a file in another folder; the data file "
                               "would not be found beside it (pass the real path)")
        if not os.access(folder, os.W_OK | os.X_OK):
            read_only = bool(os.statvfs(folder).f_flag & getattr(os, "ST_RDONLY", 1))
            raise OnnxrepError(f"{path}: cannot write in {folder}: "
                               f"{os.strerror(errno.EROFS if read_only else errno.EACCES)}")
    return t


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _folder_lock(folder: str) -> Iterator[None]:
    """An advisory lock on the folder while a model is swapped in, so that onnxrep runs that
    write the same output one after the other each remove the data file the other replaced.
    Best effort: without flock (or on a file system that refuses it) the write is still
    consistent; concurrent runs may then leave an unused data file behind."""
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)


def _file_mode(path: str) -> int:
    """The mode a plain open(path, "w") would give: the existing file's, else 0666 minus umask."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_all(fd: int, data) -> None:
    """Write bytes, or each of an iterable of bytes (serialized_chunks), to ``fd``."""
    for piece in ((data,) if isinstance(data, (bytes, bytearray, memoryview)) else data):
        view = memoryview(piece)
        while view:
            n = os.write(fd, view[:_CHUNK])
            view = view[n:]


def _fsync_folder(folder: str) -> None:
    """Make a rename durable (best effort: not every system can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _new_data_name(folder: str, base: str) -> str:
    while True:
        name = f"{base}.{secrets.token_hex(4)}.data"
        if not os.path.lexists(os.path.join(folder, name)):
            return name


def _made_by_onnxrep(path: str, base: str) -> bool:
    """A data file named as onnxrep names the data of the model file ``base``
    (``base.data`` from earlier versions and from exporters, or ``base.<8 hex>.data``)."""
    return re.fullmatch(re.escape(base) + r"(?:\.[0-9a-f]{8})?\.data", os.path.basename(path)) is not None


def move_tensors(model: onnx.ModelProto, fd: int, location: str) -> None:
    """Write the raw data of ``model``'s large initializers to ``fd`` and make those tensors
    refer to ``location`` instead (``model`` is changed: pass a copy)."""
    offset = 0
    for tensor in _graph_initializers(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise ValueError(f"tensor {tensor.name!r}: its external data is not loaded")
        if not tensor.HasField("raw_data") or len(tensor.raw_data) < EXTERNAL_TENSOR_MIN_BYTES:
            continue
        size = len(tensor.raw_data)
        write_all(fd, tensor.raw_data)
        set_external_data(tensor, location, offset, size)
        tensor.ClearField("raw_data")
        offset += size


def _write_through(t: Target, data) -> None:
    """Write ``data`` (bytes, or an iterable of bytes) straight to a device, FIFO or descriptor."""
    if t.kind == "fd":
        for stream in (sys.stdout, sys.stderr):  # what Python buffered goes first
            try:
                if stream is not None and stream.fileno() == t.fd:
                    stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        write_all(t.fd, data)
        return
    fd = os.open(t.path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))  # a FIFO waits for its reader
    try:
        write_all(fd, data)
    finally:
        os.close(fd)


def _create_new(path: str, mode: int) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)


def _link_new(src: str, dst: str) -> None:
    """Give ``src`` the name ``dst``, which must not exist: a hard link cannot replace a file
    (a rename would), so even a name picked by two runs at once cannot clobber the other's
    file. Where hard links are not supported, a rename after checking that ``dst`` is free."""
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError:
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst) from None
        os.replace(src, dst)
        return
    os.unlink(src)


def _replace_file(path: str, real: str, payload: Callable[[Optional[str], Optional[int]], object],
                  external: bool, keep: Sequence[str]) -> Optional[str]:
    """The regular-file protocol (docs/files.md). ``payload(None, None)`` returns the bytes of
    the file; with ``external``, ``payload(location, fd)`` first writes the tensor data to the
    open temp file ``fd`` and returns the bytes of a model that refers to ``location``.

    An interrupt (KeyboardInterrupt) can arrive between any two steps, even while a signal
    mask is set (onnxruntime's threads take the signal then), so every name is recorded in
    ``made`` before its file is created, and whether the model's rename happened is read from
    the file system, not from a variable set after it.
    """
    folder, base = os.path.split(real)
    mode = _file_mode(real)
    made: List[str] = []  # every name this write may have created: removed unless it completes
    model_tmp: Optional[str] = None
    data_path: Optional[str] = None
    what = "cannot write"

    def temp() -> tuple:
        while True:
            tmp = os.path.join(folder, f"{TEMP_PREFIX}{secrets.token_hex(4)}{TEMP_SUFFIX}")
            made.append(tmp)
            try:
                fd = _create_new(tmp, 0o600)
            except FileExistsError:
                made.pop()  # someone else's
                continue
            os.fchmod(fd, mode)  # the usual mode (the umask is not applied twice)
            return fd, tmp

    try:
        location = None
        if external:
            what = "cannot write its data file"
            fd, data_tmp = temp()
            location = _new_data_name(folder, base)
            try:
                blob = payload(location, fd)
                os.fsync(fd)
            finally:
                os.close(fd)
            what = "cannot write"
        else:
            blob = payload(None, None)
        fd, model_tmp = temp()
        try:
            write_all(fd, blob)
            os.fsync(fd)
        finally:
            os.close(fd)
        del blob
        with _folder_lock(folder):
            old = data_files(real)
            if location is not None:
                data_path = os.path.join(folder, location)
                made.append(data_path)
                try:
                    # Fails (cleanly: the write is abandoned) only if another process took
                    # this random name since it was picked; its file is never replaced.
                    _link_new(data_tmp, data_path)
                except FileExistsError:
                    made.pop()
                    raise
            os.replace(model_tmp, real)  # the commit: from here on the new files stay
            _fsync_folder(folder)
            for p in old:
                if (os.path.dirname(p) == folder and _made_by_onnxrep(p, base) and p != data_path
                        and os.path.isfile(p) and not os.path.islink(p)
                        and not any(same_file(p, k) for k in keep)):
                    with contextlib.suppress(OSError):
                        os.unlink(p)
        return data_path
    except OSError as exc:
        raise _error(path, exc, what) from exc
    finally:
        # The model's temp file is gone exactly when its rename happened (rename is atomic), so
        # this also holds when an interrupt lands right after the rename.
        if model_tmp is None or os.path.lexists(model_tmp):
            _remove(made)


def _remove(paths: List[str]) -> None:
    """Remove ``paths`` (missing ones are fine); a second Ctrl-C does not cut this short."""
    interrupted: Optional[BaseException] = None
    while paths:
        try:
            with contextlib.suppress(OSError):
                os.unlink(paths[-1])
            paths.pop()
        except KeyboardInterrupt as exc:
            interrupted = exc
    if interrupted is not None:
        raise interrupted


def save(model, path: Union[str, os.PathLike, BinaryIO], external: Optional[bool] = None,
         keep: Iterable[str] = ()) -> Optional[str]:
    """Write ``model`` (a ModelProto or a :class:`onnxrep.store.StoredModel`) to ``path`` and
    return the path of its data file (None without one).

    ``external`` (default: when the model is too large for one protobuf) puts tensors of
    1 KiB or more in a data file beside the model, named ``<model file>.<8 hex>.data``.
    ``path`` may be a regular file (replaced atomically), a character device, a FIFO,
    /dev/stdout and the like, or a binary file object (written through; no external data).
    After the new model is in place, the data file that the replaced model referred to is
    removed if onnxrep made it (its name says so) and it is none of ``keep``.
    ``model`` itself is not changed. Errors are a one-line :class:`OnnxrepError`.
    """
    proto = isinstance(model, onnx.ModelProto)
    if external is None:
        external = needs_external_data(model) if proto else model.needs_external_data()

    def chunks() -> Iterator[bytes]:  # written one tensor at a time
        return serialized_chunks(model) if proto else model.serialized_chunks()

    if not isinstance(path, (str, os.PathLike)):
        name = getattr(path, "name", "<stream>")
        if external:
            raise OnnxrepError(f"{name}: not a regular file; a model with external data needs one")
        try:
            for piece in chunks():
                path.write(piece)
            path.flush()
        except OSError as exc:
            raise _error(str(name), exc) from exc
        return None
    path = os.fspath(path)
    t = check_writable(path, external)
    if t.kind != "file":
        try:
            _write_through(t, chunks())
        except OSError as exc:
            raise _error(path, exc) from exc
        return None

    def payload(location: Optional[str], fd: Optional[int]):
        if location is None:
            return chunks()
        if not proto:
            return model.external_payload(location, fd)
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # the tensors of the copy become references
        move_tensors(copy, fd, location)
        return copy.SerializeToString()

    return _replace_file(path, t.path, payload, external, list(keep))


def write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` by the same protocol as :func:`save`."""
    data = text.encode("utf-8")
    t = check_writable(path)
    if t.kind != "file":
        try:
            _write_through(t, data)
        except OSError as exc:
            raise _error(path, exc) from exc
        return
    _replace_file(path, t.path, lambda location, fd: data, False, ())


#: Bytes of weights from which a model is held by a temporary file while onnxruntime runs it
#: (:mod:`onnxrep.store`): onnxruntime keeps a second copy of the weights when given bytes
#: (measured: 2x the model's size at rest, plus the bytes themselves while it parses), and
#: maps them from a data file. Below this size the file round trip costs more than the memory
#: is worth.
FILE_SESSION_BYTES = 32 << 20


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without its top graph's initializers (nothing else is left out)."""
    out = onnx.ModelProto()
    for fd, value in model.ListFields():
        if fd.name != "graph":
            copy_field(out, fd, value)
    for fd, value in model.graph.ListFields():
        if fd.name != "initializer":
            copy_field(out.graph, fd, value)
    if model.HasField("graph"):
        out.graph.SetInParent()
    return out


def serialized_chunks(model: onnx.ModelProto) -> Iterator[bytes]:
    """``model`` serialized in pieces whose concatenation parses as ``model``: first everything
    but the initializers, then one serialized ``ModelProto`` per initializer holding only that
    tensor, which protobuf appends to ``graph.initializer`` when parsing. Writing them one by one
    holds one tensor's bytes at a time, where ``SerializeToString`` holds the whole model (twice,
    while Python copies protobuf's buffer). ``model`` is not changed."""
    yield skeleton(model).SerializeToString()
    for tensor in model.graph.initializer:
        piece = onnx.ModelProto()
        piece.graph.initializer.add().CopyFrom(tensor)
        data = piece.SerializeToString()
        del piece
        yield data


def copy_field(message, fd, value) -> None:
    if hasattr(value, "CopyFrom"):  # a message
        getattr(message, fd.name).CopyFrom(value)
    elif hasattr(value, "extend"):  # a repeated field (protobuf versions differ in how they say so)
        getattr(message, fd.name).extend(value)
    else:
        setattr(message, fd.name, value)
