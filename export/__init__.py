"""ONNX export of compressed ViTs (METHOD.md §5-6): paired low-rank MatMuls, INT8 QDQ, FP16.

    from export import export_compressed, ExportOptions, ExportError
    report = export_compressed("runs/x/compressed", "runs/x/onnx", ExportOptions(opset=17))

Importing the package is cheap (torch, onnx and friends load on first use).
"""
from .errors import ExportError, ParityError
from .files import FILES, PRECISIONS, REPORT, STEMS, ExportFile, engine_name, onnx_name
from .linears import canonicalize_linears, linear_weights
from .onnx_export import export_onnx
from .parity import TOLERANCES, cpu_int8_saturates, quant_accuracy
from .qdq import QuantizedLinear, insert_qdq
from .stats import graph_tensors, initializer_bytes, tensor_bytes

__all__ = ["FILES", "PRECISIONS", "REPORT", "STEMS", "TOLERANCES", "ExportError", "ExportFile", "ExportOptions",
           "ParityError", "QuantizedLinear", "canonicalize_linears", "cpu_int8_saturates", "engine_name",
           "export_compressed", "export_onnx", "graph_tensors", "initializer_bytes", "insert_qdq", "linear_weights",
           "onnx_name", "quant_accuracy", "quantized_linears", "tensor_bytes"]


def __getattr__(name):  # lazy: keep `import export` cheap
    if name in ("export_compressed", "ExportOptions", "quantized_linears"):
        from . import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
