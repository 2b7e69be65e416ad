"""`python -m runtime engine`: build TensorRT engines for the dense and the low-rank model.

    python -m runtime engine --onnx-dir runs/x/onnx --precision fp16 --out runs/x/engines

Takes the dense and the low-rank file of one precision from the export stage (fp16: the
FP16 files; int8: the QDQ ``*.int8-fp16.onnx``, INT8 GEMMs with FP16 everywhere else, not the
float32-elsewhere ``*.int8.onnx`` ONNX Runtime's CPU kernels take; fp32: ``dense.onnx``/
``model.onnx``), builds one engine each, and writes
``<out>/dense.<p>.engine``, ``<out>/model.<p>.engine`` and ``<out>/engine_report.json``
(each atomically; the names ``runtime bench --engine-dir`` looks up). The timing cache
defaults to ``<out>/timing.cache`` so a rebuild on the same GPU and TensorRT is fast.

Each engine gets one optimization profile per ``--opt-batch`` (default 1,8,32, the benchmark's
batches), each spanning ``--min-batch``..``--max-batch``: TensorRT picks kernels for a
profile's opt shape, and the backend runs every batch on the profile tuned for it, so the
batch-1 latency is batch-1 kernels'. The report lists the profiles.

Where TensorRT or a CUDA GPU is missing it prints one line and exits 3; it never writes a
number it did not measure. Bad input (no such ONNX, bad batch range) exits 2.

Memory figures in engine_report.json, per engine:
  engine_bytes          size of the serialized engine file: what ships to the device and is
                        read at load (weights in the engine's own precisions + kernels + metadata).
  weight_bytes          the engine's own count of its weights (EngineStat.TOTAL_WEIGHTS_SIZE),
                        resident in device memory once loaded; null where TensorRT cannot say.
  onnx_weight_bytes     bytes of the source ONNX's initializers and Constant tensors, by dtype
                        ("total" and e.g. "int8", "float32"): the weights as exported, not as
                        TensorRT stores them (the fallback when weight_bytes is null).
  device_memory_bytes   device memory each execution context allocates for activations and
                        scratch at the profile's largest shapes (device_memory_size_v2; per
                        context, on top of the weights).
  activation_bytes_by_batch  the same, needed at batch min/opt/max (a context sized for that
                        shape); null where TensorRT cannot say.
On a Jetson all of these live in the shared system DRAM (unified memory).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from cliutil import write_json
from export import STEMS
from export import engine_name as export_engine_name
from export import onnx_name as export_onnx_name
from runtime.backends.trt_build import (DEFAULT_OPT_BATCHES, TensorRTUnavailable, build_engine, require_cuda,
                                       require_tensorrt)
from runtime.errors import RuntimeStageError
from runtime.machine import machine_info

log = logging.getLogger(__name__)

EXIT_NO_TENSORRT = 3
# The export file TensorRT builds for each engine precision (int8: the QDQ graph with FP16 elsewhere).
SOURCE_PRECISION = {"fp32": "fp32", "fp16": "fp16", "int8": "int8-fp16"}


def onnx_name(stem: str, precision: str) -> str:
    return export_onnx_name(stem, SOURCE_PRECISION[precision])


def engine_name(stem: str, precision: str) -> str:
    """``dense.int8.engine`` ...: what ``runtime bench --engine-dir`` looks up for the variant."""
    return export_engine_name(stem, precision)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(sorted({int(t) for t in text.split(",") if t.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--onnx-dir", type=Path, required=True, help="export stage output (dense.*.onnx, model.*.onnx)")
    p.add_argument("--precision", choices=("fp16", "int8", "fp32"), default="fp16",
                   help="fp16: *.fp16.onnx; int8: the QDQ *.int8-fp16.onnx (INT8 GEMMs, FP16 elsewhere); "
                        "fp32: the plain files (default fp16)")
    p.add_argument("--out", type=Path, required=True, help="directory for the engines and engine_report.json")
    p.add_argument("--min-batch", type=int, default=1)
    p.add_argument("--opt-batch", "--opt-batches", dest="opt_batches", type=_int_list, default=DEFAULT_OPT_BATCHES,
                   help="comma-separated: one optimization profile tuned for each (default 1,8,32)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--workspace-mb", type=int, default=1024, help="builder workspace limit (MiB)")
    p.add_argument("--timing-cache", type=Path, default=None, help="timing cache file (default <out>/timing.cache)")
    p.add_argument("--verbose", action="store_true", help="log TensorRT's builder messages")


def _inputs(args) -> dict[str, Path]:
    if not args.onnx_dir.is_dir():
        raise RuntimeStageError(f"no ONNX directory {args.onnx_dir} (run `make export` first)")
    paths = {v: args.onnx_dir / onnx_name(v, args.precision) for v in STEMS}
    missing = [f.name for f in paths.values() if not f.is_file()]
    if missing and args.precision == "int8" and all((args.onnx_dir / export_onnx_name(v, "int8")).is_file()
                                                    for v in STEMS):
        raise RuntimeStageError(f"{args.onnx_dir} has no {', '.join(missing)}, the TensorRT INT8 files (FP16 "
                                f"outside the INT8 GEMMs); its *.int8.onnx keep FP32 there: re-run export "
                                f"with int8 and fp16 on")
    if missing:
        raise RuntimeStageError(f"{args.onnx_dir} has no {', '.join(missing)} (run `make export` first)")
    if not 1 <= args.min_batch <= min(args.opt_batches) <= max(args.opt_batches) <= args.max_batch:
        raise RuntimeStageError(f"need 1 <= --min-batch <= every --opt-batch <= --max-batch, got "
                                f"{args.min_batch}/{','.join(map(str, args.opt_batches))}/{args.max_batch}")
    if args.workspace_mb <= 0:
        raise RuntimeStageError(f"--workspace-mb must be positive, got {args.workspace_mb}")
    return paths


def machine(trt, cuda) -> dict:
    """The machine (runtime.machine) plus the CUDA device and TensorRT the engines were built with."""
    return {**machine_info(), "tensorrt": trt.__version__, "cuda_runtime": cuda.runtime_version(),
            "cuda_device": cuda.device_properties(0)}


def _ratio(a, b):
    return round(a / b, 4) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def build_all(args, files: dict[str, Path]) -> dict:
    """Build one engine per variant; return the report (nothing in it is estimated)."""
    trt = require_tensorrt()
    cuda = require_cuda()
    cache = args.timing_cache or args.out / "timing.cache"
    engines = {}
    for variant, onnx_path in files.items():
        engine_path = args.out / engine_name(variant, args.precision)
        log.info("building %s -> %s", onnx_path, engine_path)
        engines[variant] = build_engine(onnx_path, engine_path, precision=args.precision,
                                        min_batch=args.min_batch, opt_batches=args.opt_batches,
                                        max_batch=args.max_batch, workspace_mb=args.workspace_mb,
                                        timing_cache_path=cache, verbose=args.verbose)
    dense, model = engines["dense"], engines["model"]
    report = {
        "precision": args.precision,
        "profiles": {"min_batch": args.min_batch, "opt_batches": list(args.opt_batches),
                     "max_batch": args.max_batch,
                     "note": "one optimization profile per opt batch, each over min..max; a batch runs on the "
                             "profile tuned for it"},
        "workspace_mb": args.workspace_mb,
        "machine": machine(trt, cuda),
        "engines": engines,
        "ratios_model_over_dense": {
            key: _ratio(model.get(key), dense.get(key))
            for key in ("engine_bytes", "weight_bytes", "device_memory_bytes")},
    }
    write_json(args.out / "engine_report.json", report)
    return report


def format_table(report: dict) -> str:
    def mb(v):
        return f"{v / 2**20:.2f}" if isinstance(v, (int, float)) else "n/a"
    rows = [f"{'engine':<22} {'engine MiB':>10} {'weights MiB':>11} {'device MiB':>10} {'build s':>8}"]
    for e in report["engines"].values():
        rows.append(f"{Path(e['engine']).name:<22} {mb(e['engine_bytes']):>10} {mb(e.get('weight_bytes')):>11} "
                    f"{mb(e['device_memory_bytes']):>10} {e['build_seconds']:>8.1f}")
    r = report["ratios_model_over_dense"]
    rows.append("low-rank / dense: " + ", ".join(f"{k} {v}x" for k, v in r.items() if v is not None))
    return "\n".join(rows)


def main(args: argparse.Namespace) -> int:
    try:
        files = _inputs(args)
        report = build_all(args, files)
    except TensorRTUnavailable as e:
        print(f"runtime engine: {e}", file=sys.stderr)
        return EXIT_NO_TENSORRT
    except RuntimeStageError as e:
        print(f"runtime engine: {e}", file=sys.stderr)
        return 2
    print(format_table(report))
    print(f"wrote {args.out / 'engine_report.json'}")
    return 0
