"""TensorRT backend, the runner side (Polygraphy's runner): load an engine (or build one in memory
from the export stage's ONNX with runtime.backends.trt_build, the builder side), run it, read its
memory. The builder's names are re-exported here for the engine CLI and trt-check.

Precision comes from the ONNX file, never from builder flags: the network is strongly
typed, so ``*.fp16.onnx`` gives an FP16 engine and the QDQ ``*.int8-fp16.onnx`` an explicitly
quantized INT8 one with FP16 elsewhere. TensorRT 11 removed the FP16/INT8 builder flags and
is always strongly typed; TensorRT 10 gets the STRONGLY_TYPED network flag, under which
those flags are forbidden too, so both versions build the same way.

The batch axis of the ONNX input "input" (N,3,H,W) is dynamic: the engine gets one
optimization profile per opt batch (default 1, 8 and 32, the benchmark's batches), each
spanning the whole min..max range. TensorRT picks kernels for a profile's opt shape, so a
batch is run on the profile whose opt is that batch (else the smallest opt above it):
batch-1 latency is measured on batch-1 kernels, not on the kernels of another batch.

``tensorrt`` and cuda-python are imported inside functions only; this module imports on any
machine. Device buffers, the stream and the CUDA events are cuda-python's (runtime.backends.
trt_cuda), not torch's, so it runs where JetPack's TensorRT does and torch has no CUDA.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from runtime.backends.base import INPUT_NAME, OUTPUT_NAME, Backend
from runtime.backends.trt_cuda import DeviceBuffer, handle
from runtime.backends.trt_build import (DEFAULT_OPT_BATCHES, PRECISIONS, TensorRTUnavailable,  # noqa: F401
                                       _last_error, _make_logger, add_profiles, batch_profiles, build_engine,
                                       build_serialized, onnx_input_spec, onnx_precision, onnx_weight_bytes,
                                       opt_batch_list, parse_network, pick_profile, profile_info, require_cuda,
                                       require_tensorrt, trt_major, write_atomic)
from runtime.errors import RuntimeStageError

log = logging.getLogger(__name__)

REPORT_NAME = "engine_report.json"


def engine_memory(trt, engine) -> dict:
    """What the engine says about its memory: device (activation + scratch) bytes per context,
    weight bytes (None where this TensorRT has no EngineStat), layer count."""
    device = getattr(engine, "device_memory_size_v2", None)   # 10.1+; the only one in 11
    if device is None:
        device = engine.device_memory_size
    weights = None
    stat = getattr(getattr(trt, "EngineStat", None), "TOTAL_WEIGHTS_SIZE", None)
    if stat is not None and hasattr(engine, "get_engine_stat"):
        weights = int(engine.get_engine_stat(stat))
    return {"device_memory_bytes": int(device), "weight_bytes": weights, "num_layers": int(engine.num_layers)}


def activation_bytes(trt, engine, batches, chw) -> dict[str, int] | None:
    """Device memory a context needs at each batch size, or None where TensorRT cannot say.

    Asked of a context that owns no memory (USER_MANAGED) after setting each input shape
    (``update_device_memory_size_for_shapes``, TensorRT 10+).
    """
    strategy = getattr(getattr(trt, "ExecutionContextAllocationStrategy", None), "USER_MANAGED", None)
    if strategy is None:
        return None
    context = engine.create_execution_context(strategy)
    if context is None or not hasattr(context, "update_device_memory_size_for_shapes"):
        return None
    out = {}
    for b in sorted(set(batches)):
        if context.set_input_shape(INPUT_NAME, (b, *chw)):
            out[str(b)] = int(context.update_device_memory_size_for_shapes())
    return out


_NP_DTYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32,
              "INT64": np.int64, "BOOL": np.bool_, "UINT8": np.uint8}


def numpy_dtype(trt_dtype) -> np.dtype:
    """numpy dtype of a TensorRT tensor type (bfloat16/fp8/int4 I/O tensors have none)."""
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    if name not in _NP_DTYPES:
        raise RuntimeStageError(f"engine tensor type {name} is not supported by this backend")
    return np.dtype(_NP_DTYPES[name])


def _read_report_entry(engine_path: Path) -> dict:
    """The engine's entry in engine_report.json beside it (written by `runtime engine`), or {}."""
    report = engine_path.parent / REPORT_NAME
    if not report.is_file():
        return {}
    try:
        engines = json.loads(report.read_text()).get("engines", {})
    except (OSError, ValueError):
        return {}
    return next((e for e in engines.values() if Path(e.get("engine", "")).name == engine_path.name), {})


# ---------------------------------------------------------------- backend

class TrtBackend(Backend):
    """A TensorRT engine on one GPU, run with name-based tensor I/O on a private CUDA stream.

    ``path`` is a serialized engine (``.engine``/``.plan``) or an ONNX file, which is then
    built in memory with one profile per opt batch. Each batch runs on its own profile
    (``pick_profile``), through one execution context per profile (a profile serves one
    context at a time). ``time_runs``/``timed_run`` time the engine with CUDA events around
    ``execute_async_v3`` (GPU time; the input already on the device, host copies excluded);
    ``run`` is the full host-to-host call. ``cuda`` (a trt_cuda.Cuda) is for tests.
    """

    def __init__(self, path, kind: str = "trt", *, device: int = 0, precision: str | None = None,
                 onnx_path=None, min_batch: int = 1, opt_batches=DEFAULT_OPT_BATCHES, max_batch: int = 32,
                 workspace_mb: int = 1024, timing_cache_path=None, verbose: bool = False, cuda=None):
        if precision is not None and precision not in PRECISIONS:
            raise RuntimeStageError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        trt = require_tensorrt()
        self._cuda = cuda or require_cuda()
        self.name, self.path, self.device = kind, Path(path), int(device)
        self._cuda.set_device(self.device)
        self.build_info: dict = {}
        if self.path.suffix == ".onnx":
            data, self.build_info = build_serialized(
                self.path, precision=precision, min_batch=min_batch, opt_batches=opt_batch_list(opt_batches),
                max_batch=max_batch, workspace_mb=workspace_mb, timing_cache_path=timing_cache_path,
                verbose=verbose)
            onnx_path = self.path
        else:
            data = self.path.read_bytes()
            self.build_info = _read_report_entry(self.path)
            onnx_path = onnx_path or self.build_info.get("onnx")
        self.onnx_path = Path(onnx_path) if onnx_path and Path(onnx_path).is_file() else None
        self.precision = precision or self.build_info.get("precision") or self._precision_from_name()
        self.file_bytes = len(data)

        self._trt = trt
        self._logger = _make_logger(trt, verbose)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(data)
        if self._engine is None:
            raise RuntimeStageError(f"cannot load TensorRT engine {self.path.name}: "
                                    f"{_last_error(self._logger, 'built by another TensorRT version or GPU?')}")
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self._outputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if inputs != [INPUT_NAME] or OUTPUT_NAME not in self._outputs:
            raise RuntimeStageError(f"{self.path.name}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, "
                                    f"got inputs {inputs} and outputs {self._outputs}")
        self._dtypes = {n: numpy_dtype(self._engine.get_tensor_dtype(n)) for n in names}
        self.profiles = []
        for i in range(self._engine.num_optimization_profiles):
            lo, opt, hi = self._engine.get_tensor_profile_shape(INPUT_NAME, i)
            self.profiles.append((int(lo[0]), int(opt[0]), int(hi[0])))
        self.batch_range = (min(p[0] for p in self.profiles), max(p[2] for p in self.profiles))
        self._stream = self._cuda.stream_create()
        self._contexts: dict[int, object] = {}
        self._buffers = {n: DeviceBuffer(self._cuda) for n in names}
        self._batches: dict[int, int] = {}   # batch run so far -> opt batch of the profile it ran on

    @classmethod
    def unavailable_reason(cls, kind: str) -> str | None:
        try:
            require_tensorrt()
            require_cuda()
        except TensorRTUnavailable as e:
            return str(e)
        return None

    def _precision_from_name(self) -> str:
        parts = self.path.name.split(".")
        return next((p for p in parts if p in PRECISIONS), "fp32")

    # -- execution

    def _context(self, index: int):
        """The execution context bound to profile ``index`` (made on first use)."""
        if index not in self._contexts:
            context = self._engine.create_execution_context()
            if context is None:
                raise RuntimeStageError(f"TensorRT cannot create an execution context for {self.path.name}: "
                                        f"{_last_error(self._logger, 'out of device memory?')}")
            if not context.set_optimization_profile_async(index, handle(self._stream)):
                raise RuntimeStageError(f"engine {self.path.name} refuses optimization profile {index}")
            self._contexts[index] = context
        return self._contexts[index]

    def _stage(self, x: np.ndarray):
        """Copy a host batch to the device on the batch's profile; return (context, host output)."""
        n = x.shape[0]
        index = pick_profile(self.profiles, n)
        context = self._context(index)
        x = np.ascontiguousarray(x, dtype=self._dtypes[INPUT_NAME])
        if not context.set_input_shape(INPUT_NAME, tuple(x.shape)):
            raise RuntimeStageError(f"engine {self.path.name} rejects input shape {tuple(x.shape)}")
        stream = handle(self._stream)
        ptr = self._buffers[INPUT_NAME].ensure(x.nbytes)
        self._cuda.copy_htod(ptr, x, stream)
        context.set_tensor_address(INPUT_NAME, ptr)
        host = None
        for name in self._outputs:
            shape = tuple(int(d) for d in context.get_tensor_shape(name))
            out = np.empty(shape, dtype=self._dtypes[name])
            context.set_tensor_address(name, self._buffers[name].ensure(out.nbytes))
            if name == OUTPUT_NAME:
                host = out
        self._batches[n] = self.profiles[index][1]
        self._x_alive = x   # the async copy reads it until the stream is synchronized
        return context, host

    def _execute(self, context) -> None:
        if not context.execute_async_v3(handle(self._stream)):
            raise RuntimeError(f"execute_async_v3 failed: {_last_error(self._logger, 'no TensorRT error logged')}")

    def _fetch(self, host: np.ndarray) -> np.ndarray:
        self._cuda.copy_dtoh(host, self._buffers[OUTPUT_NAME].ptr, handle(self._stream))
        self._cuda.stream_synchronize(self._stream)
        return host.astype(np.float32, copy=False)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits for ``x``; a batch above the profiles' maximum is run in chunks."""
        hi = self.batch_range[1]
        if x.shape[0] > hi:
            return np.concatenate([self.run(x[i:i + hi]) for i in range(0, x.shape[0], hi)])
        context, host = self._stage(x)
        self._execute(context)
        return self._fetch(host)

    def _timed(self, context, n: int) -> list[float]:
        """Milliseconds of ``n`` back-to-back executions between CUDA events on the stream."""
        cuda, stream = self._cuda, handle(self._stream)
        events = [(cuda.event_create(), cuda.event_create()) for _ in range(n)]
        try:
            for start, end in events:
                cuda.event_record(start, stream)
                self._execute(context)
                cuda.event_record(end, stream)
            cuda.stream_synchronize(self._stream)
            return [cuda.event_elapsed_ms(start, end) for start, end in events]
        finally:
            for pair in events:
                for e in pair:
                    cuda.event_destroy(e)

    def timed_run(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        """(logits, milliseconds of GPU time between CUDA events around execute_async_v3)."""
        context, host = self._stage(x)
        (ms,) = self._timed(context, 1)
        return self._fetch(host), ms

    def time_runs(self, x: np.ndarray, n: int = 1) -> list[float]:
        """Seconds of GPU time of ``n`` back-to-back executions (CUDA events; input staged once)."""
        context, _ = self._stage(x)
        return [ms / 1000.0 for ms in self._timed(context, n)]

    # -- description

    def input_shape(self) -> tuple:
        return tuple(int(d) for d in self._engine.get_tensor_shape(INPUT_NAME))

    def memory(self) -> dict[str, int]:
        """file_bytes: serialized engine (the file, or the in-memory plan when opened from ONNX);
        device_memory_bytes: activation/scratch memory each context allocates at the profiles'
        largest shapes; weight_bytes: the engine's own count (absent where TensorRT cannot say);
        onnx_weight_bytes[.<dtype>]: the source ONNX's weights (a fallback, labelled by its key);
        activation_bytes.b<N>: context memory needed at batch N, for batches run so far."""
        facts = engine_memory(self._trt, self._engine)
        out = {"file_bytes": self.file_bytes, "device_memory_bytes": facts["device_memory_bytes"]}
        if facts["weight_bytes"] is not None:
            out["weight_bytes"] = facts["weight_bytes"]
        if self.onnx_path is not None:
            for dtype, n in onnx_weight_bytes(self.onnx_path).items():
                out["onnx_weight_bytes" if dtype == "total" else f"onnx_weight_bytes.{dtype}"] = n
        by_batch = activation_bytes(self._trt, self._engine, self._batches, self.input_shape()[1:]) or {}
        for batch, n in by_batch.items():
            out[f"activation_bytes.b{batch}"] = n
        return out

    def describe(self) -> dict:
        facts = engine_memory(self._trt, self._engine)
        return {
            "backend": "tensorrt",
            "tensorrt": self._trt.__version__,
            "gpu": self._cuda.device_properties(self.device)["name"],
            "cuda_runtime": self._cuda.runtime_version(),
            "precision": self.precision,
            "strongly_typed": True,
            "batch_range": list(self.batch_range),
            "profiles": [{"min": lo, "opt": opt, "max": hi} for lo, opt, hi in self.profiles],
            "profile_opt_by_batch": {str(b): opt for b, opt in sorted(self._batches.items())},
            "num_layers": facts["num_layers"],
            "weight_bytes_source": ("engine (EngineStat.TOTAL_WEIGHTS_SIZE)" if facts["weight_bytes"] is not None
                                    else "not reported by this TensorRT; see onnx_weight_bytes (ONNX initializers)"),
            "onnx": str(self.onnx_path) if self.onnx_path else None,
            "timing": "CUDA events around execute_async_v3 (GPU time, input resident, host copies excluded); "
                      "each batch on the optimization profile whose opt is that batch where there is one",
        }

    def close(self) -> None:
        if getattr(self, "_stream", None) is not None:
            self._cuda.stream_synchronize(self._stream)
            for buf in self._buffers.values():
                buf.free()
            self._cuda.stream_destroy(self._stream)
            self._stream = None
        self._contexts = {}
        self._engine = self._runtime = None
