"""The paper's comparison on our models: every factorisation method, uniform vs mixed ranks,
with and without compensation, at equal parameter budgets, plus INT8 on top of the default.
With --finetune-steps N, extra rows give the default method after recovery fine-tuning
(distillation on the calibration images, beyond the paper), labelled "+ FT(N steps)" with its cost;
every other row, and the comparison with smaller dense models, stays without fine-tuning.

One calibration pass (compress's statistics cache serves every later configuration); the
evaluation images are decoded once and kept as a tensor; every configuration is scored on
them against the dense model (top-1, agreement, KL). Results: study.json, study.md and
study.png (top-1 vs fraction of parameters removed, one line per method/allocation).

    python -m runtime study --model vit_cifar_ref --data cifar10-test --out runs/study
"""
from __future__ import annotations

import argparse
import itertools
import logging
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from runtime.errors import RuntimeStageError
from runtime.evaluate import Scores, score, write_json
from runtime.report import atomic_write_bytes, figure_png

log = logging.getLogger(__name__)

METHODS = ("plain", "diag", "mean-input", "whiten")
ALLOCATIONS = ("uniform", "mixed")
DEFAULT = ("whiten", "mixed")


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(t) for t in text.split(",") if t.strip())


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="vit_cifar_ref", help="timm model name (default: vit_cifar_ref)")
    p.add_argument("--checkpoint", help="local checkpoint for --model")
    p.add_argument("--pretrained", action="store_true", default=None,
                   help="timm's pretrained weights (needs the model hub; bundled for vit_cifar_*)")
    p.add_argument("--calib", help="calibration folder (default: bundled set for the model)")
    p.add_argument("--num-calib", type=int, default=256)
    p.add_argument("--data", default=None, help="evaluation images: folder, bundled name or cifar10-test "
                                                "(default: cifar10-test for vit_cifar_*, else the bundled set)")
    p.add_argument("--num", type=int, help="seeded subset of the evaluation images")
    p.add_argument("--ratios", type=_floats, default=(0.4, 0.5, 0.6, 0.7),
                   help="fractions of all parameters to remove, comma-separated (default: 0.4,0.5,0.6,0.7)")
    p.add_argument("--methods", default=",".join(METHODS), help="factorisation methods, comma-separated")
    p.add_argument("--allocations", default=",".join(ALLOCATIONS), help="rank allocations, comma-separated")
    p.add_argument("--comp-rank", type=int, default=8, help="compensation rank for the 'with' rows")
    p.add_argument("--no-int8", action="store_true", help="skip the INT8 rows")
    p.add_argument("--finetune-steps", type=int, default=0, metavar="N",
                   help="also add the default method (whiten/mixed, compensated) after N steps of recovery "
                        "fine-tuning on the calibration images, FP32 and INT8, as extra rows labelled FT "
                        "(0: none, the default)")
    p.add_argument("--stats-cache", default=None, help="statistics cache dir (default: compress's)")
    p.add_argument("--baseline", action="append", default=[], metavar="MODEL[=CHECKPOINT]",
                   help="a smaller dense model to set against the compressed one at equal parameter count "
                        "(repeatable), e.g. vit_cifar_narrow")
    p.add_argument("--batch-size", type=int, default=250, help="evaluation batch size")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--out", type=Path, required=True, help="folder for study.json, study.md, study.png")


def _eval_tensor(model, data: str | None, model_name: str, num: int | None):
    from calibration_data import make_loader
    from runtime.evaluate import resolve_data

    if data is None and model_name.startswith("vit_cifar"):
        data = "cifar10-test"
    images = resolve_data(data, model_name, num, 0)
    xs, ys = [], []
    for x, y in make_loader(images, model, batch_size=500):
        xs.append(x)
        ys.append(y)
    return images, torch.cat(xs), torch.cat(ys).numpy()


def _logits(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> np.ndarray:
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]).numpy()


def main(args: argparse.Namespace) -> int:
    from compress import load_model
    from compress.pipeline import Config, default_stats_cache, run
    from compress.quantize import apply_fake_quant_
    from tqdm import tqdm

    if args.finetune_steps < 0:
        raise RuntimeStageError(f"--finetune-steps must be >= 0, got {args.finetune_steps}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    allocations = [a for a in args.allocations.split(",") if a]
    dense = load_model(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained)
    images, x, y = _eval_tensor(dense, args.data, args.model, args.num)
    ref = _logits(dense, x, args.batch_size)
    rows = [{"ratio": 0.0, "method": "dense", "allocation": "-", "comp_rank": 0, "int8": False,
             "params": sum(p.numel() for p in dense.parameters()), **asdict(score(ref, y))}]
    for spec in args.baseline:
        name, _, ckpt = spec.partition("=")
        small = load_model(name, checkpoint=ckpt or None)
        rows.append({"ratio": None, "method": f"baseline:{name}", "allocation": "-", "comp_rank": 0,
                     "int8": False, "params": sum(p.numel() for p in small.parameters()),
                     **asdict(score(_logits(small, x, args.batch_size), y, ref))})
    stats_cache = args.stats_cache or str(default_stats_cache())
    # (ratio, method, allocation, comp_rank, int8, finetune_steps); a fine-tuned config is one compress
    # run (the fine-tuning is its costly part) scored in FP32 and, unless --no-int8, with INT8 fake-quant
    configs = [(*c, False, 0) for c in itertools.product(args.ratios, methods, allocations, (0, args.comp_rank))]
    if not args.no_int8:
        configs += [(r, *DEFAULT, args.comp_rank, True, 0) for r in args.ratios]
    if args.finetune_steps:
        configs += [(r, *DEFAULT, args.comp_rank, not args.no_int8, args.finetune_steps) for r in args.ratios]
    work = Path(tempfile.mkdtemp(prefix="study-"))
    try:
        for cfg in tqdm(configs, desc="study", unit="config"):
            ratio, method, allocation, comp, int8, ft = cfg
            t = time.perf_counter()
            res = run(Config(model=args.model, checkpoint=args.checkpoint, pretrained=args.pretrained, calib=args.calib,
                             num_calib=args.num_calib, ratio=ratio, method=method, allocation=allocation,
                             comp_rank=comp, quant=int8, finetune_steps=ft, stats_cache=stats_cache,
                             out=str(work / "c")))
            seconds = time.perf_counter() - t
            model, m = res.model, res.manifest
            for fake_quant in ((False, True) if ft and int8 else (int8,)):
                if fake_quant:
                    apply_fake_quant_(model, m["quant"]["act_ranges"])
                s: Scores = score(_logits(model, x, args.batch_size), y, ref)
                rows.append({"ratio": ratio, "method": method, "allocation": allocation, "comp_rank": comp,
                             "int8": fake_quant, "params": m["params"]["after"],
                             "removed": m["params"]["removed_ratio"], "sum_error": m["errors"]["sum_svd"],
                             "compress_seconds": round(seconds, 1), **asdict(s)})
                if ft:
                    f = m["finetune"]
                    rows[-1].update(finetune_steps=ft, finetune_lr=f["lr"], finetune_seconds=round(f["seconds"], 1),
                                    finetune_images=f["images"])
                log.info("%s", rows[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"model": args.model, "checkpoint": args.checkpoint, "data": images.root,
              "num_images": len(y), "num_calib": args.num_calib, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "study.json", result)
    atomic_write_bytes(args.out / "study.md", format_markdown(result).encode())
    plot(result, args.out / "study.png")
    print(format_markdown(result))
    return 0


def _is_config(row: dict) -> bool:
    return row["method"] != "dense" and not row["method"].startswith("baseline:")


def _ft(row: dict) -> int:
    """Fine-tuning steps of a row (0: the paper's setting, no fine-tuning; older study.json lack the key)."""
    return row.get("finetune_steps", 0)


def _key(row: dict) -> tuple:
    return row["method"], row["allocation"], row["comp_rank"], row["int8"], _ft(row)


def _label(method: str, int8: bool, ft: int) -> str:
    return f"{method}{f' + FT({ft} steps)' if ft else ''}{' + INT8' if int8 else ''}"


def format_markdown(result: dict) -> str:
    rows = result["rows"]
    dense = rows[0]
    ratios = sorted({r["ratio"] for r in rows if _is_config(r)})
    head = ("| method | allocation | compensation | " + " | ".join(f"{100 * r:.0f}% fewer" for r in ratios) + " |")
    out = [f"Top-1 % on {result['num_images']} images of {result['data']} (dense: "
           f"{100 * dense['top1']:.2f}%, {dense['params']:,} parameters), {result['num_calib']} calibration images, "
           "no fine-tuning" + (" except the extra rows marked FT (recovery fine-tuning by distillation on the "
                               "calibration images, beyond the paper; cost below)" if any(_ft(r) for r in rows)
                               else "") + ". Cells: top-1 (agreement with dense).", "", head,
           "|---|---|---|" + "---|" * len(ratios)]
    keys = sorted({_key(r) for r in rows if _is_config(r)},
                  key=lambda k: (k[4], k[3], METHODS.index(k[0]) if k[0] in METHODS else 9, k[1], k[2]))
    for key in keys:
        method, alloc, comp, int8, ft = key
        cells = []
        for ratio in ratios:
            hit = [r for r in rows if _is_config(r) and _key(r) == key and r["ratio"] == ratio]
            cells.append(f"{100 * hit[0]['top1']:.2f} ({100 * hit[0]['agreement']:.1f})" if hit else "-")
        out.append(f"| {_label(method, int8, ft)} | {alloc} | {'q=' + str(comp) if comp else 'off'} | "
                   + " | ".join(cells) + " |")
    tuned = [r for r in rows if _is_config(r) and _ft(r)]
    if tuned:
        out += ["", "Cost of the recovery fine-tuning (FT rows only; seconds of distillation inside compress, "
                "on this machine):", "", "| variant | " + " | ".join(f"{100 * r:.0f}% fewer" for r in ratios) + " |",
                "|---|" + "---|" * len(ratios)]
        for key in sorted({_key(r) for r in tuned}, key=lambda k: (k[3], k[4])):
            cells = []
            for ratio in ratios:
                hit = [r for r in tuned if _key(r) == key and r["ratio"] == ratio]
                cells.append(f"{hit[0]['finetune_seconds']:.1f} s ({hit[0]['finetune_images']} images, "
                             f"lr {hit[0]['finetune_lr']:g})" if hit else "-")
            out.append(f"| {_label(key[0], key[3], key[4])} | " + " | ".join(cells) + " |")
    baselines = [r for r in rows if r["method"].startswith("baseline:")]
    if baselines:
        out += ["", "Compressed model (default method) vs smaller dense models, same images, by parameter count:",
                "", "| model | parameters | top-1 % |", "|---|---:|---:|"]
        best = [r for r in rows if _is_config(r) and (r["method"], r["allocation"]) == DEFAULT and r["comp_rank"]
                and not _ft(r)]
        for r in sorted([dense] + best + baselines, key=lambda r: -r["params"]):
            if r["method"] == "dense":
                label = f"{result['model']} (dense)"
            elif r in baselines:
                label = f"{r['method'].split(':', 1)[1]} (dense, trained with the same recipe)"
            else:
                label = f"{result['model']} {100 * r['ratio']:.0f}% fewer{' + INT8' if r['int8'] else ''}"
            out.append(f"| {label} | {r['params']:,} | {100 * r['top1']:.2f} |")
    return "\n".join(out) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    dense = rows[0]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = sorted({_key(r) for r in rows if _is_config(r)})
    for key in groups:
        method, alloc, comp, int8, ft = key
        pts = sorted((r["ratio"], r["top1"]) for r in rows if _is_config(r) and _key(r) == key)
        style = "--" if ft else "-" if alloc == "mixed" else ":"
        ax.plot([100 * p[0] for p in pts], [100 * p[1] for p in pts], style, marker="o" if comp else "x",
                label=f"{method}/{alloc}/{'comp' if comp else 'no comp'}{'/INT8' if int8 else ''}"
                      f"{f'/FT {ft} steps' if ft else ''}")
    ax.axhline(100 * dense["top1"], color="k", lw=1, label="dense")
    for r in rows:
        if r["method"].startswith("baseline:"):
            ax.plot([100 * (1 - r["params"] / dense["params"])], [100 * r["top1"]], "k*", ms=10,
                    label=f"{r['method'].split(':', 1)[1]} (smaller dense)")
    ax.set_xlabel("% of all parameters removed")
    ax.set_ylabel("top-1 %")
    ax.set_title(f"{result['model']}: accuracy vs compression (no fine-tuning"
                 + (", except dashed FT lines)" if any(_ft(r) for r in rows) else ")"))
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    atomic_write_bytes(path, figure_png(fig, dpi=120))
