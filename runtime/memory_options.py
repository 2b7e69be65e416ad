"""What a session's memory is made of, and which ONNX Runtime options shrink it at what latency cost.

    python -m runtime memory-options --onnx-dir runs/x/onnx --variants dense-int8,lowrank-int8 --out runs/x/memory

For every variant and option set (OPTION_SETS: ORT's defaults, CPU arena off, memory pattern off,
weight prepacking off, and combinations) the model is opened in a fresh process
(runtime.memory.measure_in_subprocess) and the peak-RSS delta is split into

  weights  the initializer bytes of the file (what the model must hold)
  load     RSS after the session is created minus before: weights as ORT holds them, plus
           prepacked copies (kernels re-lay each weight out once; with prepacking off they do not)
  run      peak RSS while running minus after load: activations and the arena's growth

Latency of every (variant, option set) is measured in one interleaved run in this process, so
an option's cost is a ratio to the default set of the same variant.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cliutil import atomic_write_bytes
from runtime.backends import open_backend, thread_options
from runtime.benchmark import BENCH_FILES, interleaved_medians
from runtime.errors import RuntimeStageError
from runtime.memory import inspect_onnx, measure_in_subprocess

OPTION_SETS = {
    "default": {},
    "no-arena": {"mem_arena": False},
    "no-mem-pattern": {"mem_pattern": False},
    "no-prepack": {"prepacking": False},
    "no-arena+no-prepack": {"mem_arena": False, "prepacking": False},
    "edge": {"mem_arena": False, "mem_pattern": False, "prepacking": False},
}


def study(onnx_dir, names: list[str], threads: int | None = 2, batch_sizes=(1,), sets=tuple(OPTION_SETS),
          warmup: int = 3, repeats: int = 20) -> dict:
    onnx_dir = Path(onnx_dir)
    variants = [v for v in BENCH_FILES if v.name in names and (onnx_dir / v.filename).is_file()]
    if not variants:
        raise RuntimeStageError(f"none of {', '.join(names)} in {onnx_dir}; run `python -m export` first")
    base = thread_options("ort", threads)
    rows = {}
    for v in variants:
        weights = sum(inspect_onnx(onnx_dir / v.filename).initializer_bytes.values())
        for s in sets:
            p = measure_in_subprocess("ort", onnx_dir / v.filename, {**base, **OPTION_SETS[s]}, batch_sizes)
            rows[(v.name, s)] = {"variant": v.name, "options": s, "weights_bytes": weights,
                                 "load_bytes": p["after_load_rss_bytes"] - p["baseline_rss_bytes"],
                                 "run_bytes": p["peak_rss_bytes"] - p["after_load_rss_bytes"],
                                 "peak_rss_delta_bytes": p["peak_rss_delta_bytes"], "latency_ms": {}}
    backends = {k: open_backend("ort", onnx_dir / next(v.filename for v in variants if v.name == k[0]),
                                **base, **OPTION_SETS[k[1]]) for k in rows}
    try:
        shape = next(iter(backends.values())).input_shape()
        for bs in batch_sizes:
            x = np.random.default_rng(0).standard_normal((bs, *shape[1:]), dtype=np.float32)
            for k, ms in interleaved_medians(backends, x, warmup, repeats).items():
                rows[k]["latency_ms"][str(bs)] = ms
    finally:
        for b in backends.values():
            b.close()
    return {"onnx_dir": str(onnx_dir), "threads": threads, "batch_sizes": list(batch_sizes), "repeats": repeats,
            "rows": list(rows.values())}


def format_markdown(doc: dict) -> str:
    bs = doc["batch_sizes"]
    lines = [f"Peak-RSS delta by part (fresh process per row, MB = 10^6 bytes) and p50 latency "
             f"({doc['threads']} threads, {doc['repeats']} interleaved runs; × the default options of the variant).", "",
             "| variant | options | weights MB | load MB | run MB | peak-RSS delta MB | × default | "
             + " | ".join(f"p50 ms b{b} (× default)" for b in bs) + " |",
             "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(bs)]
    default = {r["variant"]: r for r in doc["rows"] if r["options"] == "default"}
    for r in doc["rows"]:
        d = default.get(r["variant"], r)
        lat = " | ".join(f"{r['latency_ms'][str(b)]:.2f} ({r['latency_ms'][str(b)] / d['latency_ms'][str(b)]:.2f})"
                         for b in bs)
        lines.append(f"| {r['variant']} | {r['options']} | {r['weights_bytes'] / 1e6:.1f} | {r['load_bytes'] / 1e6:.1f} | "
                     f"{r['run_bytes'] / 1e6:.1f} | {r['peak_rss_delta_bytes'] / 1e6:.1f} | "
                     f"{r['peak_rss_delta_bytes'] / d['peak_rss_delta_bytes']:.2f} | {lat} |")
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--onnx-dir", type=Path, required=True, help="export directory (python -m export)")
    p.add_argument("--variants", default="dense-int8,lowrank-int8", help="comma-separated (default dense-int8,lowrank-int8)")
    p.add_argument("--options", default=",".join(OPTION_SETS), help=f"option sets (default all: {','.join(OPTION_SETS)})")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-sizes", default="1", help="comma-separated (default 1)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, required=True, help="folder for memory_options.json and .md")


def main(args: argparse.Namespace) -> int:
    sets = tuple(s for s in args.options.split(",") if s)
    unknown = set(sets) - set(OPTION_SETS)
    if unknown or not sets:
        raise RuntimeStageError(f"unknown option sets {sorted(unknown)}; choose from {', '.join(OPTION_SETS)}")
    try:
        bs = tuple(int(b) for b in args.batch_sizes.split(",") if b)
    except ValueError:
        raise RuntimeStageError(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}") from None
    doc = study(args.onnx_dir, [n for n in args.variants.split(",") if n], args.threads, bs, sets,
                repeats=args.repeats)
    atomic_write_bytes(args.out / "memory_options.json", (json.dumps(doc, indent=2) + "\n").encode())
    md = format_markdown(doc)
    atomic_write_bytes(args.out / "memory_options.md", md.encode())
    print(md)
    return 0
