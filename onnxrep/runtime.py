"""onnxruntime sessions that print nothing, and its error messages reduced to one readable line.

onnxruntime logs through its own C++ logger straight to the process's stderr: errors arrive as
a coloured log line and an ANSI reset line before the exception even reaches Python, and
warnings (such as graph-optimizer notes) appear on successful runs. onnxrep reports every
problem itself, as one line, so its sessions log nothing (:func:`silence`); their exceptions
keep their type but carry :func:`message` of the original text.

Sessions onnxrep does not create (onnx-graphsurgeon's constant folding builds its own) follow
onnxruntime's process-wide default logger instead; only the command line sets that one
(``onnxruntime.set_default_logger_severity``), because a library must not change process-wide
state.
"""

from __future__ import annotations

import re

import onnxruntime as ort

#: onnxruntime's severities: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal. Errors are raised
#: as exceptions anyway, so logging them too would only print them twice.
QUIET = 4

_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")
_SOURCE = re.compile(r"/onnxruntime_src/\S+:\d+ ")
_AFTER_SIGNATURE = re.compile(r"(?: const)?(?: \[with [^\]]*\])? ?")


def silence(options: ort.SessionOptions) -> ort.SessionOptions:
    """``options`` with onnxruntime's logging off for the session and its runs."""
    options.log_severity_level = QUIET
    return options


def _skip_signature(text: str, start: int) -> int:
    """Index after the C++ function signature starting at ``start`` ("void ns::f(args) [with ...] ")."""
    open_paren = text.find("(", start)
    if open_paren < 0:
        return start
    depth = 0
    for i in range(open_paren, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return _AFTER_SIGNATURE.match(text, i + 1).end()
    return start


def message(exc: BaseException) -> str:
    """The first meaningful line of an onnxruntime error.

    Drops the ``[ONNXRuntimeError] : 1 : FAIL :`` prefix, the source location and C++ signature
    of the check that failed, and the failed condition ("x == y was false."), keeping what the
    message says about the model.
    """
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = _PREFIX.sub("", lines[0])
    m = _SOURCE.search(text)
    if m:
        rest = text[_skip_signature(text, m.end()) :]
        cut = rest.find(" was false. ")
        if 0 <= cut < 200:
            rest = rest[cut + len(" was false. ") :]
        text = (text[: m.start()] + rest).strip()
    return text or lines[0]


def clean(exc: BaseException) -> BaseException:
    """An exception of the same type (when it can be built from a message) with :func:`message`."""
    text = message(exc)
    try:
        return type(exc)(text)
    except Exception:
        return RuntimeError(text)


class Session(ort.InferenceSession):
    """An InferenceSession whose ``run`` raises :func:`clean` errors."""

    def run(self, *args, **kwargs):
        try:
            return super().run(*args, **kwargs)
        except Exception as exc:
            raise clean(exc) from None


def open_session(source, options: ort.SessionOptions, providers) -> Session:
    """A silent :class:`Session` on a serialized model or a path, errors reduced by :func:`clean`."""
    try:
        return Session(source, silence(options), providers=providers)
    except Exception as exc:
        raise clean(exc) from None


#: glibc's mallopt parameter for the size from which allocations are mapped on their own.
_M_MMAP_THRESHOLD = -3


def tune_allocator(threshold: int = 1 << 20) -> bool:
    """Map every allocation of ``threshold`` bytes or more on its own (glibc only; False elsewhere).

    glibc raises its mapping threshold after a large block is freed (up to 32 MiB), and from
    then on serves weight-sized buffers from the heap, which it keeps after they are freed: a
    protobuf onnxruntime parses and drops, or weights a rewrite replaced, then stay in the
    process and add up to a second copy of the model. A fixed threshold returns them to the
    system when freed. This changes the whole process's allocator, so only the command line
    (which owns its process) calls it."""
    try:
        import ctypes

        return bool(ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


def release_memory() -> None:
    """Return freed heap memory to the system (glibc's ``malloc_trim``; a no-op elsewhere).

    onnxruntime frees a session's weights to the C heap, which glibc keeps for reuse; without
    this, the reference session's memory still counts towards the process's peak while the
    rewritten model is built and checked."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None
