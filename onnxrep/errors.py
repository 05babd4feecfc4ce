"""Errors onnxrep reports to the user as one line (never as a traceback)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class OnnxrepError(Exception):
    """A problem with the user's input or request; the message is the whole explanation."""


class UsageError(OnnxrepError):
    """Invalid options."""


class VerificationError(OnnxrepError):
    """The optimized model is not equal to the original within tolerance."""
