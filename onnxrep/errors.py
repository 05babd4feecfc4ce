"""Errors onnxrep reports to the user as one line (never as a traceback), and the one
exception a rule raises to decline a match."""


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


class Decline(Exception):
    """A rewrite does not apply here; the message says why (shown with ``-v``).

    The one way to decline, from the numpy kernels, the typed op readers and the rules alike
    (docs/architecture.md). It never reaches the user as an error: the pass manager records
    it against the rule and node and goes on.
    """
