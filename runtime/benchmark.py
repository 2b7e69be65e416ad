"""Latency and memory of the dense and low-rank variants of one export, side by side.

Timing: every variant is opened once in this process; after warm-up the timed runs are
interleaved round-robin (one run of each variant per repeat, the starting variant rotating),
so background load and thermal drift hit all variants alike and the ratios stay honest on
a busy machine. Each run is timed by the backend's ``time_runs`` (perf_counter around a
call that returns host arrays; GPU backends may use CUDA events).

Memory: each variant is opened and run again in its own fresh process
(``runtime.memory.measure_in_subprocess``) for a clean peak-RSS figure, plus the file and
weight bytes the backend reports and GPU memory where NVML sees it.
"""
from __future__ import annotations

import datetime
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from export import FILES, ExportFile
from runtime.backends import open_backend
from runtime.errors import RuntimeStageError
from runtime.machine import machine_info
from runtime.memory import inspect_onnx, measure_in_subprocess

log = logging.getLogger(__name__)

SCHEMA = 1
GPU_KINDS = frozenset({"ort-cuda", "trt"})
REFERENCES = ("dense-fp32", "dense-int8")


# The export files benchmarked (export.files), in its table order.
BENCH_FILES = FILES


@dataclass(frozen=True)
class BenchConfig:
    """What to measure and how; saved into bench.json beside the results."""

    backend: str = "ort"
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    warmup: int = 5
    repeats: int = 30
    options: dict = field(default_factory=dict)   # passed to open_backend
    include_fp16: bool | None = None              # None: only on GPU backends
    variants: tuple[str, ...] | None = None       # subset of BENCH_FILES names; None: all found
    memory: bool = True                           # fresh-process RSS per variant
    seed: int = 0
    engine_dir: str | None = None                 # TensorRT: prebuilt <stem>.engine files instead of .onnx

    def __post_init__(self):
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise RuntimeStageError(f"batch sizes must be positive integers, got {self.batch_sizes}")
        if self.warmup < 0 or self.repeats < 1:
            raise RuntimeStageError(f"need warmup >= 0 and repeats >= 1, got {self.warmup} and {self.repeats}")
        known = {v.name for v in BENCH_FILES}
        unknown = set(self.variants or ()) - known
        if unknown:
            raise RuntimeStageError(f"unknown variants {sorted(unknown)}; choose from {', '.join(sorted(known))}")

    @property
    def fp16(self) -> bool:
        return self.backend in GPU_KINDS if self.include_fp16 is None else self.include_fp16


def model_file(v: ExportFile, engine: bool) -> str:
    """The variant's file: its ONNX name, or for an engine directory 'dense.fp16.onnx' -> 'dense.fp16.engine'."""
    return v.engine if engine else v.filename


def find_variants(onnx_dir, config: BenchConfig) -> list[tuple[ExportFile, Path]]:
    """The variants present in ``onnx_dir`` (or ``config.engine_dir``) that this configuration
    measures, in table order."""
    model_dir = Path(config.engine_dir if config.engine_dir is not None else onnx_dir)
    if not model_dir.is_dir():
        raise RuntimeStageError(f"no such {'engine' if config.engine_dir else 'export'} directory: {model_dir}")
    engine = config.engine_dir is not None
    found = []
    for v in BENCH_FILES:
        if config.variants is not None and v.name not in config.variants:
            continue
        if config.variants is None and ((v.precision == "fp16" and not config.fp16)
                                        or (v.backends is not None and config.backend not in v.backends)):
            continue
        path = model_dir / model_file(v, engine)
        if path.is_file():
            found.append((v, path))
        elif config.variants is not None:
            raise RuntimeStageError(f"variant {v.name} asked for but {path} is missing")
    if not found:
        names = ", ".join(model_file(v, engine) for v in BENCH_FILES)
        hint = "python -m runtime engine" if engine else "python -m export"
        raise RuntimeStageError(f"{model_dir} holds none of {names}; run `{hint}` first")
    return found


def left_out(onnx_dir, config: BenchConfig) -> dict[str, str]:
    """Variants present in the directory that this configuration does not measure by default, and why."""
    if config.variants is not None:
        return {}
    engine = config.engine_dir is not None
    model_dir = Path(config.engine_dir if engine else onnx_dir)
    out = {}
    for v in BENCH_FILES:
        if not (model_dir / model_file(v, engine)).is_file():
            continue
        if v.precision == "fp16" and not config.fp16:
            out[v.name] = "FP16 files are timed on GPU backends by default (--fp16 to include them)"
        elif v.backends is not None and config.backend not in v.backends:
            out[v.name] = (f"the TensorRT file, timed on {', '.join(sorted(v.backends))} by default: ONNX Runtime's "
                           "CPU provider runs its float16 Q/DQ graph as float ops, several times slower than "
                           "*.int8.onnx (--variants to time it anyway)")
    return out


def interleaved_schedule(names: list[str], repeats: int) -> Iterator[tuple[int, str]]:
    """(repeat, name): each name once per repeat, the starting name rotating every repeat."""
    n = len(names)
    for r in range(repeats):
        for i in range(n):
            yield r, names[(r + i) % n]


def interleaved_medians(backends: dict, x: np.ndarray, warmup: int, repeats: int, burst: int = 1) -> dict:
    """Median milliseconds per backend on ``x``: each warmed up, then timed in one interleaved run
    (interleaved_schedule); each sample is the fastest of ``burst`` back-to-back runs (burst > 1
    resists a shared CPU)."""
    for b in backends.values():
        b.time_runs(x, warmup)
    times = {k: [] for k in backends}
    for _, k in interleaved_schedule(list(backends), repeats):
        times[k].append(min(backends[k].time_runs(x, burst)))
    return {k: float(np.median(t)) * 1e3 for k, t in times.items()}


def latency_stats(seconds: list[float], batch_size: int) -> dict:
    """Percentiles in milliseconds (linear interpolation) and throughput in images/s (from the mean)."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    mean = float(ms.mean())
    return {"runs": int(ms.size), "p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
            "mean_ms": mean, "std_ms": float(ms.std()), "min_ms": float(ms.min()), "max_ms": float(ms.max()),
            "throughput_ips": batch_size * 1e3 / mean}


def _ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def compute_ratios(variants: dict) -> dict:
    """ratios[ref][variant]: file/weight/RSS bytes and p50/throughput per batch, over reference ``ref``."""
    out = {}
    for ref in REFERENCES:
        if ref not in variants:
            continue
        base = variants[ref]
        table = {}
        for name, v in variants.items():
            row = {key: _ratio(v["memory"].get(key), base["memory"].get(key))
                   for key in ("file_bytes", "weight_bytes")}
            row["peak_rss_delta_bytes"] = _ratio((v.get("process") or {}).get("peak_rss_delta_bytes"),
                                                 (base.get("process") or {}).get("peak_rss_delta_bytes"))
            row["p50"] = {bs: _ratio(lat["p50_ms"], base["latency"].get(bs, {}).get("p50_ms"))
                          for bs, lat in v["latency"].items()}
            table[name] = row
        out[ref] = table
    return out


def check_export_report(onnx_dir) -> dict | None:
    """Check export_report.json (written by ``python -m export``) against the files themselves.

    For each file the report lists (``report["files"][name]["bytes"]`` and
    ``["initializer_bytes"]`` by dtype) and the directory holds: {"report_bytes", "file_bytes",
    "report_initializer_bytes", "initializer_bytes", "match"}. None without a report.
    """
    onnx_dir = Path(onnx_dir)
    path = onnx_dir / "export_report.json"
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text())["files"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        log.warning("cannot read the file sizes in %s: %s", path, exc)
        return None
    result = {}
    for name, entry in files.items():
        if not (onnx_dir / name).is_file() or not isinstance(entry, dict):
            continue
        stats = inspect_onnx(onnx_dir / name)
        row = {"report_bytes": entry.get("bytes"), "file_bytes": stats.file_bytes,
               "report_initializer_bytes": entry.get("initializer_bytes"),
               "initializer_bytes": stats.initializer_bytes}
        row["match"] = row["report_bytes"] == stats.file_bytes and (
            row["report_initializer_bytes"] is None or row["report_initializer_bytes"] == stats.initializer_bytes)
        if not row["match"]:
            log.warning("%s: export_report.json disagrees with the file (%s)", name, row)
        result[name] = row
    return result


def _batch_input(shape: tuple, batch_size: int, rng: np.random.Generator) -> np.ndarray | None:
    if any(d in (-1, None) for d in shape[1:]):
        raise RuntimeStageError(f"input shape {shape} has dynamic non-batch axes; export with a fixed image size")
    if shape[0] not in (-1, None, batch_size):
        return None  # a fixed-batch model (or engine profile) that cannot take this batch size
    return rng.standard_normal((batch_size, *shape[1:]), dtype=np.float32)


def run_benchmark(onnx_dir, config: BenchConfig, machine: dict | None = None) -> dict:
    """Measure every variant of ``onnx_dir``; returns the bench.json document."""
    onnx_dir = Path(onnx_dir)
    found = find_variants(onnx_dir, config)
    machine = machine if machine is not None else machine_info()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    results: dict[str, dict] = {}
    backends = {}
    try:
        for v, path in found:
            backend = open_backend(config.backend, path, **config.options)
            backends[v.name] = backend
            results[v.name] = {"file": path.name, "family": v.family, "precision": backend.precision,
                               "backend": backend.describe(), "memory": backend.memory(),
                               "input_shape": list(backend.input_shape()), "latency": {}, "skipped": []}
        names = list(backends)
        rng = np.random.default_rng(config.seed)
        for bs in config.batch_sizes:
            inputs = {n: _batch_input(b.input_shape(), bs, rng) for n, b in backends.items()}
            active = [n for n in names if inputs[n] is not None]
            for n in names:
                if inputs[n] is None:
                    results[n]["skipped"].append(bs)
            for n in active:
                backends[n].time_runs(inputs[n], config.warmup)
            times: dict[str, list[float]] = {n: [] for n in active}
            for _, n in tqdm(list(interleaved_schedule(active, config.repeats)), desc=f"batch {bs}",
                             unit="run", leave=False, disable=None):
                times[n].extend(backends[n].time_runs(inputs[n], 1))
            for n in active:
                results[n]["latency"][str(bs)] = latency_stats(times[n], bs)
                results[n]["latency"][str(bs)]["samples_ms"] = [t * 1e3 for t in times[n]]
    finally:
        for b in backends.values():
            b.close()
    if config.memory:
        for v, path in found:
            log.info("memory probe: %s", v.name)
            results[v.name]["process"] = measure_in_subprocess(config.backend, path, config.options,
                                                               config.batch_sizes)
    finished = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    cfg = asdict(config)
    cfg["batch_sizes"] = list(config.batch_sizes)
    cfg["include_fp16"] = config.fp16
    return {"schema": SCHEMA, "started": started, "finished": finished, "onnx_dir": str(onnx_dir),
            "config": cfg, "machine": machine, "variants": results, "ratios": compute_ratios(results),
            "left_out": left_out(onnx_dir, config),
            "export_report": check_export_report(onnx_dir), "predicted": predicted_vs_measured(onnx_dir, results)}


def predicted_vs_measured(onnx_dir, results: dict) -> dict | None:
    """The compress plan's predicted latency (manifest "latency", from a latency table) beside the p50
    measured here, for the dense and low-rank variant of the table's precision; None without one."""
    try:
        report = json.loads((Path(onnx_dir) / "export_report.json").read_text())
        manifest = json.loads((Path(report["source"]["compressed"]) / "manifest.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    lat = manifest.get("latency")
    if not lat:
        return None
    rows = {}
    for family, key in (("lowrank", "predicted_ms"), ("dense", "dense_predicted_ms")):
        name = f"{family}-{lat['precision']}"
        for bs, ms in lat[key].items():
            measured = results.get(name, {}).get("latency", {}).get(bs, {}).get("p50_ms")
            rows.setdefault(name, {})[bs] = {"predicted_ms": ms, "measured_p50_ms": measured}
    return {"table": {k: lat[k] for k in ("model", "backend", "threads", "machine")},
            "target_ms": lat.get("target_ms"), "batch": lat["batch"], "variants": rows}
