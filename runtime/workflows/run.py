"""One budget through compress -> export -> eval -> bench, into a run directory of the layout
in runtime.workflows.layout (``make all OUT=D`` makes the same; ``python -m runtime report
--run-dir D`` reads it):

    D/compressed/  compress.run                D/onnx/      export.export_compressed
    D/eval.json    runtime.evaluate             D/bench/     runtime.benchmark + runtime.report

Used by runtime.workflows.sweep (many ratios) and runtime.workflows.fit (a search over the
ratio). Every stage is the stage's own public function; nothing here re-implements one.
"""
from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from pathlib import Path

import compress
from calibration_data import make_loader
from export import export_compressed
from runtime.backends import open_backend
from runtime.benchmark import run_benchmark
from cliutil import write_json
from runtime.evaluate import backend_variant, evaluate, result_document, torch_variant
from runtime.report import write_outputs
from runtime.workflows.layout import BENCH, COMPRESSED, EVAL, ONNX

log = logging.getLogger(__name__)


def compress_stage(base, ratio: float, run_dir, reuse=None) -> compress.RunResult:
    """Compress with ``base`` (a compress.Config) at ``ratio`` into run_dir/compressed; ``reuse``
    (an earlier result's ``prepared``) serves its statistics and factorisation when they fit."""
    cfg = dataclasses.replace(base, ratio=ratio, params=None, size_mb=None, plan=None,
                              out=str(Path(run_dir) / COMPRESSED))
    t = time.perf_counter()
    result = compress.run(cfg, reuse=reuse)
    log.info("ratio %.4g: compressed in %.1f s (statistics %s)", ratio, time.perf_counter() - t,
             "reused or from the cache" if result.manifest["calibration"]["stats_from_cache"] else "computed")
    return result


def export_stage(run_dir, options) -> dict:
    """ONNX files of run_dir/compressed into run_dir/onnx (export.ExportOptions)."""
    return export_compressed(Path(run_dir) / COMPRESSED, Path(run_dir) / ONNX, options)


def eval_stage(run_dir, images, onnx_files=("model.int8.onnx",), backend: str = "ort",
               backend_options: dict | None = None, fake_quant: bool = False, batch_size: int = 100,
               seed: int = 0) -> dict:
    """Accuracy of dense (reference), compressed and the named ONNX files of run_dir; writes eval.json."""
    run_dir = Path(run_dir)
    model, manifest = compress.load_compressed(run_dir / COMPRESSED)
    dense = compress.load_dense(manifest)
    variants = {"dense": torch_variant(dense), "compressed": torch_variant(model)}
    if fake_quant and (manifest.get("quant") or {}).get("act_ranges"):
        fq, _ = compress.load_compressed(run_dir / COMPRESSED)
        compress.apply_fake_quant_(fq, manifest["quant"]["act_ranges"])
        variants["compressed-int8-fakequant"] = torch_variant(fq)
    backends = []
    try:
        for name in onnx_files:
            b = open_backend(backend, run_dir / ONNX / name, **(backend_options or {}))
            backends.append(b)
            variants[f"{backend}:{name}"] = backend_variant(b)
        loader = make_loader(images, dense, batch_size=batch_size)
        scores = evaluate(variants, loader, reference="dense", progress=False, features=not compress.has_head(dense))
    finally:
        for b in backends:
            b.close()
    name = manifest["model"]["name"]
    doc = result_document(name, images, seed, {"compressed": str(run_dir / COMPRESSED),
                                               "manifest_params": manifest.get("params"),
                                               "data_config_model": name}, scores)
    write_json(run_dir / EVAL, doc)
    return doc


def bench_stage(run_dir, config) -> dict:
    """runtime.benchmark on run_dir/onnx (a BenchConfig); writes run_dir/bench/bench.{json,md,png}."""
    result = run_benchmark(Path(run_dir) / ONNX, config)
    write_outputs(result, Path(run_dir) / BENCH)
    return result


# ----------------------------------------------------------------------------- latency
def p50(bench: dict, variant: str, batch_size: int) -> float | None:
    lat = (bench["variants"].get(variant) or {}).get("latency", {}).get(str(batch_size))
    return None if lat is None else lat["p50_ms"]


def normalised_latency(benches: list[dict], variant: str, batch_size: int,
                       reference: str = "dense-fp32") -> list[float | None]:
    """p50 of ``variant`` in each run, rescaled to one common clock: (variant p50 / reference p50
    in the same interleaved run) x (median of the reference's p50 over all runs).

    Latency on a shared machine drifts between runs; within one run the interleaved schedule
    exposes both models to the same load, so their ratio is stable, and the median of the
    reference over every run is the steadiest absolute scale available.
    """
    refs = [p50(b, reference, batch_size) for b in benches]
    scale = statistics.median([r for r in refs if r]) if any(refs) else None
    out = []
    for b, ref in zip(benches, refs):
        v = p50(b, variant, batch_size)
        out.append(None if v is None or not ref or scale is None else v / ref * scale)
    return out
