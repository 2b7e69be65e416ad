"""The one user-facing error type of runtime (the CLI prints it as one line, exit code 2)."""


class RuntimeStageError(RuntimeError):
    """Bad runtime input or an unusable backend: missing file, no GPU, no TensorRT, bad option."""
