"""The least compression that meets a target latency or INT8 file size: a bisection over the ratio.

    python -m runtime fit --model vit_cifar_ref --target-latency-ms 3 --backend ort --batch-size 1 --out runs/fit
    python -m runtime fit --model vit_cifar_ref --target-size-mb 1.0 --out runs/fit-size

Each candidate ratio is compressed (the first candidate's statistics and factorisation serve
every later one), exported, and measured: the file size of model.<precision>.onnx, or its
p50 latency at the given batch size on the chosen backend. The search first tries
``--max-ratio`` (if even that misses, it says so and stops), then halves the interval
[0, max-ratio] ``--iterations - 1`` times, keeping the upper end on the meeting side.
The answer is the smallest measured ratio that meets the target (highest accuracy).

Latency is noisy on a shared machine, so every candidate is timed interleaved with the dense
FP32 model in the same run (runtime.benchmark's round-robin schedule), and its latency is
taken as (candidate p50 / dense p50 of that run) x (median dense p50 over all runs so far)
(runtime.workflows.run.normalised_latency). Decisions use the estimate available at the time; the
final choice is re-made with the final scale. File sizes are exact and need no such care.

Writes D/candidates/r<ratio>/ (run directories with a report.md each), D/fit.json, D/fit.md
and D/best -> the chosen candidate.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from cliutil import atomic_write_text, write_json
from export import ExportOptions
from runtime.backends import thread_options
from runtime.benchmark import BenchConfig
from runtime.errors import RuntimeStageError
from runtime.workflows.report import write_report
from runtime.workflows.layout import ratio_dir
from runtime.workflows.run import bench_stage, compress_stage, export_stage, normalised_latency
from runtime.workflows.sweep import add_model_arguments, base_config, quiet_exporters, set_threads

log = logging.getLogger(__name__)

SCHEMA = 1


@dataclass(frozen=True)
class FitConfig:
    """What to meet and how to measure it (the model and method are a compress Config)."""
    out: str
    target_latency_ms: float | None = None
    target_size_mb: float | None = None   # of model.<precision>.onnx, MB = 10^6 bytes
    precision: str = "int8"
    backend: str = "ort"
    batch_size: int = 1
    iterations: int = 6
    max_ratio: float = 0.8
    threads: int | None = None
    warmup: int = 5
    repeats: int = 30
    num_parity: int = 16

    def __post_init__(self):
        if (self.target_latency_ms is None) == (self.target_size_mb is None):
            raise RuntimeStageError("give exactly one target: --target-latency-ms or --target-size-mb")
        target = self.target_latency_ms if self.target_size_mb is None else self.target_size_mb
        if not target > 0:
            raise RuntimeStageError(f"the target must be > 0, got {target}")
        if self.precision not in ("fp32", "int8"):
            raise RuntimeStageError(f"--precision must be fp32 or int8, got {self.precision!r}")
        if not 0 < self.max_ratio < 1:
            raise RuntimeStageError(f"--max-ratio must be in (0, 1), got {self.max_ratio}")
        if self.iterations < 1 or self.batch_size < 1 or self.repeats < 1 or self.warmup < 0:
            raise RuntimeStageError("--iterations, --batch-size and --repeats must be >= 1, --warmup >= 0")

    @property
    def kind(self) -> str:
        return "latency" if self.target_latency_ms is not None else "size"

    @property
    def target(self) -> float:
        return self.target_latency_ms if self.kind == "latency" else self.target_size_mb

    @property
    def unit(self) -> str:
        return "ms" if self.kind == "latency" else "MB"

    @property
    def variants(self) -> tuple[str, ...]:
        """Benchmarked together: the dense FP32 reference, dense and low-rank at the chosen precision."""
        return tuple(dict.fromkeys(("dense-fp32", f"dense-{self.precision}", f"lowrank-{self.precision}")))


class Search:
    """Candidates measured so far and the estimate of each against the target."""

    def __init__(self, config: FitConfig):
        self.config = config
        self.runs: list[dict] = []   # {"ratio", "dir", "manifest", "export", "bench"}
        self.prepared = None         # the first candidate's statistics and factors, for the next ones

    def value(self, run: dict, family: str = "lowrank") -> float | None:
        """Size in MB, or latency in ms on the common clock of every run so far."""
        c = self.config
        if c.kind == "size":
            stem = "model" if family == "lowrank" else "dense"
            name = f"{stem}.int8.onnx" if c.precision == "int8" else f"{stem}.onnx"
            return run["export"]["files"][name]["bytes"] / 1e6
        benches = [r["bench"] for r in self.runs]
        return normalised_latency(benches, f"{family}-{c.precision}", c.batch_size)[self.runs.index(run)]

    def meets(self, run: dict, family: str = "lowrank") -> bool:
        v = self.value(run, family)
        return v is not None and v <= self.config.target

    def table(self) -> list[dict]:
        return [{"ratio": r["ratio"], "dir": str(r["dir"]), "params": r["manifest"]["params"]["after"],
                 "removed_ratio": r["manifest"]["params"]["removed_ratio"], "value": self.value(r),
                 "dense_value": self.value(r, "dense"), "meets": self.meets(r),
                 "stats_from_cache": r["manifest"]["calibration"]["stats_from_cache"]} for r in self.runs]


def measure(base, config: FitConfig, ratio: float, search: Search) -> dict:
    """Compress + export (+ benchmark) one candidate and add it to ``search``."""
    rd = ratio_dir(Path(config.out) / "candidates", ratio)
    result = compress_stage(base, ratio, rd, reuse=search.prepared)
    manifest, search.prepared = result.manifest, result.prepared
    export = export_stage(rd, ExportOptions(int8=config.precision == "int8", fp16=False, calib=base.calib,
                                                   num_parity=config.num_parity, threads=config.threads or 1,
                                                   device=base.device))
    bench = None
    if config.kind == "latency":
        options = thread_options(config.backend, config.threads)
        bench = bench_stage(rd, BenchConfig(backend=config.backend, batch_sizes=(config.batch_size,),
                                                   warmup=config.warmup, repeats=config.repeats, options=options,
                                                   variants=config.variants, memory=False))
    write_report(rd)
    run = {"ratio": ratio, "dir": rd, "manifest": manifest, "export": export, "bench": bench}
    search.runs.append(run)
    log.info("ratio %.4g: %s %.3f %s (target %g) -> %s", ratio, config.kind, search.value(run), config.unit,
             config.target, "meets" if search.meets(run) else "misses")
    return run


def run_fit(base, config: FitConfig) -> dict:
    """Bisect the ratio; returns fit.json (also written to config.out with fit.md and the best link)."""
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    search = Search(config)
    top = measure(base, config, config.max_ratio, search)
    outcome = None
    if not search.meets(top):
        outcome = "unreachable"
    elif search.meets(top, "dense"):
        outcome = "dense"
    else:
        lo, hi = 0.0, config.max_ratio   # lo: known to miss (the dense model), hi: known to meet
        for _ in range(config.iterations - 1):
            mid = round((lo + hi) / 2, 4)
            if mid in (lo, hi):
                break
            if search.meets(measure(base, config, mid, search)):
                hi = mid
            else:
                lo = mid
        outcome = "met"
    return finish(base, config, search, outcome, started)


def finish(base, config: FitConfig, search: Search, outcome: str, started: str) -> dict:
    table = search.table()   # re-estimated with the final clock
    meeting = sorted((row for row in table if row["meets"]), key=lambda row: row["ratio"])
    best = meeting[0] if meeting and outcome == "met" else None
    if outcome == "met" and best is None:  # the final clock moved every candidate over the target
        outcome = "unreachable"
    top = max(table, key=lambda row: row["ratio"])
    message = {
        "met": lambda: (f"ratio {best['ratio']:g} ({best['params']:,} parameters, {best['removed_ratio']:.1%} removed) "
                        f"meets {config.target:g} {config.unit}: {best['value']:.3f} {config.unit} "
                        f"(dense {best['dense_value']:.3f}) after {len(table)} candidates"),
        "dense": lambda: (f"the dense model already meets {config.target:g} {config.unit} "
                          f"({top['dense_value']:.3f} {config.unit} at {config.precision}); no low-rank "
                          "compression needed"),
        "unreachable": lambda: (f"even --max-ratio {config.max_ratio:g} misses the target: {top['value']:.3f} > "
                                f"{config.target:g} {config.unit} (dense {top['dense_value']:.3f})"),
    }[outcome]()
    doc = {"schema": SCHEMA, "started": started,
           "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "target": {"kind": config.kind, "value": config.target, "unit": config.unit,
                      "precision": config.precision, "backend": config.backend if config.kind == "latency" else None,
                      "batch_size": config.batch_size if config.kind == "latency" else None},
           "outcome": outcome, "message": message, "best": best, "candidates": table,
           "config": asdict(config) | {"compress": asdict(base)},
           "machine": next((r["bench"]["machine"] for r in search.runs if r["bench"]), None),
           "latency_method": ("candidate p50 / dense-fp32 p50 in the same interleaved run x median dense-fp32 "
                              "p50 over all runs" if config.kind == "latency" else None)}
    write_outputs(doc, config.out)
    return doc


def render_markdown(doc: dict) -> str:
    t = doc["target"]
    what = (f"p50 latency of the low-rank {t['precision']} model at batch {t['batch_size']} on `{t['backend']}`"
            if t["kind"] == "latency" else f"size of the low-rank {t['precision']} ONNX file")
    lines = [f"# Fit: {what} <= {t['value']:g} {t['unit']}", "", doc["message"], "",
             f"| ratio | params | removed | {t['kind']} {t['unit']} | dense {t['unit']} | meets | stats |",
             "|---:|---:|---:|---:|---:|---|---|"]
    for row in sorted(doc["candidates"], key=lambda r: r["ratio"]):
        lines.append(f"| {row['ratio']:g} | {row['params']:,} | {row['removed_ratio']:.1%} | {row['value']:.3f} "
                     f"| {row['dense_value']:.3f} | {'yes' if row['meets'] else 'no'} "
                     f"| {'cache' if row['stats_from_cache'] else 'computed'} |")
    if doc["latency_method"]:
        lines += ["", f"Latency: {doc['latency_method']} (runtime.workflows.run.normalised_latency)."]
    return "\n".join(lines) + "\n"


def write_outputs(doc: dict, out) -> None:
    out = Path(out)
    write_json(out / "fit.json", doc)
    atomic_write_text(out / "fit.md", render_markdown(doc))
    link = out / "best"
    if doc["best"] is not None:
        tmp = out / f".best.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(os.path.relpath(doc["best"]["dir"], out), tmp)
        os.replace(tmp, link)
    elif link.is_symlink():
        link.unlink()


# ----------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    t = p.add_mutually_exclusive_group(required=True)
    t.add_argument("--target-latency-ms", type=float, help="p50 latency to meet on --backend at --batch-size")
    t.add_argument("--target-size-mb", type=float, help="size of the low-rank ONNX file (--precision) to meet")
    p.add_argument("--precision", default="int8", choices=("fp32", "int8"),
                   help="which low-rank file is measured: model.onnx or model.int8.onnx (default int8)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--iterations", type=int, default=6, help="candidates to measure at most (default 6)")
    p.add_argument("--max-ratio", type=float, default=0.8, help="most compression to try (default 0.8)")
    p.add_argument("--repeats", type=int, default=30, help="timed runs per variant and candidate (default 30)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--num-parity", type=int, default=16, help="images per export parity check (default 16)")
    p.add_argument("--out", required=True, help="output directory: fit.json, fit.md, best/, candidates/")


def main(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    quiet_exporters()
    config = FitConfig(out=args.out, target_latency_ms=args.target_latency_ms, target_size_mb=args.target_size_mb,
                       precision=args.precision, backend=args.backend, batch_size=args.batch_size,
                       iterations=args.iterations, max_ratio=args.max_ratio, threads=args.threads,
                       warmup=args.warmup, repeats=args.repeats, num_parity=args.num_parity)
    doc = run_fit(base_config(args, config.max_ratio, args.out), config)
    print(render_markdown(doc))
    print(doc["message"])
    return 0 if doc["outcome"] in ("met", "dense") else 1
