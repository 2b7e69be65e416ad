"""Wall time and peak memory of the whole compress stage (`make bench-compress`).

    python -m compress.benchmark --models deit_tiny_patch16_224,deit_small_patch16_224 \
        --images 64,128,256 --out runs/bench-compress

Each (model, image count) runs in a fresh child process (`python -m compress.benchmark
--one ...`) doing exactly what `python -m compress` does with random-init weights and real
224-px ImageNet images; wall time is measured around the child (interpreter start and
imports included) and peak RSS is the child's own maximum resident set. The statistics
cache is off, so every run does every pass. Results: OUT/bench_compress.json and a
Markdown table OUT/bench_compress.md, written atomically.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from cliutil import atomic_write_text, write_json

from .pipeline import Config, run

DEFAULT_ARCHIVE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "imagenet-samples" / \
    "imagenet-samples.tar"
DEFAULT_MODELS = "deit_tiny_patch16_224,deit_small_patch16_224,deit_base_patch16_224"


def image_dir(archive: Path, cache: Path) -> Path:
    """Extract the JPEGs of ``archive`` once into ``cache`` (atomically) and return the folder."""
    target = cache / archive.stem
    if target.is_dir() and any(target.iterdir()):
        return target
    if not archive.is_file():
        sys.exit(f"error: image archive {archive} not found; pass --archive")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{archive.stem}.", dir=cache))
    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            if m.isfile() and Path(m.name).suffix.lower() in (".jpeg", ".jpg", ".png"):
                f = tar.extractfile(m)
                (tmp / Path(m.name).name).write_bytes(f.read())
    os.replace(tmp, target)
    return target


def run_one(args) -> dict:
    """In the child: the compress stage, then this process's own peak RSS."""
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Config(model=args.model, out=str(Path(tmp) / "out"), pretrained=False, calib=args.calib,
                     num_calib=args.num, ratio=args.ratio, comp_rank=args.comp_rank, stats_cache=None,
                     quant=not args.no_quant, comp_images=args.comp_images, gram_precision=args.gram_precision)
        r = run(cfg)
    m = r.manifest
    return {"timings": m["timings"], "params_before": m["params"]["before"], "params_after": m["params"]["after"],
            "removed_ratio": m["params"]["removed_ratio"], "images": m["calibration"]["images"],
            "agreement_fp32": m["agreement"]["compressed_fp32_vs_dense"]["top1_agreement"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "torch_threads": torch.get_num_threads()}


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m compress.benchmark", description=__doc__.split("\n")[0])
    p.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated timm names")
    p.add_argument("--images", default="64,128,256", help="comma-separated calibration image counts")
    p.add_argument("--ratio", type=float, default=0.6)
    p.add_argument("--comp-rank", type=int, default=8)
    p.add_argument("--no-quant", action="store_true")
    p.add_argument("--comp-images", type=int, default=64, help="as python -m compress --comp-images")
    p.add_argument("--gram-precision", default="float64", choices=("float64", "float32"))
    p.add_argument("--threads", type=int, default=0, help="torch threads in each run (0: default)")
    p.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE)
    p.add_argument("--cache", type=Path, default=Path(os.environ.get(
        "VIT_EDGE_CACHE", Path.home() / ".cache" / "vit-edge")))
    p.add_argument("--out", type=Path, default=Path("runs/bench-compress"))
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--num", type=int, help=argparse.SUPPRESS)
    p.add_argument("--calib", help=argparse.SUPPRESS)
    return p


def markdown(records: list[dict]) -> str:
    lines = ["| model | images | wall (s) | peak RSS (MB) | stats | factorise | compensate | quantize | "
             "params before -> after | removed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['images_requested']} | failed: {r['error'][:60]} |||||||")
            continue
        t = r["timings"]
        lines.append(f"| {r['model']} | {r['images']} | {r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{t['statistics']:.1f} | {t['factorisation']:.1f} | {t['compensation']:.1f} | "
                     f"{t['quantization']:.1f} | {r['params_before']:,} -> {r['params_after']:,} | "
                     f"{r['removed_ratio']:.1%} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args)))
        return 0
    calib = image_dir(args.archive.resolve(), args.cache)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
               "loadavg_at_start": os.getloadavg()}
    records = []
    for model in args.models.split(","):
        for n in (int(v) for v in args.images.split(",")):
            cmd = [sys.executable, "-m", "compress.benchmark", "--one", "--model", model, "--num", str(n),
                   "--calib", str(calib), "--ratio", str(args.ratio), "--comp-rank", str(args.comp_rank),
                   "--threads", str(args.threads), "--comp-images", str(args.comp_images),
                   "--gram-precision", args.gram_precision] + (["--no-quant"] if args.no_quant else [])
            t0 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            rec = {"model": model, "images_requested": n, "wall_s": round(wall, 2), "ratio": args.ratio,
                   "comp_images": args.comp_images, "gram_precision": args.gram_precision,
                   "threads_arg": args.threads, "loadavg": os.getloadavg()}
            if p.returncode == 0:
                rec.update(json.loads(p.stdout.strip().splitlines()[-1]))
            else:
                rec["error"] = (p.stderr.strip().splitlines() or ["?"])[-1]
            records.append(rec)
            print(json.dumps(rec), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"command": " ".join([Path(sys.executable).name, "-m", "compress.benchmark", *(argv or sys.argv[1:])]),
              "machine": machine, "records": records}
    write_json(args.out / "bench_compress.json", result, indent=1)
    atomic_write_text(args.out / "bench_compress.md", markdown(records))
    print(markdown(records))
    return 0 if all("error" not in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
