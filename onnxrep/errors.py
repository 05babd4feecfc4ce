"""Errors onnxrep reports to the user as one line (never as a traceback)."""


class OnnxrepError(Exception):
    """A problem with the user's input or request; the message is the whole explanation."""


class UsageError(OnnxrepError):
    """Invalid options."""


class VerificationError(OnnxrepError):
    """The optimized model is not equal to the original within tolerance."""
