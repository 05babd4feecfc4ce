"""onnxrep: re-parameterize exported ONNX models of multi-branch CNNs into their deploy structure.

    >>> import onnxrep
    >>> model, report = onnxrep.optimize("model.onnx")
    >>> print(report.summary())
"""

from .core import optimize
from .errors import OnnxrepError, UsageError, VerificationError
from .report import Report

__version__ = "0.1.0"
__all__ = ["optimize", "Report", "OnnxrepError", "UsageError", "VerificationError", "__version__"]
