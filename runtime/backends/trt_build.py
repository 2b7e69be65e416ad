"""TensorRT engine builder (Polygraphy's loader side): parse the export stage's ONNX into a strongly
typed network, give it one optimization profile per opt batch, build and serialize the engine.
runtime.backends.trt is the runner side (load, run, memory). ``tensorrt`` and cuda-python are
imported inside functions only; this module imports on any machine.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from cliutil import atomic_write_bytes as write_atomic
from runtime.backends.base import INPUT_NAME
from runtime.backends.trt_cuda import Cuda, CudaError
from runtime.errors import RuntimeStageError
from runtime.memory import inspect_onnx

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
INSTALL_HINT = ("TensorRT is not installed (pip install '.[trt]' on a machine with NVIDIA's index) "
                "— `make engine` needs TensorRT and a CUDA GPU")


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
    import onnx  # lazy: runtime's device side imports this module without onnx (tests/runtime/test_cli.py)
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
    by_dtype = inspect_onnx(onnx_path).weight_bytes
    return {"total": sum(by_dtype.values()), **by_dtype}


def onnx_precision(onnx_path: Path) -> str:
    """"int8" for a quantized (Q/DQ) graph, "fp16" for mostly-float16 weights, else "fp32"."""
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
