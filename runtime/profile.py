"""Where the time goes: ONNX Runtime's per-node profile of each variant, by kind of work.

Latency ratios alone do not say why a compressed model is as fast as it is. This runs every
variant of an export directory with ORT's profiler (CPU provider, interleaved runs so load
drift hits all alike) and splits each run's kernel time into

  linear     the model's Linear layers: dense MatMuls or both MatMuls of a low-rank pair, with
             their fused Q/DQ (node names carry the PyTorch layer name, e.g. blocks.3.mlp.fc1)
  attention  the activation-by-activation MatMuls (QK^T and attention x V), float in every variant
  other      everything else: LayerNorm, Softmax, GELU, residual Adds, Transposes, Q/DQ of inputs

and, for the linear part, by layer kind (attn.qkv, attn.proj, mlp.fc1, mlp.fc2, head). The
"other" and "attention" parts are the same work in the dense and compressed graphs, so they
bound the whole-model speed-up that any rank allocation can give:

    python -m runtime profile --onnx-dir runs/x/onnx --threads 1 --out runs/x/profile
"""
from __future__ import annotations

import argparse
import json
import re
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort

from cliutil import atomic_write_bytes, write_json
from runtime.benchmark import BENCH_FILES
from runtime.errors import RuntimeStageError

LAYER = re.compile(r"(?:^|[./_:])(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2|head)(?=$|[./_:])")
KINDS = ("linear", "attention", "other")


def classify(node_name: str, op: str) -> tuple[str, str]:
    """(kind, layer kind) of one profiled node."""
    m = LAYER.search(node_name)
    if m:
        return "linear", m.group(1)
    if op in ("MatMul", "FusedMatMul", "MatMulIntegerToFloat", "QLinearMatMul", "Gemm"):
        return "attention", "-"
    return "other", "-"


def summarize(events: list[dict], runs: int) -> dict:
    """Milliseconds per run by kind and by linear layer kind, from ORT profile events."""
    by_kind, by_layer, by_op = defaultdict(float), defaultdict(float), defaultdict(float)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        op = e.get("args", {}).get("op_name", "?")
        kind, layer = classify(e["name"][: -len("_kernel_time")], op)
        ms = e["dur"] / 1000.0 / runs
        by_kind[kind] += ms
        by_op[op] += ms
        if kind == "linear":
            by_layer[layer] += ms
    total = sum(by_kind.values())
    return {"total_ms": total, "kinds_ms": {k: by_kind.get(k, 0.0) for k in KINDS},
            "linear_layers_ms": dict(sorted(by_layer.items())),
            "ops_ms": dict(sorted(by_op.items(), key=lambda kv: -kv[1]))}


def profile_dir(onnx_dir, names: list[str] | None = None, threads: int = 1, batch_size: int = 1,
                warmup: int = 5, repeats: int = 30, seed: int = 0) -> dict:
    onnx_dir = Path(onnx_dir)
    variants = [v for v in BENCH_FILES if (onnx_dir / v.filename).is_file() and (not names or v.name in names)]
    if not variants:
        raise RuntimeStageError(f"no ONNX variants to profile in {onnx_dir}; run `python -m export` first")
    sessions = {}
    with tempfile.TemporaryDirectory(prefix="ort-profile-") as tmp:
        for v in variants:
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            so.enable_profiling = True
            so.profile_file_prefix = str(Path(tmp) / v.name)
            sess = ort.InferenceSession(str(onnx_dir / v.filename), so, providers=["CPUExecutionProvider"])
            inp = sess.get_inputs()[0]
            shape = [batch_size] + [d if isinstance(d, int) else 1 for d in inp.shape[1:]]
            dtype = np.float16 if "float16" in inp.type else np.float32
            x = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
            sessions[v.name] = (sess, {inp.name: x})
        for _ in range(warmup):          # warm-up runs are profiled too; dropped below by count
            for sess, feed in sessions.values():
                sess.run(None, feed)
        for _ in range(repeats):
            for sess, feed in sessions.values():
                sess.run(None, feed)
        out = {}
        for name, (sess, _) in sessions.items():
            events = json.loads(Path(sess.end_profiling()).read_text())
            out[name] = summarize(_after_warmup(events, warmup), repeats)
    return {"onnx_dir": str(onnx_dir), "threads": threads, "batch_size": batch_size, "warmup": warmup,
            "repeats": repeats, "variants": out, "ratios": _ratios(out)}


def _after_warmup(events: list[dict], warmup: int) -> list[dict]:
    """Drop the node events of the first ``warmup`` model runs (each run is one model_run event)."""
    runs = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    if len(runs) <= warmup:
        return events
    start = runs[warmup]
    return [e for e in events if e.get("ts", 0) >= start]


def _ratios(out: dict) -> dict:
    """Each low-rank variant against the dense variant of the same precision, part by part."""
    ratios = {}
    for name, s in out.items():
        dense = out.get(name.replace("lowrank", "dense"))
        if not name.startswith("lowrank") or dense is None:
            continue
        r = {"total": s["total_ms"] / dense["total_ms"]}
        r.update({k: s["kinds_ms"][k] / dense["kinds_ms"][k] for k in KINDS if dense["kinds_ms"][k] > 0})
        shared = dense["kinds_ms"]["attention"] + dense["kinds_ms"]["other"]
        r["shared_fraction_of_dense"] = shared / dense["total_ms"]
        ratios[name] = r
    return ratios


def format_markdown(doc: dict) -> str:
    lines = [f"ONNX Runtime CPU profile of `{doc['onnx_dir']}`: batch {doc['batch_size']}, "
             f"{doc['threads']} thread(s), {doc['repeats']} interleaved runs per variant "
             "(kernel time, ms per run).", "",
             "| variant | total | linear | attention | other | linear: " +
             " / ".join(sorted({k for s in doc["variants"].values() for k in s["linear_layers_ms"]})) + " |",
             "|---|---:|---:|---:|---:|---|"]
    layers = sorted({k for s in doc["variants"].values() for k in s["linear_layers_ms"]})
    for name, s in doc["variants"].items():
        k = s["kinds_ms"]
        per = " / ".join(f"{s['linear_layers_ms'].get(lay, 0.0):.2f}" for lay in layers)
        lines.append(f"| {name} | {s['total_ms']:.2f} | {k['linear']:.2f} | {k['attention']:.2f} | "
                     f"{k['other']:.2f} | {per} |")
    if doc["ratios"]:
        lines += ["", "| low-rank vs dense | total | linear | attention | other | dense time outside Linears |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, r in doc["ratios"].items():
            lines.append(f"| {name} | {r['total']:.3f} | {r.get('linear', float('nan')):.3f} | "
                         f"{r.get('attention', float('nan')):.3f} | {r.get('other', float('nan')):.3f} | "
                         f"{100 * r['shared_fraction_of_dense']:.0f}% |")
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--onnx-dir", type=Path, required=True, help="export directory (python -m export)")
    p.add_argument("--variants", default=None, help="comma-separated subset, e.g. dense-int8,lowrank-int8")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", type=Path, required=True, help="folder for profile.json and profile.md")


def main(args: argparse.Namespace) -> int:
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1 or args.batch_size < 1:
        raise RuntimeStageError("--repeats, --threads and --batch-size must be >= 1, --warmup >= 0")
    names = [n for n in (args.variants or "").split(",") if n]
    doc = profile_dir(args.onnx_dir, names, args.threads, args.batch_size, args.warmup, args.repeats)
    write_json(args.out / "profile.json", doc)
    md = format_markdown(doc)
    atomic_write_bytes(args.out / "profile.md", md.encode())
    print(md)
    return 0

