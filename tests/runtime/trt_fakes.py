"""Stand-ins with the shape of the tensorrt and cuda-python APIs the TensorRT backend calls, for
machines without a GPU. They compute for real: "device memory" is host memory behind integer
addresses, cudaMemcpyAsync copies bytes, and the fake engine's execute_async_v3 reads its input
buffer and writes logits = mean over (H, W) of the input, per channel, times a fixed matrix, so a
test can check the numbers that come back, which profile each batch ran on, and what was freed."""
from __future__ import annotations

import ctypes
import enum
import types

import numpy as np

# ------------------------------------------------------------------ cuda-python runtime


class _Err(enum.Enum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2


class _Kind(enum.Enum):
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


class FakeCudart:
    """cudaMalloc/Free/MemcpyAsync/Stream*/Event* with cuda-python's (err, value) returns."""

    cudaError_t = _Err
    cudaMemcpyKind = _Kind

    def __init__(self, devices: int = 1):
        self.devices = devices
        self.memory: dict[int, np.ndarray] = {}   # address -> the bytes behind it
        self.freed: list[int] = []
        self.streams: set[int] = set()
        self.events: dict[int, float | None] = {}
        self.clock_ms = 0.0
        self._next = 1 << 20

    def _new_handle(self) -> int:
        self._next += 4096
        return self._next

    def cudaGetErrorName(self, err):
        return _Err.cudaSuccess, err.name.encode()

    def cudaGetDeviceCount(self):
        return _Err.cudaSuccess, self.devices

    def cudaSetDevice(self, d):
        return _Err.cudaSuccess if d < self.devices else _Err.cudaErrorInvalidValue

    def cudaRuntimeGetVersion(self):
        return _Err.cudaSuccess, 12060

    def cudaGetDeviceProperties(self, d):
        props = types.SimpleNamespace(name=b"Fake GPU\0\0", major=8, minor=7, totalGlobalMem=8 << 30)
        return _Err.cudaSuccess, props

    def cudaMalloc(self, nbytes):
        ptr = self._new_handle()
        self.memory[ptr] = np.zeros(nbytes, np.uint8)
        return _Err.cudaSuccess, ptr

    def cudaFree(self, ptr):
        if ptr not in self.memory:
            return _Err.cudaErrorInvalidValue
        del self.memory[ptr]
        self.freed.append(ptr)
        return _Err.cudaSuccess

    def _device(self, ptr, nbytes) -> np.ndarray:
        buf = self.memory[ptr]
        assert nbytes <= buf.size, f"copy of {nbytes} bytes into a {buf.size}-byte buffer"
        return buf[:nbytes]

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        if stream not in self.streams:
            return _Err.cudaErrorInvalidValue
        if kind is _Kind.cudaMemcpyHostToDevice:
            self._device(dst, nbytes)[:] = np.frombuffer(ctypes.string_at(src, nbytes), np.uint8)
        else:
            ctypes.memmove(dst, self._device(src, nbytes).ctypes.data, nbytes)
        return (_Err.cudaSuccess,)

    def cudaStreamCreate(self):
        s = self._new_handle()
        self.streams.add(s)
        return _Err.cudaSuccess, s

    def cudaStreamSynchronize(self, s):
        return (_Err.cudaSuccess,) if s in self.streams else (_Err.cudaErrorInvalidValue,)

    def cudaStreamDestroy(self, s):
        self.streams.discard(s)
        return (_Err.cudaSuccess,)

    def cudaEventCreate(self):
        e = self._new_handle()
        self.events[e] = None
        return _Err.cudaSuccess, e

    def cudaEventRecord(self, e, stream):
        self.events[e] = self.clock_ms
        return (_Err.cudaSuccess,)

    def cudaEventElapsedTime(self, a, b):
        return _Err.cudaSuccess, self.events[b] - self.events[a]

    def cudaEventDestroy(self, e):
        del self.events[e]
        return (_Err.cudaSuccess,)


# ------------------------------------------------------------------ tensorrt


class _DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    BF16 = 7


class _IOMode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


class FakeEngine:
    """An engine with input "input" (N,3,H,W) float32, output "logits" (N,K), and its profiles."""

    def __init__(self, cuda: FakeCudart, profiles, chw=(3, 4, 4), classes=5, ms_per_image=0.25,
                 output_dtype=_DataType.FLOAT):
        self.cuda, self.profiles, self.chw, self.ms = cuda, profiles, chw, ms_per_image
        self.weight = np.arange(chw[0] * classes, dtype=np.float32).reshape(chw[0], classes) / 10
        self.output_dtype = output_dtype
        self.contexts: list[FakeContext] = []
        self.num_io_tensors = 2
        self.num_optimization_profiles = len(profiles)
        self.num_layers = 3
        self.device_memory_size_v2 = 1 << 16

    def get_tensor_name(self, i):
        return ("input", "logits")[i]

    def get_tensor_mode(self, name):
        return _IOMode.INPUT if name == "input" else _IOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return _DataType.FLOAT if name == "input" else self.output_dtype

    def get_tensor_shape(self, name):
        return (-1, *self.chw) if name == "input" else (-1, self.weight.shape[1])

    def get_tensor_profile_shape(self, name, i):
        return tuple((b, *self.chw) for b in self.profiles[i])

    def create_execution_context(self, *strategy):
        c = FakeContext(self)
        self.contexts.append(c)
        return c

    def expected(self, x: np.ndarray) -> np.ndarray:
        return x.mean(axis=(2, 3)) @ self.weight


class FakeContext:
    def __init__(self, engine: FakeEngine):
        self.engine, self.profile, self.shape = engine, 0, None
        self.addresses: dict[str, int] = {}
        self.runs: list[tuple[int, int]] = []   # (profile, batch) of every execution

    def set_optimization_profile_async(self, index, stream):
        taken = {c.profile for c in self.engine.contexts if c is not self}
        if not 0 <= index < len(self.engine.profiles) or index in taken or not isinstance(stream, int):
            return False
        self.profile = index
        return True

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profiles[self.profile]
        if name != "input" or tuple(shape[1:]) != self.engine.chw or not lo <= shape[0] <= hi:
            return False
        self.shape = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        return (self.shape[0], self.engine.weight.shape[1])

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream):
        cuda, n = self.engine.cuda, self.shape[0]
        if stream not in cuda.streams:
            return False
        x = cuda.memory[self.addresses["input"]][:4 * int(np.prod(self.shape))].view(np.float32)
        y = self.engine.expected(x.reshape(self.shape)).astype(np.float32)
        cuda.memory[self.addresses["logits"]][:y.nbytes] = y.view(np.uint8).ravel()
        cuda.clock_ms += self.engine.ms * n
        self.runs.append((self.profile, n))
        return True


def fake_tensorrt(engine_factory):
    """A module object with what TrtBackend touches: Runtime, ILogger, TensorIOMode, __version__."""
    class ILogger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self, *a):
            pass

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            return engine_factory(data) if data.startswith(b"FAKEPLAN") else None

    return types.SimpleNamespace(__version__="10.99.0", ILogger=ILogger, Runtime=Runtime, TensorIOMode=_IOMode,
                                 DataType=_DataType)
