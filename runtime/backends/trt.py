"""TensorRT backend: build an engine from the export stage's ONNX, load it, run it, read its memory.

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
from runtime.errors import RuntimeStageError
from cliutil import atomic_write_bytes as write_atomic

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
INSTALL_HINT = ("TensorRT is not installed (pip install '.[trt]' on a machine with NVIDIA's index) "
                "— `make engine` needs TensorRT and a CUDA GPU")
REPORT_NAME = "engine_report.json"


class TensorRTUnavailable(RuntimeStageError):
    """TensorRT or a CUDA GPU is missing here (the engine CLI exits 3 on it)."""


def require_tensorrt():
    """Import and return ``tensorrt`` (10 or newer), or raise TensorRTUnavailable with one line."""
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailable(INSTALL_HINT) from None
    if trt_major(trt) < 10:
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} found; this project needs TensorRT 10 or 11")
    return trt


def require_cuda():
    """A checked CUDA runtime (runtime.backends.trt_cuda.Cuda) with a GPU, or TensorRTUnavailable (one line)."""
    from runtime.backends.trt_cuda import Cuda, CudaError
    try:
        cuda = Cuda()
        count = cuda.device_count()
    except ImportError as e:
        raise TensorRTUnavailable(str(e)) from None
    except CudaError as e:
        raise TensorRTUnavailable(f"no CUDA GPU visible ({e}) — `make engine` needs TensorRT and a CUDA GPU") from None
    if count < 1:
        raise TensorRTUnavailable("no CUDA GPU visible (cudaGetDeviceCount is 0) — `make engine` needs TensorRT "
                                  "and a CUDA GPU")
    return cuda


def trt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


# ---------------------------------------------------------------- ONNX facts (no TensorRT needed)

def _load_onnx_graph(onnx_path: Path):
    import onnx
    try:
        return onnx.load(str(onnx_path), load_external_data=False).graph
    except Exception as e:
        raise RuntimeStageError(f"cannot read ONNX {onnx_path}: {e}") from None


def onnx_input_spec(onnx_path: Path) -> tuple[str, tuple[int, int, int]]:
    """Name and static (C,H,W) of the ONNX input "input"; the batch axis may be anything."""
    graph = _load_onnx_graph(onnx_path)
    initializers = {t.name for t in graph.initializer}
    inputs = {i.name: i for i in graph.input if i.name not in initializers}
    if INPUT_NAME not in inputs:
        raise RuntimeStageError(f"{onnx_path.name} has no input named {INPUT_NAME!r} "
                                f"(inputs: {', '.join(inputs) or 'none'})")
    dims = inputs[INPUT_NAME].type.tensor_type.shape.dim
    chw = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims[1:])
    if len(dims) != 4 or min(chw) <= 0:
        raise RuntimeStageError(f"{onnx_path.name}: input {INPUT_NAME!r} must be (N,C,H,W) with static "
                                f"C,H,W; got rank {len(dims)} with C,H,W {chw}")
    return INPUT_NAME, chw


def onnx_weight_bytes(onnx_path: Path) -> dict[str, int]:
    """Bytes of the ONNX file's weights (initializers + Constant tensors): {"total": n, "<dtype>": n}."""
    from runtime.memory import inspect_onnx
    by_dtype = inspect_onnx(onnx_path).weight_bytes
    return {"total": sum(by_dtype.values()), **by_dtype}


def onnx_precision(onnx_path: Path) -> str:
    """"int8" for a quantized (Q/DQ) graph, "fp16" for mostly-float16 weights, else "fp32"."""
    from runtime.memory import inspect_onnx
    return inspect_onnx(onnx_path).precision


# ---------------------------------------------------------------- build

def _make_logger(trt, verbose: bool = False):
    """A TensorRT logger that forwards to ``logging`` and keeps the errors for a one-line message."""
    levels = {trt.ILogger.INTERNAL_ERROR: logging.CRITICAL, trt.ILogger.ERROR: logging.ERROR,
              trt.ILogger.WARNING: logging.WARNING, trt.ILogger.INFO: logging.INFO,
              trt.ILogger.VERBOSE: logging.DEBUG}

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            level = levels.get(severity, logging.DEBUG)
            if level >= logging.ERROR:
                self.errors.append(str(msg))
            if level >= logging.WARNING or verbose:
                log.log(level, "TensorRT: %s", msg)

    return _Logger()


def _last_error(logger, default: str) -> str:
    return logger.errors[-1].strip().splitlines()[0] if logger.errors else default


def network_flags(trt) -> int:
    """Strongly typed network: the STRONGLY_TYPED flag in TensorRT 10, always on (flag ignored) in 11."""
    if trt_major(trt) >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def parse_network(onnx_path: Path, *, verbose: bool = False):
    """Parse ONNX into a strongly typed network. Returns (trt, logger, builder, network, parser).

    The caller keeps all five alive while it uses the network (TensorRT objects hold raw
    pointers to each other).
    """
    trt = require_tensorrt()
    logger = _make_logger(trt, verbose)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        first = errors[0].strip().splitlines()[0] if errors else _last_error(logger, "unknown error")
        raise RuntimeStageError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {first}")
    return trt, logger, builder, network, parser


DEFAULT_OPT_BATCHES = (1, 8, 32)   # the benchmark's default batch sizes


def opt_batch_list(value) -> tuple[int, ...]:
    """Opt batches from an int, a sequence or a "1,8,32" string (bench --option passes strings)."""
    if isinstance(value, str):
        try:
            value = [int(t) for t in value.split(",") if t.strip()]
        except ValueError:
            raise RuntimeStageError(f"opt batches must be integers, got {value!r}") from None
    elif isinstance(value, int):
        value = [value]
    out = tuple(sorted({int(b) for b in value}))
    if not out:
        raise RuntimeStageError("need at least one opt batch")
    return out


def batch_profiles(min_batch: int, opt_batches, max_batch: int) -> list[tuple[int, int, int]]:
    """(min, opt, max) batch of each optimization profile: one per opt batch, each over min..max."""
    opts = opt_batch_list(opt_batches)
    if not 1 <= min_batch <= opts[0] or opts[-1] > max_batch:
        raise RuntimeStageError(f"need 1 <= min-batch <= every opt batch <= max-batch, "
                                f"got {min_batch}/{','.join(map(str, opts))}/{max_batch}")
    return [(min_batch, b, max_batch) for b in opts]


def pick_profile(profiles, batch: int) -> int:
    """Index of the profile for ``batch``: among those whose range holds it, the one tuned for it
    (opt == batch), else the smallest opt above it, else the largest opt below it."""
    fits = [(i, p) for i, p in enumerate(profiles) if p[0] <= batch <= p[2]]
    if not fits:
        ranges = ", ".join(f"{p[0]}..{p[2]}" for p in profiles)
        raise RuntimeStageError(f"batch {batch} is outside the engine's profiles ({ranges}); "
                                f"rebuild with --max-batch {batch}")
    above = [(p[1], i) for i, p in fits if p[1] >= batch]
    return min(above)[1] if above else max((p[1], i) for i, p in fits)[1]


def build_serialized(onnx_path, *, precision: str | None = None, min_batch: int = 1,
                     opt_batches=DEFAULT_OPT_BATCHES, max_batch: int = 32, workspace_mb: int = 1024,
                     timing_cache_path=None, verbose: bool = False, detailed: bool = False) -> tuple[bytes, dict]:
    """Build a serialized engine from ``onnx_path`` in memory. Returns (engine bytes, build info).

    ``detailed`` builds with ProfilingVerbosity.DETAILED, so the engine inspector reports each
    layer's tensor formats and tactic (runtime.trt_check reads them).
    One optimization profile per opt batch (``batch_profiles``); info["profiles"] lists them.

    ``precision`` must agree with the file (``runtime.memory.inspect_onnx``: quantization
    ops = int8, mostly float16 weights = fp16); None takes the file's. The timing cache at
    ``timing_cache_path`` is read when present and written back (atomically) after the build.
    """
    from runtime.memory import inspect_onnx
    onnx_path = Path(onnx_path)
    stats = inspect_onnx(onnx_path)
    found = stats.precision
    if precision is not None and precision != found:
        raise RuntimeStageError(f"{onnx_path.name} is a {found} graph, not {precision}: strongly typed "
                                f"TensorRT takes precision from the ONNX (use the *.{precision}.onnx file)")
    profiles = batch_profiles(min_batch, opt_batches, max_batch)
    if workspace_mb <= 0:
        raise RuntimeStageError(f"workspace must be positive, got {workspace_mb} MB")
    name, chw = onnx_input_spec(onnx_path)
    require_cuda()
    trt, logger, builder, network, parser = parse_network(onnx_path, verbose=verbose)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    add_profiles(builder, config, name, chw, profiles)
    if detailed:
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED

    cache_path = Path(timing_cache_path) if timing_cache_path else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache_reused = False
    if cache_bytes:
        cache = config.create_timing_cache(cache_bytes)
        cache_reused = cache is not None and bool(config.set_timing_cache(cache, False))
        if not cache_reused:   # written by another TensorRT version or for another GPU
            log.warning("timing cache %s does not fit this TensorRT/GPU; starting a new one", cache_path)
    if not cache_reused:
        config.set_timing_cache(config.create_timing_cache(b""), False)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise RuntimeStageError(f"TensorRT could not build {onnx_path.name}: "
                                f"{_last_error(logger, 'see the log with --verbose')}")
    data = bytes(memoryview(serialized))
    if cache_path is not None:
        write_atomic(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))

    info = {
        "onnx": str(onnx_path),
        "precision": found,
        "tensorrt": trt.__version__,
        "strongly_typed": True,
        "input": name,
        "profiles": profile_info(profiles, chw),
        "workspace_bytes": int(workspace_mb) << 20,
        "timing_cache": str(cache_path) if cache_path else None,
        "timing_cache_reused": cache_reused,
        "build_seconds": round(seconds, 2),
        "engine_bytes": len(data),
        "onnx_bytes": stats.file_bytes,
        "onnx_weight_bytes": {"total": stats.total_weight_bytes, **stats.weight_bytes},
    }
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if tf32 is not None:
        info["tf32"] = bool(config.get_flag(tf32))
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise RuntimeStageError(f"TensorRT built {onnx_path.name} but cannot load the engine: "
                                f"{_last_error(logger, 'deserialize_cuda_engine returned None')}")
    info.update(engine_memory(trt, engine))
    info["activation_bytes_by_batch"] = activation_bytes(
        trt, engine, sorted({b for p in profiles for b in p}), chw)
    return data, info


def add_profiles(builder, config, name: str, chw, profiles) -> None:
    """One optimization profile per (min, opt, max) batch on input ``name``, in order (index = position)."""
    for lo, opt, hi in profiles:
        profile = builder.create_optimization_profile()
        profile.set_shape(name, (lo, *chw), (opt, *chw), (hi, *chw))
        if config.add_optimization_profile(profile) < 0:
            raise RuntimeStageError(f"TensorRT refused the optimization profile {lo}/{opt}/{hi}")


def profile_info(profiles, chw) -> list[dict]:
    """The profiles as the engine report lists them: index and min/opt/max input shapes."""
    return [{"index": i, "min": [lo, *chw], "opt": [opt, *chw], "max": [hi, *chw]}
            for i, (lo, opt, hi) in enumerate(profiles)]


def build_engine(onnx_path, engine_path, *, precision: str = "fp16", min_batch: int = 1,
                 opt_batches=DEFAULT_OPT_BATCHES, max_batch: int = 32, workspace_mb: int = 1024,
                 timing_cache_path=None, verbose: bool = False) -> dict:
    """Build ``onnx_path`` into an engine file at ``engine_path`` (written atomically); return build info."""
    if precision not in PRECISIONS:
        raise RuntimeStageError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    data, info = build_serialized(onnx_path, precision=precision, min_batch=min_batch, opt_batches=opt_batches,
                                  max_batch=max_batch, workspace_mb=workspace_mb,
                                  timing_cache_path=timing_cache_path, verbose=verbose)
    write_atomic(Path(engine_path), data)
    info["engine"] = str(engine_path)
    return info


# ---------------------------------------------------------------- engine facts

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
