"""Runtime stage: run the exported ONNX on ONNX Runtime or TensorRT, and measure it.

Backends share one small interface (``runtime.backends.open_backend``); the benchmark,
the parity check and the evaluation harness are written once against it. Importing this
package touches neither onnxruntime nor tensorrt; backends import their library lazily.
"""
from runtime.errors import RuntimeStageError

__all__ = ["RuntimeStageError"]
