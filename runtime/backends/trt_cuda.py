"""The CUDA runtime calls the TensorRT backend needs: device buffers, one stream, timing events.

Through cuda-python's runtime bindings (``cuda.bindings.runtime``, or ``cuda.cudart`` before
cuda-python 12.8), not torch: on a Jetson a pip-installed torch is CPU-only while JetPack's
TensorRT and cuda-python work. Imported lazily; every call's error code is checked and a
failure is one line naming the call. ``Cuda(module)`` takes the bindings module, so the logic
here is testable with a stand-in where no GPU exists.
"""
from __future__ import annotations

import numpy as np

from runtime.errors import RuntimeStageError

CUDA_HINT = "cuda-python is not installed (pip install cuda-python; JetPack: the matching cuda-python)"


class CudaError(RuntimeStageError):
    """A CUDA runtime call failed (its name and CUDA's error name in one line)."""


def import_cudart():
    """The cuda-python runtime bindings module; ImportError with CUDA_HINT when missing."""
    try:
        from cuda.bindings import runtime
        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart
        return cudart
    except ImportError:
        raise ImportError(CUDA_HINT) from None


class Cuda:
    """Checked wrappers over the few cudart calls used here."""

    def __init__(self, rt=None):
        self.rt = rt if rt is not None else import_cudart()

    def check(self, result, what: str):
        """Unpack cuda-python's ``(err, *values)`` and raise CudaError unless err is cudaSuccess."""
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self.rt.cudaError_t.cudaSuccess:
            raise CudaError(f"{what} failed: {self.error_name(err)}")
        return values[0] if len(values) == 1 else tuple(values) or None

    def error_name(self, err) -> str:
        try:
            ok, name = self.rt.cudaGetErrorName(err)
            return name.decode() if isinstance(name, bytes) else str(name)
        except Exception:  # an unknown code: its repr is still one line
            return str(err)

    # -- device

    def device_count(self) -> int:
        return int(self.check(self.rt.cudaGetDeviceCount(), "cudaGetDeviceCount"))

    def set_device(self, device: int) -> None:
        self.check(self.rt.cudaSetDevice(device), f"cudaSetDevice({device})")

    def device_properties(self, device: int) -> dict:
        """name, compute capability and memory of ``device``."""
        p = self.check(self.rt.cudaGetDeviceProperties(device), f"cudaGetDeviceProperties({device})")
        name = p.name.split(b"\0", 1)[0].decode() if isinstance(p.name, bytes) else str(p.name)
        return {"name": name, "compute_capability": f"{p.major}.{p.minor}", "memory_bytes": int(p.totalGlobalMem)}

    def runtime_version(self) -> str:
        v = int(self.check(self.rt.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion"))
        return f"{v // 1000}.{v % 1000 // 10}"

    # -- memory, streams, events

    def malloc(self, nbytes: int) -> int:
        return int(self.check(self.rt.cudaMalloc(max(int(nbytes), 1)), f"cudaMalloc({nbytes})"))

    def free(self, ptr: int) -> None:
        self.check(self.rt.cudaFree(ptr), "cudaFree")

    def copy_htod(self, dst: int, host: np.ndarray, stream: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.check(self.rt.cudaMemcpyAsync(dst, host.ctypes.data, host.nbytes, kind, stream), "cudaMemcpyAsync(H2D)")

    def copy_dtoh(self, host: np.ndarray, src: int, stream: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.check(self.rt.cudaMemcpyAsync(host.ctypes.data, src, host.nbytes, kind, stream), "cudaMemcpyAsync(D2H)")

    def stream_create(self):
        return self.check(self.rt.cudaStreamCreate(), "cudaStreamCreate")

    def stream_synchronize(self, stream) -> None:
        self.check(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def stream_destroy(self, stream) -> None:
        self.check(self.rt.cudaStreamDestroy(stream), "cudaStreamDestroy")

    def event_create(self):
        return self.check(self.rt.cudaEventCreate(), "cudaEventCreate")

    def event_record(self, event, stream) -> None:
        self.check(self.rt.cudaEventRecord(event, stream), "cudaEventRecord")

    def event_elapsed_ms(self, start, end) -> float:
        return float(self.check(self.rt.cudaEventElapsedTime(start, end), "cudaEventElapsedTime"))

    def event_destroy(self, event) -> None:
        self.check(self.rt.cudaEventDestroy(event), "cudaEventDestroy")


def handle(obj) -> int:
    """The integer value of a cuda-python handle (cudaStream_t ...) as TensorRT wants it."""
    return int(obj) if isinstance(obj, int) else int(getattr(obj, "getPtr", lambda: obj)())


class DeviceBuffer:
    """A device allocation that grows on demand (never shrinks) and is freed by ``free``."""

    def __init__(self, cuda: Cuda):
        self.cuda, self.ptr, self.nbytes = cuda, 0, 0

    def ensure(self, nbytes: int) -> int:
        if nbytes > self.nbytes:
            self.free()
            self.ptr, self.nbytes = self.cuda.malloc(nbytes), int(nbytes)
        return self.ptr

    def free(self) -> None:
        if self.ptr:
            self.cuda.free(self.ptr)
        self.ptr, self.nbytes = 0, 0
