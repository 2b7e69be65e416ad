"""How many bytes a model costs: in its ONNX file, in its weights, and in a live process.

- ``inspect_onnx``: file bytes (the .onnx plus its external-data files), weight bytes by
  dtype (initializers and Constant tensors, counted from their shapes), precision.
- ``current_rss`` / ``peak_rss``: this process, from /proc/self/status (Linux; on other
  systems peak comes from getrusage and current is unknown).
- ``measure_in_subprocess``: open one model in a fresh Python process, run it, and report
  its peak RSS and the increase over the process's footprint before the model was opened.
  A fresh process per model is the only clean figure: in one process the allocator keeps
  freed pages, libraries load once, and the first model pays for everyone. On Jetson the
  GPU shares this RAM, so process RSS is the real footprint there.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from export import graph_tensors, initializer_bytes, tensor_bytes
from runtime import nvml, tegrastats
from runtime.backends import base
from runtime.errors import RuntimeStageError

log = logging.getLogger(__name__)

QUANT_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearMatMul",
                       "QLinearConv", "MatMulInteger", "ConvInteger", "MatMulNBits"})


@dataclass(frozen=True)
class OnnxStats:
    """Static facts about one ONNX file."""

    path: Path
    file_bytes: int                     # the .onnx plus every external-data file it references
    weight_bytes: dict[str, int]        # dtype name -> bytes of initializers + Constant tensors
    weight_count: int                   # number of weight elements
    precision: str                      # "int8" (has quantization ops), "fp16" or "fp32"
    op_counts: dict[str, int] = field(default_factory=dict)
    initializer_bytes: dict[str, int] = field(default_factory=dict)  # graph initializers only, by dtype

    @property
    def total_weight_bytes(self) -> int:
        return sum(self.weight_bytes.values())

    def as_memory(self) -> dict[str, int]:
        """The flat dict ``Backend.memory`` reports."""
        out = {"file_bytes": self.file_bytes, "weight_bytes": self.total_weight_bytes}
        out.update({f"weight_bytes.{dtype}": n for dtype, n in sorted(self.weight_bytes.items())})
        return out


def _external_files(model_dir: Path, tensors) -> set[Path]:
    files = set()
    for t in tensors:
        for entry in t.external_data:
            if entry.key == "location":
                files.add((model_dir / entry.value).resolve())
    return files


def inspect_onnx(path) -> OnnxStats:
    """File bytes, weight bytes by dtype and precision of an ONNX file (weights not loaded)."""
    import onnx  # lazy: runtime's device side imports this module without onnx (tests/runtime/test_cli.py)

    path = Path(path)
    if not path.is_file():
        raise RuntimeStageError(f"no such ONNX file: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends: a user error, not a crash
        raise RuntimeStageError(f"{path} is not a readable ONNX file ({type(exc).__name__})") from None
    tensors = list(graph_tensors(model.graph))
    weight_bytes: dict[str, int] = {}
    count = 0
    for t in tensors:
        dtype, nbytes, n = tensor_bytes(t)
        weight_bytes[dtype] = weight_bytes.get(dtype, 0) + nbytes
        count += n
    external = _external_files(path.parent, tensors)
    missing = [p for p in external if not p.is_file()]
    if missing:
        raise RuntimeStageError(f"{path} references missing external data {missing[0]}")
    file_bytes = path.stat().st_size + sum(p.stat().st_size for p in external)
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    if QUANT_OPS & ops.keys():
        precision = "int8"
    elif weight_bytes.get("float16", 0) > weight_bytes.get("float32", 0):
        precision = "fp16"
    else:
        precision = "fp32"
    return OnnxStats(path, file_bytes, weight_bytes, count, precision, ops, initializer_bytes(model))


# ---- process memory ---------------------------------------------------------------------

def _proc_status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB
    except OSError:
        return None
    return None


def current_rss() -> int | None:
    """Resident set size of this process in bytes (None where /proc is missing)."""
    return _proc_status_bytes("VmRSS")


def peak_rss() -> int | None:
    """Peak resident set size of this process in bytes."""
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    try:
        import resource  # Unix only
    except ImportError:
        return None
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru if sys.platform == "darwin" else ru * 1024


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def tegrastats_sampler():
    """A started runtime.tegrastats sampler holding at least one sample, or None off Jetson."""
    if not tegrastats.available():
        return None
    sampler = tegrastats.TegrastatsSampler(interval_ms=100).start()
    deadline = time.monotonic() + 3.0
    while not sampler.samples and time.monotonic() < deadline:
        time.sleep(0.05)
    return sampler


def gpu_process_memory(pid: int) -> int | None:
    """GPU memory used by process ``pid`` per NVML, or None without NVML or GPU."""
    try:
        return nvml.process_gpu_memory(pid)
    except Exception as exc:  # NVML is a best-effort extra: a failure must not lose the benchmark
        log.warning("NVML query failed: %s", exc)
        return None


# ---- one model in a fresh process -------------------------------------------------------

def probe(kind: str, path: str, options: dict, batch_sizes: list[int], runs: int = 2) -> dict:
    """Open, run and measure one model in *this* process (the child of measure_in_subprocess)."""
    base.backend_class(kind).unavailable_reason(kind)  # imports the runtime library before the baseline
    sampler = tegrastats_sampler()  # Jetson: system RAM (shared with the GPU) sampled throughout
    baseline = current_rss()
    hwm_reset = reset_peak_rss()
    result: dict = {"baseline_rss_bytes": baseline, "hwm_reset": hwm_reset, "batch_sizes": []}
    try:
        _probe_model(base, kind, path, options, batch_sizes, runs, result)
    finally:
        if sampler is not None:
            sampler.stop()
    if sampler is not None and (summary := sampler.summary()) is not None:
        result["tegrastats"] = summary
        # RAM used at the peak minus before the model was opened (tegrastats' "MB" are MiB).
        result["tegrastats_ram_delta_bytes"] = (summary["ram_peak_mb"] - summary["ram_first_mb"]) * 2**20
    if baseline is not None and result["peak_rss_bytes"] is not None:
        result["peak_rss_delta_bytes"] = result["peak_rss_bytes"] - baseline
    return result


def _probe_model(base, kind, path, options, batch_sizes, runs, result) -> None:
    with base.open_backend(kind, path, **options) as backend:
        result["after_load_rss_bytes"] = current_rss()
        shape = backend.input_shape()
        rng = np.random.default_rng(0)
        for bs in batch_sizes:
            if shape[0] not in (-1, None, bs):
                continue
            x = rng.standard_normal((bs, *shape[1:]), dtype=np.float32)
            for _ in range(runs):
                backend.run(x)
            result["batch_sizes"].append(bs)
        result["peak_rss_bytes"] = peak_rss()
        result["after_run_rss_bytes"] = current_rss()
        result["gpu_bytes"] = gpu_process_memory(os.getpid())


def measure_in_subprocess(kind: str, path, options: dict | None = None, batch_sizes=(1,),
                          runs: int = 2, timeout: float = 1800) -> dict:
    """Peak RSS (and GPU memory where NVML sees it) of one model opened in a fresh process.

    Keys: baseline_rss_bytes (after importing the backend library, before opening the model),
    after_load_rss_bytes, peak_rss_bytes, peak_rss_delta_bytes (= peak - baseline: what the
    model itself costs), after_run_rss_bytes, gpu_bytes (None where unknown), hwm_reset; on a
    Jetson also tegrastats (runtime.tegrastats.summarize) and tegrastats_ram_delta_bytes.
    """
    request = json.dumps({"kind": kind, "path": str(path), "options": options or {},
                          "batch_sizes": list(batch_sizes), "runs": runs})
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run([sys.executable, "-m", "runtime.memory", request], capture_output=True,
                              text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise RuntimeStageError(f"memory probe of {path} timed out after {timeout:.0f} s") from None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeStageError(f"memory probe of {path} failed (exit {proc.returncode}): {last}")
    return json.loads(lines[-1])


def _main(argv: list[str]) -> int:
    request = json.loads(argv[0])
    try:
        result = probe(**request)
    except RuntimeStageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
