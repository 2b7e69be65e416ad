"""The one user-facing error type of compress (the CLI prints it as one line, exit code 2)."""


class CompressError(ValueError):
    """Bad input to the compress stage: unknown model, corrupt checkpoint, impossible budget..."""
