"""Many budgets from one calibration pass: the accuracy vs parameters / bytes / latency curve.

    python -m runtime sweep --model vit_cifar_ref --ratios 0.2,0.3,0.4,0.5,0.6,0.7 --out runs/sweep

For each ratio, in D/r<ratio>/ (the layout of ``make all``, with its own report.md):
compress (compress.run; the first ratio's statistics and factorisation serve every later one,
and sweep.json records how many statistics passes actually ran), export FP32 + INT8
(export.export_compressed), accuracy of the compressed model in PyTorch and of
model.int8.onnx on the runtime backend (runtime.evaluate), and batch-1 latency of
dense/low-rank FP32/INT8 interleaved in one run (runtime.benchmark). Then D/sweep.json,
D/sweep.md and D/pareto.png (each written atomically).

Latency across ratios is put on one clock with runtime.workflows.run.normalised_latency: each
ratio's p50 relative to the dense FP32 model measured in the same interleaved run, times the
median dense FP32 p50 over all runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from compress import (Config, add_calibration_arguments, add_method_arguments, add_weights_arguments, config_defaults,
                      default_stats_cache)
from cliutil import option_value
from cliutil import atomic_write_bytes, figure_png, write_json
from export import ExportOptions, onnx_name
from runtime.backends import thread_options
from runtime.benchmark import BenchConfig
from runtime.errors import RuntimeStageError
from runtime.evaluate import resolve_data
from runtime.machine import describe_machine, machine_info
from runtime.workflows.report import write_report
from runtime.workflows.layout import ratio_dir
from runtime.workflows.run import bench_stage, compress_stage, eval_stage, export_stage, normalised_latency, p50

log = logging.getLogger(__name__)

SCHEMA = 1
PRECISIONS = ("fp32", "int8")
FILES = {p: onnx_name("model", p) for p in PRECISIONS}
DENSE_FILES = {p: onnx_name("dense", p) for p in PRECISIONS}


@dataclass(frozen=True)
class SweepConfig:
    """How the sweep measures each budget (the model and method are a compress Config)."""
    ratios: tuple[float, ...]
    out: str
    data: str | None = None          # evaluation images (runtime.evaluate.resolve_data)
    num_eval: int | None = None
    eval_batch_size: int = 100
    bench: bool = True
    backend: str = "ort"
    threads: int | None = None       # torch and onnxruntime intra-op threads
    batch_size: int = 1              # latency batch size
    warmup: int = 3
    repeats: int = 20
    num_parity: int = 32
    seed: int = 0

    def __post_init__(self):
        if not self.ratios:
            raise RuntimeStageError("--ratios is empty")
        if any(not 0 < r < 1 for r in self.ratios):
            raise RuntimeStageError(f"every ratio must be in (0, 1), got {list(self.ratios)}")
        if len(set(self.ratios)) != len(self.ratios):
            raise RuntimeStageError(f"duplicate ratios in {list(self.ratios)}")
        if self.repeats < 1 or self.warmup < 0 or self.batch_size < 1 or self.num_parity < 1:
            raise RuntimeStageError("--repeats, --batch-size and --num-parity must be >= 1, --warmup >= 0")
        if self.threads is not None and self.threads < 1:
            raise RuntimeStageError(f"--threads must be >= 1, got {self.threads}")

    @property
    def backend_options(self) -> dict:
        return thread_options(self.backend, self.threads)


def run_sweep(base, config: SweepConfig) -> dict:
    """Compress/export/eval(/bench) ``base`` (compress Config) at every ratio; returns sweep.json."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    images = resolve_data(config.data, base.model, config.num_eval, config.seed)
    export_options = ExportOptions(fp16=False, calib=base.calib, num_parity=config.num_parity,
                                   threads=config.threads or 1, device=base.device)
    bench_config = BenchConfig(backend=config.backend, batch_sizes=(config.batch_size,), warmup=config.warmup,
                               repeats=config.repeats, options=config.backend_options, include_fp16=False,
                               variants=("dense-fp32", "dense-int8", "lowrank-fp32", "lowrank-int8"),
                               memory=False, seed=config.seed)
    started = _now()
    runs, prepared = [], None
    for i, ratio in enumerate(sorted(config.ratios)):
        rd = ratio_dir(out, ratio)
        result = compress_stage(base, ratio, rd, reuse=prepared)   # one factorisation serves every ratio
        manifest, prepared = result.manifest, result.prepared
        export = export_stage(rd, export_options)
        onnx = tuple(onnx_name(s, "int8") for s in (("dense", "model") if i == 0 else ("model",)))
        ev = eval_stage(rd, images, onnx, config.backend, config.backend_options,
                        batch_size=config.eval_batch_size, seed=config.seed)
        bench = bench_stage(rd, bench_config) if config.bench else None
        write_report(rd)
        runs.append({"ratio": ratio, "dir": rd, "manifest": manifest, "export": export, "eval": ev,
                     "bench": bench})
        log.info("ratio %.3g: %s", ratio, _one_line(runs[-1]))
    doc = build_document(base, config, runs, started)
    write_outputs(doc, out)
    return doc


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _one_line(run: dict) -> str:
    s = run["eval"]["variants"]
    int8 = next((v for k, v in s.items() if k.endswith(":model.int8.onnx")), None)
    return (f"{run['manifest']['params']['after']:,} parameters, top-1 {s['compressed']['top1']:.2%} fp32"
            + (f" / {int8['top1']:.2%} int8" if int8 else ""))


def build_document(base, config: SweepConfig, runs: list[dict], started: str) -> dict:
    """sweep.json: the dense reference, one point per ratio, Pareto flags, calibration passes."""
    bs = config.batch_size
    benches = [r["bench"] for r in runs if r["bench"]]
    lat = {p: normalised_latency(benches, f"lowrank-{p}", bs) for p in PRECISIONS}
    dense_lat = {p: normalised_latency(benches, f"dense-{p}", bs) for p in PRECISIONS}
    first = runs[0]
    ev0 = first["eval"]["variants"]
    backend = config.backend
    dense = {
        "params": first["manifest"]["params"]["before"],
        "bytes": {p: first["export"]["files"][DENSE_FILES[p]]["bytes"] for p in PRECISIONS},
        "top1": {"fp32": ev0["dense"]["top1"], "int8": ev0[f"{backend}:dense.int8.onnx"]["top1"]},
        "top5": {"fp32": ev0["dense"]["top5"], "int8": ev0[f"{backend}:dense.int8.onnx"]["top5"]},
        "latency_ms": {p: _median(dense_lat[p]) for p in PRECISIONS} if benches else None,
    }
    points = []
    for j, r in enumerate(runs):
        m, ex, ev = r["manifest"], r["export"]["files"], r["eval"]["variants"]
        scores = {"fp32": ev["compressed"], "int8": ev[f"{backend}:model.int8.onnx"]}
        k = sum(1 for rr in runs[:j] if rr["bench"])  # index of this run among the benchmarked ones
        points.append({
            "ratio": r["ratio"],
            "run_dir": str(r["dir"].relative_to(config.out)),
            "params": m["params"]["after"],
            "removed_ratio": m["params"]["removed_ratio"],
            "compressible_removed_ratio": m["params"]["compressible_removed_ratio"],
            "bytes": {p: ex[FILES[p]]["bytes"] for p in PRECISIONS},
            "top1": {p: scores[p]["top1"] for p in PRECISIONS},
            "top5": {p: scores[p]["top5"] for p in PRECISIONS},
            "agreement": {p: scores[p]["agreement"] for p in PRECISIONS},
            "kl": {p: scores[p]["kl"] for p in PRECISIONS},
            "latency_ms": {p: lat[p][k] for p in PRECISIONS} if r["bench"] else None,
            "latency_raw_p50_ms": ({p: p50(r["bench"], f"lowrank-{p}", bs) for p in PRECISIONS}
                                   | {"dense-fp32": p50(r["bench"], "dense-fp32", bs)}) if r["bench"] else None,
            "stats_from_cache": m["calibration"]["stats_from_cache"],
            "compress_seconds": m["timings"]["total"],
        })
    passes = sum(not p["stats_from_cache"] for p in points)
    if passes > 1:
        log.warning("the calibration statistics were computed %d times (cache %s unusable?)", passes,
                    base.stats_cache)
    doc = {
        "schema": SCHEMA, "started": started, "finished": _now(),
        "model": first["manifest"]["model"],
        "method": {"method": base.method, "allocation": base.allocation, "comp_rank": base.comp_rank,
                   "granule": base.granule},
        "calibration": {"path": first["manifest"]["calibration"]["path"],
                        "images": first["manifest"]["calibration"]["images"],
                        "passes": passes, "stats_cache": base.stats_cache},
        "data": first["eval"]["data"],
        "config": dataclasses.asdict(config) | {"compress": dataclasses.asdict(base)},
        "machine": benches[0]["machine"] if benches else machine_info(),
        "backend": backend,
        "batch_size": bs,
        "dense": dense,
        "points": points,
    }
    doc["pareto"] = pareto_flags(doc)
    return doc


def _median(values):
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def candidates(doc: dict, axis: str) -> list[tuple[str, float, float]]:
    """(label, cost, top-1) of every measured model for one cost axis: params, bytes or latency."""
    out = []
    d = doc["dense"]
    rows = [("dense", d)] + [(f"r{p['ratio']:g}", p) for p in doc["points"]]
    for label, row in rows:
        for prec in PRECISIONS:
            if axis == "params":
                cost = row["params"]
            elif axis == "bytes":
                cost = row["bytes"][prec]
            else:
                cost = (row.get("latency_ms") or {}).get(prec)
            if cost is not None:
                out.append((f"{label}-{prec}", cost, row["top1"][prec]))
    return out


def pareto_front(items: list[tuple[str, float, float]]) -> list[str]:
    """Labels not dominated by another item (cost <= and top-1 >= with one strict), by cost."""
    front = []
    for label, cost, acc in items:
        dominated = any(c <= cost and a >= acc and (c < cost or a > acc) for _, c, a in items)
        if not dominated:
            front.append((cost, label))
    return [label for _, label in sorted(front)]


def pareto_flags(doc: dict) -> dict:
    axes = ["params", "bytes"] + (["latency"] if doc["dense"].get("latency_ms") else [])
    return {axis: pareto_front(candidates(doc, axis)) for axis in axes}


# ----------------------------------------------------------------------------- outputs
def render_markdown(doc: dict) -> str:
    d, pts = doc["dense"], doc["points"]
    lat = d.get("latency_ms")

    def pct(x):
        return "-" if x is None else f"{100 * x:.2f}"

    def ms(row, p):
        v = (row.get("latency_ms") or {}).get(p)
        return "-" if v is None else f"{v:.2f}"

    cal = doc["calibration"]
    m = doc["method"]
    lines = [f"# Sweep: {doc['model']['name']} ({doc['model'].get('weights')} weights)", "",
             f"Method `{m['method']}`, allocation `{m['allocation']}`, compensation rank {m['comp_rank']}. "
             f"Calibration: {cal['images']} images from `{cal['path']}`; statistics computed "
             f"{cal['passes']} time(s) for {len(pts)} budgets (compress's cache served the rest).",
             f"Accuracy on {doc['data']['num_images']} images from `{doc['data']['root']}`: fp32 = compressed "
             f"model in PyTorch, int8 = model.int8.onnx on `{doc['backend']}`.", ""]
    if doc["backend"].startswith("ort") and (doc.get("machine") or {}).get("cpu_int8_saturates"):
        lines[-1:-1] = ["This CPU has no VNNI: ONNX Runtime's int8 GEMMs saturate their int16 pair sums, so the "
                        "int8 columns trail what the files compute (exactly, on TensorRT or a VNNI/ARM CPU)."]
    if lat:
        lines += [f"Latency: p50 at batch {doc['batch_size']} on `{doc['backend']}`, each ratio measured interleaved "
                  "with the dense model and rescaled to the median dense FP32 p50 over all runs "
                  "(runtime.workflows.run.normalised_latency).", f"Machine: {describe_machine(doc['machine'] or {})}.", ""]
    lines += ["| ratio | params | removed | fp32 MB | int8 MB | top-1 fp32 | top-1 int8 | agree fp32 | agree int8 "
              "| p50 fp32 ms | p50 int8 ms | stats |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    lines.append(f"| dense | {d['params']:,} | 0% | {d['bytes']['fp32'] / 1e6:.2f} | {d['bytes']['int8'] / 1e6:.2f} "
                 f"| {pct(d['top1']['fp32'])} | {pct(d['top1']['int8'])} | - | - | {ms(d, 'fp32')} | {ms(d, 'int8')} | - |")
    for p in pts:
        lines.append(f"| {p['ratio']:g} | {p['params']:,} | {p['removed_ratio']:.1%} | {p['bytes']['fp32'] / 1e6:.2f} "
                     f"| {p['bytes']['int8'] / 1e6:.2f} | {pct(p['top1']['fp32'])} | {pct(p['top1']['int8'])} "
                     f"| {pct(p['agreement']['fp32'])} | {pct(p['agreement']['int8'])} | {ms(p, 'fp32')} "
                     f"| {ms(p, 'int8')} | {'cache' if p['stats_from_cache'] else 'computed'} |")
    lines += ["", "Pareto-optimal (no other model is at most as costly and at least as accurate), cheapest first:", ""]
    lines += [f"- {axis}: " + ", ".join(front) for axis, front in doc["pareto"].items()]
    lines += ["", "Plot: [pareto.png](pareto.png); each ratio's full report: `<run_dir>/report.md`."]
    if doc["model"].get("weights") == "random-init":
        lines += ["", "**Random-init weights: the accuracies say nothing about the method.**"]
    return "\n".join(lines) + "\n"


def plot(doc: dict) -> bytes:
    """PNG: top-1 against parameters, file bytes and (when measured) latency; Pareto front dashed."""
    import matplotlib  # lazy: a slow import, needed only to draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_spec = [("params", "parameters (millions)", 1e-6), ("bytes", "file size (MB)", 1e-6)]
    if "latency" in doc["pareto"]:
        axes_spec.append(("latency", f"p50 latency, batch {doc['batch_size']} (ms)", 1.0))
    fig, axes = plt.subplots(1, len(axes_spec), figsize=(5.5 * len(axes_spec), 4.5), squeeze=False)
    style = {"fp32": ("o", "tab:blue"), "int8": ("s", "tab:orange")}
    for ax, (axis, label, scale) in zip(axes[0], axes_spec):
        items = candidates(doc, axis)
        for prec, (marker, color) in style.items():
            pts = [(c * scale, 100 * a, lab) for lab, c, a in items if lab.endswith(prec) and not lab.startswith("dense")]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=f"low-rank {prec}")
            for x, y, lab in pts:
                ax.annotate(lab.rsplit("-", 1)[0], (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
            dense = [(c * scale, 100 * a) for lab, c, a in items if lab == f"dense-{prec}"]
            ax.scatter([p[0] for p in dense], [p[1] for p in dense], marker="*", s=140, color=color,
                       edgecolors="black", label=f"dense {prec}", zorder=3)
        by = {lab: (c * scale, 100 * a) for lab, c, a in items}
        front = [by[lab] for lab in doc["pareto"][axis]]
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="black", ls="--", lw=0.8,
                label="Pareto front")
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 %")
        ax.grid(alpha=0.3)
        ax.set_title(f"accuracy vs {axis}")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{doc['model']['name']}: {doc['method']['method']}/{doc['method']['allocation']}", fontsize=10)
    fig.tight_layout()
    return figure_png(fig)


def write_outputs(doc: dict, out_dir) -> dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "sweep.json", "md": out_dir / "sweep.md", "png": out_dir / "pareto.png"}
    write_json(paths["json"], doc)
    atomic_write_bytes(paths["md"], render_markdown(doc).encode())
    atomic_write_bytes(paths["png"], plot(doc))
    return paths


# ----------------------------------------------------------------------------- CLI
def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The compress options sweep and fit share (python -m compress's own declarations and defaults)."""
    d = config_defaults()
    g = p.add_argument_group("model and method (as python -m compress)")
    add_weights_arguments(g)
    g.add_argument("--model-arg", type=option_value, action="append", default=[], metavar="KEY=VALUE",
                   help="keyword for timm.create_model, e.g. depth=2 (repeatable; recorded in the manifest)")
    add_calibration_arguments(g, d)
    add_method_arguments(g, d)
    g.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads (default: theirs)")
    g.add_argument("--backend", default="ort", help="runtime backend for accuracy and latency (default: ort)")


def base_config(args, ratio: float, out: str):
    """compress.Config from the shared options (the ratio and out are set per run)."""
    return Config(model=args.model, out=out, checkpoint=args.checkpoint,
                  pretrained=args.pretrained, model_kwargs=dict(args.model_arg),
                  calib=args.calib, num_calib=args.num_calib, ratio=ratio, method=args.method,
                  allocation=args.allocation, granule=args.granule, comp_rank=args.comp_rank,
                  comp_steps=args.comp_steps, stats_cache=args.stats_cache or str(default_stats_cache()))


def quiet_exporters() -> None:
    """The ONNX exporter logs every graph pass at INFO; keep the CLI's INFO log about the sweep."""
    for name in ("onnx_ir", "onnxscript", "torch.onnx", "export.parity", "export.pipeline"):
        logging.getLogger(name).setLevel(logging.WARNING)


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--ratios", type=_float_list, default=(0.2, 0.3, 0.4, 0.5, 0.6, 0.7),
                   help="fractions of all parameters to remove (default: 0.2,0.3,...,0.7)")
    p.add_argument("--data", help="evaluation images: folder, bundled set name or cifar10-test "
                                  "(default: the bundled eval set for the model)")
    p.add_argument("--num-eval", type=int, default=None, help="seeded subset of the evaluation images")
    p.add_argument("--no-bench", action="store_true", help="skip the latency measurement")
    p.add_argument("--batch-size", type=int, default=1, help="latency batch size (default 1)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per variant (default 20)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--num-parity", type=int, default=32, help="images per export parity check (default 32)")
    p.add_argument("--out", required=True, help="output directory: sweep.json, sweep.md, pareto.png, r<ratio>/")


def main(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    quiet_exporters()
    config = SweepConfig(ratios=tuple(args.ratios), out=args.out, data=args.data, num_eval=args.num_eval,
                         bench=not args.no_bench, backend=args.backend, threads=args.threads,
                         batch_size=args.batch_size, warmup=args.warmup, repeats=args.repeats,
                         num_parity=args.num_parity)
    doc = run_sweep(base_config(args, config.ratios[0], args.out), config)
    print(render_markdown(doc))
    print(f"wrote {Path(args.out) / 'sweep.json'}, sweep.md, pareto.png")
    return 0
