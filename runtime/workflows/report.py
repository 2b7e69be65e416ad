"""One report for a whole run directory: what compress, export, bench and eval wrote, in one page.

    python -m runtime report --run-dir runs/demo

reads (whichever exist; the report names the missing ones)

    D/compressed/manifest.json   model, budget, parameters, rank per layer   (python -m compress)
    D/onnx/export_report.json    file sizes, parity of every ONNX file        (python -m export)
    D/bench/bench.json           latency, throughput, memory, the machine     (python -m runtime bench)
    D/eval.json                  top-1/top-5/agreement/cosine/KL per variant  (python -m runtime eval)

and writes D/report.md and D/accuracy_vs_size.png (one point per evaluated variant), each
atomically. Nothing is recomputed: the report only joins the stages' saved results.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from cliutil import atomic_write_bytes, atomic_write_text, figure_png
from export import FILES, onnx_name
from runtime.benchmark import BENCH_FILES
from runtime.errors import RuntimeStageError
from runtime.machine import describe_machine
from runtime.workflows.layout import PLOT, REPORT, SOURCES

log = logging.getLogger(__name__)

MB = 1e6
_BY_FILE = {v.filename: v for v in BENCH_FILES}
# PyTorch variants of runtime.evaluate -> the benchmark variant (and ONNX file) they correspond to
_TORCH = {"dense": "dense-fp32", "compressed": "lowrank-fp32", "compressed-int8-fakequant": "lowrank-int8"}


@dataclass(frozen=True)
class RunFiles:
    """The JSON documents of one run directory (None where the stage has not run)."""
    run_dir: Path
    manifest: dict | None
    export: dict | None
    bench: dict | None
    eval: dict | None

    @property
    def missing(self) -> tuple[str, ...]:
        return tuple(rel for key, rel in SOURCES.items() if getattr(self, key) is None)


@dataclass(frozen=True)
class EvalPoint:
    """One evaluated variant placed in the size plane: parameters and deployable file bytes."""
    name: str             # as in eval.json ("compressed", "ort:model.int8.onnx", ...)
    variant: str | None   # benchmark naming: "dense-fp32", "lowrank-int8", ...
    runs_on: str          # "pytorch", "pytorch fake-quant", or the backend ("ort")
    params: int | None
    file_bytes: int | None
    scores: dict


def load_run(run_dir) -> RunFiles:
    """Read whatever the stages wrote in ``run_dir``; a one-line error if none of it exists."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RuntimeStageError(f"run directory {run_dir} does not exist")
    docs = {}
    for key, rel in SOURCES.items():
        path = run_dir / rel
        if not path.is_file():
            docs[key] = None
            continue
        try:
            docs[key] = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RuntimeStageError(f"{path} is unreadable: {exc}") from None
        if not isinstance(docs[key], dict):
            raise RuntimeStageError(f"{path} does not hold a JSON object")
    run = RunFiles(run_dir, **docs)
    if len(run.missing) == len(SOURCES):
        raise RuntimeStageError(f"{run_dir} holds none of {', '.join(SOURCES.values())}; run the stages first "
                                "(make all OUT=...)")
    return run


# ----------------------------------------------------------------------------- joining
def params_of(run: RunFiles, family: str) -> int | None:
    """Whole-model parameter count of the dense or low-rank model (manifest, else export report)."""
    if run.manifest:
        return run.manifest["params"]["before" if family == "dense" else "after"]
    if run.export:
        return (run.export.get("params") or {}).get("dense" if family == "dense" else "model")
    return None


def file_bytes(run: RunFiles, variant: str | None) -> int | None:
    """Size of a variant's ONNX file from the export report (else from the benchmark)."""
    if variant is None:
        return None
    filename = next(f.filename for f in FILES if f.name == variant)
    if run.export and filename in (run.export.get("files") or {}):
        return run.export["files"][filename].get("bytes")
    if run.bench and variant in run.bench.get("variants", {}):
        return run.bench["variants"][variant]["memory"].get("file_bytes")
    return None


def classify(name: str) -> tuple[str | None, str]:
    """eval.json variant name -> (benchmark variant name, what it ran on)."""
    if name in _TORCH:
        return _TORCH[name], "pytorch fake-quant" if name.endswith("fakequant") else "pytorch"
    backend, sep, filename = name.partition(":")
    if sep and filename in _BY_FILE:
        return _BY_FILE[filename].name, backend
    return None, "?"


def eval_points(run: RunFiles) -> list[EvalPoint]:
    if not run.eval:
        return []
    out = []
    for name, scores in run.eval.get("variants", {}).items():
        variant, runs_on = classify(name)
        family = variant.split("-")[0] if variant else None
        out.append(EvalPoint(name, variant, runs_on, params_of(run, family) if family else None,
                             file_bytes(run, variant), scores))
    return out


# ----------------------------------------------------------------------------- formatting
def _pct(x, digits=2):
    return "-" if x is None else f"{100 * x:.{digits}f}"


def _num(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def _int(x):
    return "-" if x is None else f"{x:,}"


def _ratio(a, b):
    return None if a is None or not b else a / b


def _link(run: RunFiles, rel: str, text: str | None = None) -> str:
    return f"[{text or rel}]({rel})" if (run.run_dir / rel).exists() else f"{text or rel} (missing)"


def _headline(run: RunFiles, points: list[EvalPoint]) -> list[str]:
    lines = []
    m = run.manifest
    if m:
        p = m["params"]
        lines.append(f"- parameters: {p['before']:,} -> {p['after']:,} ({p['removed_ratio']:.1%} removed; "
                     f"{p['compressible_removed_ratio']:.1%} of the compressible layers)")
    if run.export:
        files = run.export.get("files") or {}
        d, q = files.get(onnx_name("dense"), {}).get("bytes"), files.get(onnx_name("model", "int8"), {}).get("bytes")
        if d and q:
            lines.append(f"- deployable size: dense.onnx {d / MB:.2f} MB -> model.int8.onnx {q / MB:.2f} MB "
                         f"({d / q:.1f}x smaller)")
    by = {pt.name: pt for pt in points}
    dense = by.get("dense")
    if dense:
        parts = [f"dense {_pct(dense.scores['top1'])}%"]
        for pt in points:
            if pt.variant in ("lowrank-fp32", "lowrank-int8"):
                delta = pt.scores["top1"] - dense.scores["top1"]
                parts.append(f"{pt.name} {_pct(pt.scores['top1'])}% ({100 * delta:+.2f})")
        lines.append(f"- top-1 on {run.eval['data']['num_images']} images: " + ", ".join(parts))
    if run.bench:
        ratios = (run.bench.get("ratios") or {}).get("dense-fp32", {})
        bs = str(run.bench["config"]["batch_sizes"][0])
        parts = [f"{n} {1 / r:.2f}x" for n, r in ((n, ratios.get(n, {}).get("p50", {}).get(bs))
                                                  for n in ("dense-int8", "lowrank-fp32", "lowrank-int8")) if r]
        if parts:
            busy = busy_note(run.bench.get("machine") or {})
            lines.append(f"- speed-up over dense FP32 (p50, batch {bs}, {run.bench['config']['backend']}): "
                         + ", ".join(parts) + (f" ({busy})" if busy else ""))
    return lines


def busy_note(machine: dict) -> str | None:
    """A warning when other work competed for the CPUs during the benchmark (load > usable CPUs)."""
    load = (machine.get("load_average") or [None])[0]
    cpus = (machine.get("cpus") or {}).get("usable")
    if load is None or not cpus or load <= cpus:
        return None
    return (f"measured on a busy machine, load average {load:g} on {cpus} CPUs: latencies mix runs that had "
            "the cores with runs that waited for them; the min column is the closest to an idle machine")


def _rank_section(run: RunFiles) -> list[str]:
    m = run.manifest
    layers = m["layers"]
    lines = ["## Rank per layer", ""]
    factorised = {n: l for n, l in layers.items() if not l.get("dense")}
    kept = [l["params"] / l["dense_params"] for l in factorised.values() if l.get("dense_params")]
    ranks = [l["rank"] for l in factorised.values()]
    summary = f"{len(factorised)} of {len(layers)} layers factorised"
    if ranks:
        summary += (f"; rank {min(ranks)}..{max(ranks)} (median {statistics.median(ranks):g}) "
                    f"+ compensation {m.get('comp_rank', 0)}; a factorised layer keeps "
                    f"{min(kept):.0%}..{max(kept):.0%} of its parameters")
    lines += [summary + f". Plot: {_link(run, 'compressed/ranks.png')}; per-layer errors in "
                        f"{_link(run, 'compressed/report.md')}.", ""]
    # blocks x layer kind grid when the names allow it ("blocks.3.mlp.fc1"), else a plain list
    parsed = {n: re.match(r"^(.+?)\.(\d+)\.(.+)$", n) for n in layers}
    cell = {n: "dense" if l.get("dense") else f"{l['rank']}" + (f"+{l['comp_rank']}" if l.get("comp_rank") else "")
            for n, l in layers.items()}
    if all(parsed.values()) and len({p.group(1) for p in parsed.values()}) == 1:
        kinds = list(dict.fromkeys(p.group(3) for p in parsed.values()))
        rows = sorted({int(p.group(2)) for p in parsed.values()})
        grid = {(int(p.group(2)), p.group(3)): cell[n] for n, p in parsed.items()}
        prefix = next(iter(parsed.values())).group(1)
        lines += [f"| {prefix} | " + " | ".join(kinds) + " |", "|---:|" + "---:|" * len(kinds)]
        lines += [f"| {i} | " + " | ".join(grid.get((i, k), "-") for k in kinds) + " |" for i in rows]
        widths = {k: next(l["in"] for n, l in layers.items() if parsed[n].group(3) == k) for k in kinds}
        lines += ["", "Cells: rank + compensation rank, or `dense` where factorising would not save parameters. "
                      "Layer inputs: " + ", ".join(f"{k} {w}" for k, w in widths.items()) + "."]
    else:
        lines += ["| layer | rank |", "|---|---:|"] + [f"| {n} | {c} |" for n, c in cell.items()]
    return lines


def _model_section(run: RunFiles) -> list[str]:
    m = run.manifest
    spec, p, cal = m["model"], m["params"], m.get("calibration") or {}
    lines = [
        "## Model and budget",
        "",
        f"- model: `{spec['name']}`" + (f" {spec['kwargs']}" if spec.get("kwargs") else "")
        + f", weights: {spec.get('weights')}" + (f" (`{spec['checkpoint']}`)" if spec.get("checkpoint") else ""),
        f"- budget: {m['budget']['description']} (target <= {m['budget']['target_params']:,} parameters)",
        f"- method: `{m['method']}`, allocation `{m['allocation']}`, granule {m['granule']}, "
        f"compensation rank {m['comp_rank']}",
        f"- calibration: {cal.get('images')} images from `{cal.get('path')}` (hash {cal.get('hash')})",
        "",
        "| parameters | before | after | removed |",
        "|---|---:|---:|---:|",
        f"| whole model | {p['before']:,} | {p['after']:,} | {p['removed_ratio']:.2%} |",
        f"| compressible layers | {p['compressible_before']:,} | {p['compressible_after']:,} "
        f"| {p['compressible_removed_ratio']:.2%} |",
    ]
    agree = m.get("agreement") or {}
    if agree:
        lines += ["", "Agreement with the dense model on the calibration images (compress stage): " + ", ".join(
            f"{k.replace('_vs_', ' vs ').replace('_', ' ')} "
            + (f"top-1 {v['top1_agreement']:.1%} / cosine {v['cosine']:.4f}" if v.get("top1_agreement") is not None
               else f"features: cosine {v['cosine']:.4f} / rel. error {v['rel_error']:.4f}")
            for k, v in agree.items())]
    return lines


def _accuracy_section(run: RunFiles, points: list[EvalPoint]) -> list[str]:
    data = run.eval.get("data") or {}
    dense = next((pt for pt in points if pt.name == "dense"), None)
    lines = ["## Accuracy", "",
             f"{data.get('num_images')} labelled images from `{data.get('root')}` (seed {data.get('seed')}). "
             "Agreement, cosine and KL(dense || variant) are against the dense PyTorch model; size is the "
             "matching ONNX file (the PyTorch rows run the same weights).", "",
             "| variant | runs on | params | file MB | top-1 % | d top-1 | top-5 % | agree % | cosine | KL |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for pt in points:
        s = pt.scores
        delta = None if dense is None else 100 * (s["top1"] - dense.scores["top1"])
        lines.append(f"| {pt.name} | {pt.runs_on} | {_int(pt.params)} | {_num(_ratio(pt.file_bytes, MB))} "
                     f"| {_pct(s['top1'])} | {_num(delta, '+.2f')} | {_pct(s['top5'])} | {_pct(s.get('agreement'))} "
                     f"| {_num(s.get('cosine'), '.5f')} | {_num(s.get('kl'), '.5f')} |")
    note = int8_kernel_note(run, points)
    if note:
        lines += ["", note]
    if run.manifest and run.manifest["model"].get("weights") == "random-init":
        lines += ["", "**The weights are a random init: these accuracies say nothing about the method** "
                      "(train the reference model with `make reference-model` or pass a checkpoint)."]
    lines += ["", f"Plot: {_link(run, PLOT)}"]
    return lines


def int8_kernel_note(run: RunFiles, points: list[EvalPoint]) -> str | None:
    """Why ORT's INT8 rows may trail the fake-quant row: the CPU's int8 kernels (export measured them)."""
    k = ((run.export or {}).get("files") or {}).get(onnx_name("model", "int8"), {}).get("ort_int8_kernels")
    if not k or not k.get("cpu_saturates") or not any("int8.onnx" in pt.name for pt in points):
        return None
    return ("**Note:** this CPU has no VNNI, so ONNX Runtime's int8 GEMMs saturate their int16 pair sums; "
            f"at export its INT8 logits were off the graph's by rel. L2 {k['rel_l2']:.3f} "
            f"(top-1 agreement {_pct(k['top1_agreement'], 1)}%). The `compressed-int8-fakequant` row is what "
            "the file computes exactly (TensorRT, VNNI or ARM CPUs).")


def _export_section(run: RunFiles) -> list[str]:
    ex = run.export
    files = ex.get("files") or {}
    base = files.get(onnx_name("dense"), {}).get("bytes")
    pi = ex.get("parity_images") or {}
    lines = ["## ONNX files and parity", "",
             f"Opset {ex.get('opset')}; every file is checked against its PyTorch reference on "
             f"{pi.get('count')} images from `{pi.get('folder')}`.", "",
             "| file | precision | MB | x dense.onnx | low-rank pairs | parity reference | max abs diff "
             "| top-1 agree % | INT8 gate: rel. L2 to float, file / fake-quant | passed |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|---|"]
    for name, f in files.items():
        par = f.get("parity") or {}
        acc = par.get("accuracy")
        gate = f"{acc['file_error']:.4f} / {acc['fake_quant_error']:.4f}" if acc else "-"
        lines.append(f"| {name} | {f.get('precision')} | {_num(_ratio(f.get('bytes'), MB))} "
                     f"| {_num(_ratio(f.get('bytes'), base), '.3f')} | {f.get('lowrank_pairs', '-')} "
                     f"| {par.get('reference', '-')} | {_num(par.get('max_abs'), '.2e')} "
                     f"| {_pct(par.get('top1_agreement'), 1)} | {gate} | {'yes' if par.get('passed') else 'NO'} |")
    lines += ["", "INT8 files are gated on accuracy: their distance to the float model at most 1.25x the "
                  "fake-quant model's (+0.005); the element-wise difference to fake-quant is reported "
                  "(docs/design.md)."] if any((f.get("parity") or {}).get("accuracy") for f in files.values()) else []
    if ex.get("dense_is_compressed_origin") is False:
        lines += ["", "**Warning:** the dense files were rebuilt from different weights than the compressed "
                      "model's origin (see export_report.json)."]
    return lines


def _bench_section(run: RunFiles) -> list[str]:

    b = run.bench
    cfg, variants = b["config"], b["variants"]
    r32 = (b.get("ratios") or {}).get("dense-fp32", {})
    opts = ", ".join(f"{k}={v}" for k, v in (cfg.get("options") or {}).items()) or "defaults"
    lines = ["## Latency and memory", "",
             f"Backend `{cfg['backend']}` ({opts}); {cfg['warmup']} warm-up + {cfg['repeats']} timed runs per "
             "variant and batch size, interleaved round-robin so load drift hits every variant alike.",
             f"Machine: {describe_machine(b.get('machine') or {})}.",
             f"Measured {b.get('started')} to {b.get('finished')}. Details: {_link(run, 'bench/bench.md')}; "
             f"plot: {_link(run, 'bench/bench.png')}.", "",
             "| batch | variant | p50 ms | p90 ms | p99 ms | min ms | img/s | p50 x dense FP32 | img/s x dense FP32 |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    busy = busy_note(b.get("machine") or {})
    if busy:
        lines[-2:-2] = [f"**Note:** {busy}.", ""]
    dense = variants.get("dense-fp32", {}).get("latency", {})
    for bs in [str(x) for x in cfg["batch_sizes"]]:
        for name, v in variants.items():
            lat = v["latency"].get(bs)
            if lat is None:
                continue
            thr = _ratio(lat["throughput_ips"], dense.get(bs, {}).get("throughput_ips"))
            lines.append(f"| {bs} | {name} | {lat['p50_ms']:.2f} | {lat['p90_ms']:.2f} | {lat['p99_ms']:.2f} "
                         f"| {_num(lat.get('min_ms'))} | {lat['throughput_ips']:.1f} | {_num(r32.get(name, {}).get('p50', {}).get(bs), '.3f')} "
                         f"| {_num(thr, '.2f')} |")
    lines += ["", "| variant | file MB | x dense FP32 | weights MB | peak RSS MB | RSS delta MB | RSS delta x dense FP32 |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, v in variants.items():
        mem, proc = v["memory"], v.get("process") or {}
        lines.append(f"| {name} | {_num(_ratio(mem.get('file_bytes'), MB))} "
                     f"| {_num(r32.get(name, {}).get('file_bytes'), '.3f')} | {_num(_ratio(mem.get('weight_bytes'), MB))} "
                     f"| {_num(_ratio(proc.get('peak_rss_bytes'), MB), '.1f')} "
                     f"| {_num(_ratio(proc.get('peak_rss_delta_bytes'), MB), '.1f')} "
                     f"| {_num(r32.get(name, {}).get('peak_rss_delta_bytes'), '.3f')} |")
    if not any(v.get("process") for v in variants.values()):
        lines += ["", "Process memory was not measured (bench --no-memory)."]
    return lines


def render_report(run: RunFiles) -> str:
    """report.md of a run directory, from whatever its stages wrote."""
    points = eval_points(run)
    name = (run.manifest or run.export or run.eval or {}).get("model")
    name = name.get("name") if isinstance(name, dict) else name
    lines = [f"# {name or 'Run'}: compress -> export -> runtime", "",
             f"Run directory `{run.run_dir}`. Written by `python -m runtime report --run-dir {run.run_dir}` "
             "from the files below (nothing recomputed)."]
    lines += [""] + [f"- {'found' if getattr(run, k) is not None else '**missing**'}: `{rel}`"
                     for k, rel in SOURCES.items()]
    headline = _headline(run, points)
    if headline:
        lines += ["", "## At a glance", ""] + headline
    for present, section in ((run.manifest, _model_section), (run.manifest, _rank_section),
                             (run.eval, lambda r: _accuracy_section(r, points)), (run.export, _export_section),
                             (run.bench, _bench_section)):
        if present is not None:
            lines += [""] + section(run)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plot
_MARKERS = {"fp32": "o", "int8": "s", "fp16": "^"}
_COLORS = {"dense": "tab:gray", "lowrank": "tab:blue"}  # dashed line: dense FP32 top-1


def plot_points(points: list[EvalPoint]) -> list[EvalPoint]:
    """One point per deployable variant: its ONNX-runtime evaluation, else the PyTorch one."""
    chosen: dict[str, EvalPoint] = {}
    for pt in points:
        if pt.variant is None:
            continue
        old = chosen.get(pt.variant)
        if old is None or (old.runs_on.startswith("pytorch") and not pt.runs_on.startswith("pytorch")):
            chosen[pt.variant] = pt
    return [chosen[v.name] for v in BENCH_FILES if v.name in chosen]


def plot_accuracy_vs_size(points: list[EvalPoint], title: str = "") -> bytes | None:
    """PNG: top-1 against parameters and against file bytes, one point per variant (None if none)."""
    import matplotlib  # lazy: a slow import, needed only to draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = plot_points(points)
    if not points:
        return None
    axes_spec = [("parameters (millions)", lambda pt: pt.params and pt.params / 1e6)]
    if any(pt.file_bytes for pt in points):
        axes_spec.append(("deployable file size (MB)", lambda pt: pt.file_bytes and pt.file_bytes / MB))
    fig, axes = plt.subplots(1, len(axes_spec), figsize=(6 * len(axes_spec), 4.5), squeeze=False)
    dense = next((pt for pt in points if pt.variant == "dense-fp32"), None)
    for ax, (label, x_of) in zip(axes[0], axes_spec):
        for pt in points:
            x = x_of(pt)
            if not x:
                continue
            family, precision = pt.variant.split("-")
            ax.scatter([x], [100 * pt.scores["top1"]], marker=_MARKERS.get(precision, "o"), s=70, alpha=0.85,
                       color=_COLORS[family], label=f"{family} {precision} ({pt.runs_on})")
        if dense is not None:
            ax.axhline(100 * dense.scores["top1"], color="tab:gray", lw=0.8, ls="--")
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 %")
        ax.grid(alpha=0.3)
    axes[0][0].set_title("Accuracy vs parameters" + (f" ({title})" if title else ""))
    axes[0][0].legend(fontsize=7)
    if len(axes_spec) > 1:
        axes[0][1].set_title("Accuracy vs bytes")
    fig.tight_layout()

    return figure_png(fig)


def write_report(run_dir) -> dict:
    """Write D/report.md (and D/accuracy_vs_size.png when eval.json exists); returns paths + missing."""
    run = load_run(run_dir)
    points = eval_points(run)
    written = {}
    png = plot_accuracy_vs_size(points, (run.eval or {}).get("model", ""))
    if png is not None:
        written["plot"] = run.run_dir / PLOT
        atomic_write_bytes(written["plot"], png)
    else:
        (run.run_dir / PLOT).unlink(missing_ok=True)  # a stale plot would contradict the report
    written["report"] = run.run_dir / REPORT
    atomic_write_text(written["report"], render_report(run))
    log.info("wrote %s", written["report"])
    return {"paths": written, "missing": run.missing}


# ----------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, type=Path,
                   help="run directory with compressed/, onnx/, bench/, eval.json (make all OUT=...)")


def main(args: argparse.Namespace) -> int:
    result = write_report(args.run_dir)
    if result["missing"]:
        print("missing (sections left out): " + ", ".join(result["missing"]))
    print("wrote " + ", ".join(str(p) for p in result["paths"].values()))
    return 0
