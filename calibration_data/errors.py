"""The one user-facing error type of calibration_data (the CLIs print it as one line)."""


class CalibrationDataError(ValueError):
    """Bad calibration or evaluation data: missing folder, no usable images, bad split."""
