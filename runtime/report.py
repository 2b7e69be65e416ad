"""Write a benchmark result as bench.json, bench.md (tables) and bench.png (bar charts).

Every file is written atomically (cliutil: a temporary name beside its target, then os.replace),
so an interrupted run never leaves a half-written report.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cliutil import atomic_write_bytes, atomic_write_text, figure_png, write_json
from runtime.machine import describe_machine

MB = 1e6


def _fmt(x, spec=".2f", none="-"):
    return none if x is None else format(x, spec)


def _mb(n):
    return None if n is None else n / MB


def _size_table(variants: dict, r32: dict, r8: dict) -> list[str]:
    """One row per variant; device-memory and Jetson-RAM columns only where some backend reported them."""
    procs = {n: v.get("process") or {} for n, v in variants.items()}
    columns = [
        ("precision", lambda n, v: v["precision"]),
        ("file MB", lambda n, v: _fmt(_mb(v["memory"].get("file_bytes")))),
        ("x dense FP32", lambda n, v: _fmt(r32.get(n, {}).get("file_bytes"), ".3f")),
        ("x dense INT8", lambda n, v: _fmt(r8.get(n, {}).get("file_bytes"), ".3f")),
        ("weights MB (by dtype)", lambda n, v: f"{_fmt(_mb(v['memory'].get('weight_bytes')))} ({_by_dtype(v['memory'])})"),
        ("peak RSS MB", lambda n, v: _fmt(_mb(procs[n].get("peak_rss_bytes")), ".1f")),
        ("RSS delta MB", lambda n, v: _fmt(_mb(procs[n].get("peak_rss_delta_bytes")), ".1f")),
    ]
    if any("device_memory_bytes" in v["memory"] for v in variants.values()):
        columns.append(("device/activation MB", lambda n, v: _fmt(_mb(v["memory"].get("device_memory_bytes")))))
    if any(p.get("gpu_bytes") is not None for p in procs.values()):
        columns.append(("GPU MB (NVML)", lambda n, v: _fmt(_mb(procs[n].get("gpu_bytes")), ".1f")))
    if any("tegrastats_ram_delta_bytes" in p for p in procs.values()):
        columns.append(("Jetson RAM delta MB", lambda n, v: _fmt(_mb(procs[n].get("tegrastats_ram_delta_bytes")), ".1f")))
    lines = ["| variant | " + " | ".join(c for c, _ in columns) + " |",
             "|---|" + "|".join("---" if c in ("precision", "weights MB (by dtype)") else "---:" for c, _ in columns) + "|"]
    for name, v in variants.items():
        lines.append(f"| {name} | " + " | ".join(fn(name, v) for _, fn in columns) + " |")
    return lines


def _by_dtype(mem: dict) -> str:
    return ", ".join(f"{k.split('.', 1)[1]} {_mb(n):.2f}" for k, n in mem.items()
                     if k.startswith("weight_bytes.") and n >= 0.005 * MB)


def render_markdown(result: dict) -> str:
    """Size/memory table and latency table, with ratios against dense FP32 and dense INT8."""
    variants, ratios, cfg = result["variants"], result["ratios"], result["config"]
    r32, r8 = ratios.get("dense-fp32", {}), ratios.get("dense-int8", {})
    opts = ", ".join(f"{k}={v}" for k, v in cfg.get("options", {}).items()) or "defaults"
    lines = [
        f"# Benchmark: {result['onnx_dir']}",
        "",
        f"Backend `{cfg['backend']}` ({opts}); warm-up {cfg['warmup']}, {cfg['repeats']} timed runs per "
        "variant and batch size, interleaved round-robin across variants.",
        f"Machine: {describe_machine(result['machine'])}.",
        f"Measured {result['started']} to {result['finished']}.",
        "",
        "## Size and memory",
        "",
    ]
    lines += _size_table(variants, r32, r8)
    lines += [
        "",
        "RSS delta: peak resident memory of a fresh process running the variant at every batch size, "
        "minus its footprint after importing the runtime and before opening the model.",
        "",
        "## Latency",
        "",
        "| batch | variant | p50 ms | p90 ms | p99 ms | img/s | p50 x dense FP32 | p50 x dense INT8 |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for bs in [str(b) for b in cfg["batch_sizes"]]:
        for name, v in variants.items():
            lat = v["latency"].get(bs)
            if lat is None:
                continue
            lines.append(
                f"| {bs} | {name} | {lat['p50_ms']:.2f} | {lat['p90_ms']:.2f} | {lat['p99_ms']:.2f} "
                f"| {lat['throughput_ips']:.1f} | {_fmt(r32.get(name, {}).get('p50', {}).get(bs), '.3f')} "
                f"| {_fmt(r8.get(name, {}).get('p50', {}).get(bs), '.3f')} |")
    skipped = {n: v["skipped"] for n, v in variants.items() if v.get("skipped")}
    if skipped:
        lines += ["", "Skipped (fixed batch): " + "; ".join(f"{n} at batch {s}" for n, s in skipped.items())]
    if result.get("left_out"):
        lines += ["", "Not measured on this backend: " + "; ".join(f"{n} ({why})" for n, why in result["left_out"].items())]
    lines += _predicted_lines(result.get("predicted"))
    check = result.get("export_report")
    if check:
        bad = [f for f, c in check.items() if not c["match"]]
        lines += ["", "export_report.json file and initializer bytes: " + (
            "all match the files" if not bad else "MISMATCH for " + ", ".join(bad))]
    return "\n".join(lines) + "\n"


def _predicted_lines(pred: dict | None) -> list[str]:
    """Predicted (compress, from the latency table) beside measured p50 (here)."""
    if not pred:
        return []
    t = pred["table"]
    lines = ["", f"## Predicted by the latency table ({t['backend']}, {t['machine'].get('cpu')}) vs measured", "",
             "| variant | batch | predicted ms | measured p50 ms | measured / predicted |", "|---|---:|---:|---:|---:|"]
    for name, per in pred["variants"].items():
        for bs, r in per.items():
            m = r["measured_p50_ms"]
            lines.append(f"| {name} | {bs} | {r['predicted_ms']:.2f} | {_fmt(m)} | "
                         f"{_fmt(None if m is None else m / r['predicted_ms'], '.2f')} |")
    return lines


def plot(result: dict) -> bytes:
    """PNG bytes: p50 latency per image by batch size (p90 whiskers), and file size by weight dtype."""
    import matplotlib  # lazy: a slow import, needed only to draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = result["variants"]
    names = list(variants)
    batches = [str(b) for b in result["config"]["batch_sizes"]]
    fig, (ax_lat, ax_size) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        lat = variants[name]["latency"]
        xs = [j + i * width for j, bs in enumerate(batches) if bs in lat]
        p50 = [lat[bs]["p50_ms"] / int(bs) for bs in batches if bs in lat]
        p90 = [lat[bs]["p90_ms"] / int(bs) for bs in batches if bs in lat]
        ax_lat.bar(xs, p50, width, label=name, yerr=[np.zeros(len(p50)), np.subtract(p90, p50)], capsize=2)
    ax_lat.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
    ax_lat.set_ylabel("p50 latency per image (ms), whisker to p90")
    ax_lat.set_title(f"Latency ({result['config']['backend']})")
    ax_lat.legend(fontsize=8)

    dtypes = sorted({k for v in variants.values() for k in v["memory"] if k.startswith("weight_bytes.")})
    bottom = np.zeros(len(names))
    for key in dtypes:
        vals = np.array([variants[n]["memory"].get(key, 0) / MB for n in names])
        ax_size.bar(names, vals, bottom=bottom, label=key.split(".", 1)[1])
        bottom += vals
    other = np.array([(variants[n]["memory"].get("file_bytes", 0) - variants[n]["memory"].get("weight_bytes", 0)) / MB
                      for n in names])
    ax_size.bar(names, np.maximum(other, 0), bottom=bottom, label="graph/other", color="lightgray")
    ax_size.set_ylabel("file MB")
    ax_size.set_title("File size by weight dtype")
    ax_size.tick_params(axis="x", rotation=30)
    ax_size.legend(fontsize=8)
    fig.tight_layout()
    return figure_png(fig)


def write_outputs(result: dict, out_dir) -> dict[str, Path]:
    """Write bench.json, bench.md and bench.png into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "bench.json", "md": out_dir / "bench.md", "png": out_dir / "bench.png"}
    write_json(paths["json"], result)
    atomic_write_text(paths["md"], render_markdown(result))
    atomic_write_bytes(paths["png"], plot(result))
    return paths
