"""Measure a per-layer latency table (compress.latency.LatencyTable) on the target backend.

    python -m runtime latency-table --model deit_small_patch16_224 --backend ort --batch-sizes 1,8

For every distinct compressible layer shape of the model (out m, in n, rows per image T) it
builds one-layer ONNX graphs exactly as the export stage lays a layer out (export.linears'
canonical MatMul + bias Add; for INT8 export.qdq.insert_qdq's per-tensor input Q/DQ, int8
per-channel weights with DequantizeLinear and, in a pair, the mid Q/DQ): the dense layer and
the pair at widths step, 2 step, ... up to the parameter break-even. Each (shape, precision,
batch) group is opened at once and timed interleaved round-robin (runtime.benchmark's
schedule) so load on a shared machine hits all alike; the table keeps medians (of burst minima, BURST). The whole
dense model is timed too (FP32 and INT8 with the same layout), and its time outside the
Linears is recorded as ``rest_ms``, so compress can predict a plan's latency.

Without --out the table goes to the user cache (compress.latency.default_table_path), where
`python -m compress --latency-table auto` / `--target-latency-ms` find it; an existing cached
table is reused unless --force.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
import timm.data
import torch
from onnx import TensorProto, helper, numpy_helper
from tqdm import tqdm

from compress import (add_model_options, add_weights_arguments, compressible_layers, latency, load_model,
                      model_options)
from export import QuantizedLinear, canonicalize_linears, export_onnx, insert_qdq, linear_weights, quantized_linears
from runtime.backends import available_backends, open_backend, thread_options
from runtime.benchmark import interleaved_medians
from runtime.errors import RuntimeStageError

log = logging.getLogger(__name__)

LAYER = "layer"   # node name of the one layer in a micro graph (export.linears' canonical form)
# Each timed sample is the fastest of BURST back-to-back runs, and the table keeps the median of the
# samples: on a CPU shared with other jobs, a descheduled thread adds milliseconds to one run of a
# sub-millisecond layer, which the burst minimum removes while the median still reflects steady state.
BURST = 3


def layer_shapes(model, include_head: bool = False) -> dict[str, tuple[int, int, int]]:
    """Compressible Linear name -> (out, in, rows per image), from one batch-1 forward pass."""
    layers = compressible_layers(model, include_head)
    rows: dict[str, int] = {}

    def hook(name):
        def record(mod, inp, out):
            rows.setdefault(name, int(np.prod(inp[0].shape[:-1])))
        return record

    hooks = [lin.register_forward_hook(hook(name)) for name, lin in layers.items()]
    size = timm.data.resolve_data_config({}, model=model)["input_size"]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *size))
    finally:
        for h in hooks:
            h.remove()
    return {n: (lin.out_features, lin.in_features, rows[n]) for n, lin in layers.items() if n in rows}


def _int8_weight(rng, out: int, inp: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(float weight [out, in] that quantizes exactly, int8 [out, in], scale [out])."""
    q = rng.integers(-127, 128, size=(out, inp), dtype=np.int8)
    s = (rng.uniform(0.5, 1.5, size=out) / (127 * np.sqrt(inp))).astype(np.float32)
    return (q.astype(np.float32) * s[:, None]).astype(np.float32), q, s


def layer_graph(m: int, n: int, rows: int, width: int | None, precision: str, seed: int = 0):
    """One layer as the exporter writes it: input "input" [batch, rows, n] -> output "logits".
    ``width`` None: the dense MatMul; else the pair n -> width -> m."""
    rng = np.random.default_rng(seed)
    shapes = [(n, m)] if width is None else [(n, width), (width, m)]
    names = [LAYER] if width is None else [f"{LAYER}.first", f"{LAYER}.second"]
    nodes, inits, weights, x = [], [], {}, "input"
    for name, (i, o) in zip(names, shapes):
        w, q, s = _int8_weight(rng, o, i)
        weights[name] = (q, s)
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"{name}.weight"))
        nodes.append(helper.make_node("MatMul", [x, f"{name}.weight"], [f"{name}.out"], name=name))
        x = f"{name}.out"
    inits.append(numpy_helper.from_array(rng.standard_normal(m).astype(np.float32) * 0.01, f"{LAYER}.bias"))
    nodes.append(helper.make_node("Add", [x, f"{LAYER}.bias"], ["logits"], name=f"{LAYER}.bias_add"))
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", rows, n])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", rows, m])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    if precision == "int8":
        proto = insert_qdq(proto, [QuantizedLinear(LAYER, 4.0, None if width is None else 4.0, weights)])
    onnx.checker.check_model(proto)
    return proto


def table_widths(m: int, n: int, step: int) -> list[int]:
    """step, 2 step, ... up to the first multiple of step at or past the parameter break-even."""
    be = min(m, n, (m * n - 1) // (m + n))
    top = min(min(m, n), -(-be // step) * step)
    return list(range(step, top + 1, step))


def _time_group(paths: dict, backend_kind: str, options: dict, batch: int, rows: int, n: int,
                warmup: int, repeats: int, seed: int) -> dict:
    """Median ms of each file (key -> path), all opened at once and timed interleaved."""
    x = np.random.default_rng(seed).standard_normal((batch, rows, n), dtype=np.float32)
    backends = {}
    try:
        for key, path in paths.items():
            backends[key] = open_backend(backend_kind, path, **options)
        return interleaved_medians(backends, x, warmup, repeats, BURST)
    finally:
        for b in backends.values():
            b.close()


def measure_layers(shapes: set[tuple[int, int, int]], backend: str, options: dict, batches, precisions,
                   step: int, warmup: int, repeats: int, seed: int = 0, progress=None) -> list:
    """latency.LayerTiming entries for every shape x precision x batch (see the module docstring)."""
    out = []
    with tempfile.TemporaryDirectory(prefix="latency-table-") as tmp:
        for m, n, rows in sorted(shapes):
            widths = table_widths(m, n, step)
            for precision in precisions:
                paths = {}
                for k in [None] + widths:
                    p = Path(tmp) / f"{m}x{n}x{rows}-{precision}-{k or 'dense'}.onnx"
                    onnx.save(layer_graph(m, n, rows, k, precision, seed), str(p))
                    paths[k] = p
                for b in batches:
                    ms = _time_group(paths, backend, options, b, rows, n, warmup, repeats, seed)
                    out.append(latency.LayerTiming(m, n, rows, precision, b, ms[None], tuple(widths),
                                           tuple(ms[k] for k in widths)))
                    if progress is not None:
                        progress.update(1)
    return out


def dense_model_graphs(model, precisions) -> dict[str, object]:
    """The dense model's ONNX per precision, laid out as the export stage does (every Linear
    quantized for int8; the ranges are placeholders: latency does not depend on them)."""
    size = tuple(timm.data.resolve_data_config({}, model=model)["input_size"])
    lin = linear_weights(model)
    proto, found = canonicalize_linears(export_onnx(model, size), lin)
    out = {"fp32": proto}
    if "int8" in precisions:
        out["int8"] = insert_qdq(proto, quantized_linears(model, {n: {"input": 4.0} for n in found}))
    return {p: out[p] for p in precisions}


def measure_rest(model, layer_shapes_: dict, timings: list, backend: str, options: dict, batches, precisions,
                 warmup: int, repeats: int) -> tuple[dict, dict]:
    """(rest_ms, dense_model_ms) keyed "precision@batch": the dense model timed whole, minus its Linears."""
    index = {t.key: t for t in timings}
    rest, whole = {}, {}
    with tempfile.TemporaryDirectory(prefix="latency-model-") as tmp:
        paths = {}
        for p, proto in dense_model_graphs(model, precisions).items():
            paths[p] = Path(tmp) / f"dense.{p}.onnx"
            onnx.save(proto, str(paths[p]))
        backends = {p: open_backend(backend, path, **options) for p, path in paths.items()}
        try:
            shape = next(iter(backends.values())).input_shape()
            for b in batches:
                x = np.random.default_rng(0).standard_normal((b, *shape[1:]), dtype=np.float32)
                medians = interleaved_medians(backends, x, warmup, repeats, BURST)
                for p in backends:
                    ms = medians[p]
                    layers = sum(index[(m, n, rows, p, b)].dense_ms for m, n, rows in layer_shapes_.values())
                    whole[latency.rest_key(p, b)] = ms
                    if ms < layers:
                        log.warning("%s at batch %d: the Linears timed alone (%.2f ms) exceed the whole model "
                                    "(%.2f ms): too noisy, rest set to 0; measure on a quieter machine",
                                    p, b, layers, ms)
                    rest[latency.rest_key(p, b)] = max(ms - layers, 0.0)
        finally:
            for be in backends.values():
                be.close()
    return rest, whole


def measure_table(model_name: str, model, backend: str = "ort", threads: int | None = None,
                  batches=(1, 8), precisions=("fp32", "int8"), step: int = 8, warmup: int = 3,
                  repeats: int = 15, include_head: bool = False, whole_model: bool = True,
                  options: dict | None = None):
    options = {**thread_options(backend, threads), **(options or {})}
    shapes = layer_shapes(model, include_head)
    distinct = set(shapes.values())
    with tqdm(total=len(distinct) * len(precisions) * len(batches), desc="latency table", unit="group",
              disable=None) as bar:
        timings = measure_layers(distinct, backend, options, batches, precisions, step, warmup, repeats, progress=bar)
    rest, whole = ({}, {})
    if whole_model:
        rest, whole = measure_rest(model, shapes, timings, backend, options, batches, precisions,
                                   warmup, max(5, repeats // 2))
    return latency.LatencyTable(model=model_name, backend=backend, threads=threads, machine=latency.machine_identity(backend),
                        versions=latency.library_versions(), layers=tuple(timings), rest_ms=rest, dense_model_ms=whole,
                        repeats=repeats, options=dict(options),
                        measured=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def format_markdown(table) -> str:
    """Per shape, precision and batch: dense ms, the widest width still faster as a pair, pair/dense ratios."""
    mach = table.machine
    lines = [f"Latency table of `{table.model}` on {table.backend} ({table.threads or 'default'} threads), "
             f"{mach.get('cpu')} [{' '.join(latency.simd_flags(mach.get('cpu_flags', [])))}]"
             + (f", {', '.join(mach['gpus'])}" if mach.get("gpus") else "")
             + f"; medians of {table.repeats} interleaved runs.", "",
             "| layer (out x in, rows) | precision | batch | dense ms | break-even width | pair/dense at 1/4, 1/2 of it |",
             "|---|---|---:|---:|---:|---|"]
    for e in table.layers:
        faster = [k for k, t in zip(e.widths, e.pair_ms) if t < e.dense_ms]
        be = min(e.out_features, e.in_features, (e.out_features * e.in_features - 1)
                 // (e.out_features + e.in_features))
        ratios = ", ".join(f"{e.pair(k) / e.dense_ms:.2f}" for k in (be // 4, be // 2))
        lines.append(f"| {e.out_features}x{e.in_features}, {e.tokens} | {e.precision} | {e.batch} | "
                     f"{e.dense_ms:.3f} | {max(faster) if faster else 'none'} (params: {be}) | {ratios} |")
    if table.rest_ms:
        lines += ["", "| dense model | ms | outside the Linears |", "|---|---:|---:|"]
        for k, ms in table.dense_model_ms.items():
            lines.append(f"| {k} | {ms:.2f} | {table.rest_ms[k]:.2f} ({table.rest_ms[k] / ms:.0%}) |")
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    add_weights_arguments(g)
    add_model_options(g)
    g.add_argument("--include-head", action="store_true", help="time the classifier head too")
    g = p.add_argument_group("measurement")
    g.add_argument("--backend", default="ort", help="ort | ort-cuda | trt (default: ort)")
    g.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the runtime's choice)")
    g.add_argument("--batch-sizes", default="1,8", help="comma-separated (default 1,8)")
    g.add_argument("--precisions", default="fp32,int8", help="comma-separated subset of fp32,int8")
    g.add_argument("--width-step", type=int, default=8, help="pair widths measured: multiples of this (default 8)")
    g.add_argument("--no-spin", action="store_true",
                   help="onnxruntime: idle threads sleep instead of spinning (steadier on a machine shared with other jobs)")
    g.add_argument("--warmup", type=int, default=3)
    g.add_argument("--repeats", type=int, default=15, help="interleaved timed runs per graph (default 15)")
    g.add_argument("--no-model", action="store_true", help="skip timing the whole dense model (no rest_ms: "
                                                           "compress then predicts the Linears only)")
    g.add_argument("--force", action="store_true", help="measure again even if the cached table exists")
    g.add_argument("--out", type=Path, default=None, help="table JSON (default: the user cache, where compress "
                                                          "--latency-table auto finds it)")


def main(args: argparse.Namespace) -> int:
    try:
        batches = tuple(int(b) for b in args.batch_sizes.split(",") if b.strip())
    except ValueError:
        raise RuntimeStageError(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}") from None
    precisions = tuple(p for p in args.precisions.split(",") if p)
    if not batches or min(batches) < 1 or args.width_step < 1 or args.repeats < 1 or args.warmup < 0:
        raise RuntimeStageError("--batch-sizes, --width-step and --repeats must be >= 1, --warmup >= 0")
    if not precisions or set(precisions) - set(latency.PRECISIONS):
        raise RuntimeStageError(f"--precisions must be a subset of {','.join(latency.PRECISIONS)}, got {args.precisions!r}")

    reason = available_backends().get(args.backend, f"unknown backend {args.backend!r}")
    if reason:
        raise RuntimeStageError(f"backend {args.backend} cannot run here: {reason}")
    out = args.out or latency.default_table_path(args.model, args.backend, args.threads)
    if args.out is None and out.is_file() and not args.force:
        table = latency.load_table(out, args.model, args.backend)
        print(format_markdown(table))
        print(f"reused the cached table {out} (--force measures it again)")
        return 0
    opts = model_options(args)
    model = load_model(args.model, args.checkpoint, args.pretrained, data_config=opts["data_config"],
                       pos_interpolation=opts["pos_interpolation"], **opts["model_kwargs"])
    table = measure_table(args.model, model, args.backend, args.threads, batches, precisions, args.width_step,
                          args.warmup, args.repeats, args.include_head, whole_model=not args.no_model,
                          options={"allow_spinning": False} if args.no_spin and args.backend.startswith("ort") else {})
    table.save(out)
    out.with_suffix(".md").write_text(format_markdown(table))
    print(format_markdown(table))
    print(f"wrote {out}")
    return 0
