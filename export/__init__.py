"""ONNX export of compressed ViTs (METHOD.md §5-6): paired low-rank MatMuls, INT8 QDQ, FP16.

    from export import export_compressed, ExportOptions, ExportError
    report = export_compressed("runs/x/compressed", "runs/x/onnx", ExportOptions(opset=17))

Importing the package is cheap (torch, onnx and friends load on first use).
"""
from .errors import ExportError, ParityError

__all__ = ["ExportError", "ExportOptions", "ParityError", "export_compressed"]


def __getattr__(name):  # lazy: keep `import export` cheap
    if name in ("export_compressed", "ExportOptions"):
        from . import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
