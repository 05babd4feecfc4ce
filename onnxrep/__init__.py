"""onnxrep: re-parameterize exported ONNX models of multi-branch CNNs into their deploy structure.

    >>> import onnxrep
    >>> model, report = onnxrep.optimize("model.onnx")
    >>> print(report)
    >>> onnxrep.save(model, "model.rep.onnx")   # atomic; external data when large
"""

__version__ = "0.1.0"  # first, so that modules imported below can read it

import importlib.util

if importlib.util.find_spec("onnxruntime") is None:  # any build: onnxruntime, -gpu, -directml, -openvino
    raise ImportError("onnxrep needs an onnxruntime build: pip install 'onnxrep[cpu]' "
                      "(or onnxrep[gpu], onnxrep[directml], onnxrep[openvino])")

from .core import optimize, optimized
from .errors import OnnxrepError, UsageError, VerificationError
from .modelio import save
from .report import Report

__all__ = ["optimize", "optimized", "save", "Report", "OnnxrepError", "UsageError", "VerificationError", "__version__"]
