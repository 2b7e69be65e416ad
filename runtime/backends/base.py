"""The one backend interface, and the registry that opens a backend by kind.

A backend is one loaded model on one runtime (Polygraphy's runner, ModelOpt's deployment
client): ``run`` a float32 NCHW batch fed to input ``input`` and get ``logits`` back,
report its input shape, its memory and a description. Implementations live in their own
module and are imported only when their kind is asked for, so ``runtime`` imports on a
machine without onnxruntime-gpu, tensorrt or a GPU.

Contract for an implementation registered under ``kind`` (see ``register_backend``):
  - constructed as ``cls(path, kind=kind, **options)``; unknown options are a user error;
  - ``cls.unavailable_reason(kind)`` returns None when usable here, else one line saying
    why (library missing, no GPU); it may import the library but must not raise;
  - ``name`` is the kind, ``path`` the file it was opened from, ``precision`` one of
    "fp32", "fp16", "int8";
  - user errors (bad file, missing provider) raise ``RuntimeStageError`` with one line.
"""
from __future__ import annotations

import abc
import importlib
import inspect
import time
from pathlib import Path

import numpy as np

from runtime.errors import RuntimeStageError

INPUT_NAME = "input"
OUTPUT_NAME = "logits"

# kind -> "module:attribute"; the module is imported on first use only.
_REGISTRY: dict[str, str] = {
    "ort": "runtime.backends.ort:OrtBackend",
    "ort-cuda": "runtime.backends.ort:OrtBackend",
    "trt": "runtime.backends.trt:TrtBackend",
}


class Backend(abc.ABC):
    """One model loaded on one runtime; use as a context manager or call ``close``."""

    name: str
    path: Path
    precision: str

    @abc.abstractmethod
    def run(self, x: np.ndarray) -> np.ndarray:
        """Feed ``x`` (N,3,H,W float32) to input "input"; return "logits" (N,classes) on the host."""

    @abc.abstractmethod
    def input_shape(self) -> tuple:
        """Input shape with -1 for dynamic axes (the batch axis, usually)."""

    @abc.abstractmethod
    def memory(self) -> dict[str, int]:
        """Bytes this backend can account for: "file_bytes", "weight_bytes",
        "weight_bytes.<dtype>", and activation/device memory where the runtime reports it."""

    @abc.abstractmethod
    def describe(self) -> dict:
        """JSON-able description: provider, library versions, options in effect."""

    def close(self) -> None:
        """Release the session/engine; the default has nothing to release."""

    def time_runs(self, x: np.ndarray, n: int = 1) -> list[float]:
        """Wall seconds of ``n`` calls of ``run(x)``.

        ``run`` returns host arrays, so it has finished when it returns and a host clock
        is honest. A GPU backend may override this with device events (CUDA events).
        """
        times = []
        for _ in range(n):
            start = time.perf_counter()
            self.run(x)
            times.append(time.perf_counter() - start)
        return times

    @classmethod
    def unavailable_reason(cls, kind: str) -> str | None:
        """None if ``kind`` can run here, else a one-line reason. Must not raise."""
        return None

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.name!r}, path='{self.path}', precision={self.precision!r})"


def register_backend(kind: str, target: str) -> None:
    """Register ``"module:Class"`` under ``kind``; the module is imported when first used."""
    if ":" not in target:
        raise ValueError(f"backend target must be 'module:attribute', got {target!r}")
    _REGISTRY[kind] = target


def backend_kinds() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def backend_class(kind: str) -> type[Backend]:
    """Import and return the class registered for ``kind`` (RuntimeStageError if it can't)."""
    if kind not in _REGISTRY:
        raise RuntimeStageError(f"unknown backend {kind!r}; choose one of {', '.join(_REGISTRY)}")
    module_name, _, attr = _REGISTRY[kind].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        # The backend module itself (or a dependency it imports eagerly) is missing.
        raise RuntimeStageError(f"backend {kind!r} is unavailable: cannot import {module_name} ({exc})") from exc
    return getattr(module, attr)


def _reason(cls: type[Backend], kind: str) -> str | None:
    try:
        return cls.unavailable_reason(kind)
    except Exception as exc:  # the contract says it must not raise; report it instead of crashing `info`
        return f"availability check failed: {type(exc).__name__}: {exc}"


def available_backends() -> dict[str, str | None]:
    """kind -> None when usable on this machine, else a one-line reason."""
    result: dict[str, str | None] = {}
    for kind in _REGISTRY:
        try:
            result[kind] = _reason(backend_class(kind), kind)
        except RuntimeStageError as exc:
            result[kind] = str(exc)
    return result


def thread_options(kind: str, threads: int | None) -> dict:
    """Backend options for a CPU thread count: ONNX Runtime takes it, TensorRT has no such knob."""
    return {"intra_op_threads": threads} if threads and kind.startswith("ort") else {}


def open_backend(kind: str, path, **options) -> Backend:
    """Open ``path`` (an .onnx, or an engine for TensorRT) on backend ``kind``."""
    cls = backend_class(kind)
    reason = _reason(cls, kind)
    if reason is not None:
        raise RuntimeStageError(f"backend {kind!r} is unavailable: {reason}")
    path = Path(path)
    if not path.is_file():
        raise RuntimeStageError(f"no such model file: {path}")
    try:
        inspect.signature(cls).bind(path, kind=kind, **options)
    except TypeError as exc:
        raise RuntimeStageError(f"bad options for backend {kind!r}: {exc}") from None
    return cls(path, kind=kind, **options)
