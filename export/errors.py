"""The one user-facing error type of export/ (the CLI prints it as one line, exit code 2)."""


class ExportError(ValueError):
    """Bad input to the export stage: missing or corrupt compressed directory, architecture
    mismatch, an op the exporter cannot translate, an opset that is too old."""


class ParityError(ExportError):
    """An exported file disagrees with its PyTorch reference beyond the stated tolerance."""
