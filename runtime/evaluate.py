"""Accuracy harness: top-1/top-5 on real labelled images for every variant of a model,
plus agreement with the dense model (top-1 agreement, logit cosine, KL(dense || variant)).

Variants are plain callables ``images (N,3,H,W float32 tensor) -> logits``: the dense
PyTorch model, the compressed one (with or without INT8 fake-quant) and ONNX files run
through a runtime backend. Images are decoded once and fed to every variant batch by batch.

    python -m runtime eval --compressed runs/x/compressed --onnx-dir runs/x/onnx --data cifar10-test
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from calibration_data import IMAGENET_WNIDS, cifar10_test_set, default_evaluation_for, load_image_set, make_loader
import compress
from compress import apply_fake_quant_, fingerprint, has_head, load_dense, num_classes
from export import FILES
from cliutil import write_json
from runtime.backends import open_backend
from runtime.errors import RuntimeStageError

log = logging.getLogger(__name__)

Variant = Callable[[torch.Tensor], np.ndarray]
ONNX_ORDER = tuple(f.filename for f in FILES if f.precision != "int8-fp16")   # what --onnx-dir evaluates


@dataclass(frozen=True)
class Scores:
    """Accuracy of one variant; agreement fields are None for the reference itself. A headless
    model's outputs are features: no top-1/top-5/KL, its agreement is cosine and relative error."""
    n: int
    top1: float | None
    top5: float | None
    agreement: float | None = None
    cosine: float | None = None
    kl: float | None = None
    seconds: float = 0.0
    rel_error: float | None = None


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def score(logits: np.ndarray, labels: np.ndarray, reference: np.ndarray | None = None,
          seconds: float = 0.0, features: bool = False) -> Scores:
    """Top-1/top-5 against labels and, given reference logits, agreement/cosine/KL; for ``features``
    (a headless model) only the cosine and relative error against the reference features."""
    logits = np.asarray(logits, dtype=np.float64)
    if not np.isfinite(logits).all():
        raise ValueError("non-finite logits: the variant produced NaN/Inf")
    if features:
        if reference is None:
            return Scores(len(logits), None, None, seconds=seconds)
        f, ref = logits.reshape(len(logits), -1), np.asarray(reference, dtype=np.float64).reshape(len(logits), -1)
        cos = (ref * f).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(f, axis=1) + 1e-30)
        rel = float(np.linalg.norm(f - ref) / max(np.linalg.norm(ref), 1e-30))
        return Scores(len(f), None, None, cosine=float(cos.mean()), seconds=seconds, rel_error=rel)
    k = min(5, logits.shape[1])
    top = np.argsort(-logits, axis=1)[:, :k]
    top1 = float((top[:, 0] == labels).mean())
    top5 = float((top == labels[:, None]).any(axis=1).mean())
    if reference is None:
        return Scores(len(labels), top1, top5, seconds=seconds)
    ref = np.asarray(reference, dtype=np.float64)
    agreement = float((ref.argmax(1) == top[:, 0]).mean())
    cos = (ref * logits).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(logits, axis=1) + 1e-30)
    lp, lq = _log_softmax(ref), _log_softmax(logits)
    kl = float((np.exp(lp) * (lp - lq)).sum(1).mean())
    return Scores(len(labels), top1, top5, agreement, float(cos.mean()), kl, seconds)


def evaluate(variants: dict[str, Variant], loader, reference: str | None = None,
             progress: bool = True, features: bool = False) -> dict[str, Scores]:
    """Run every variant on every batch; score against labels and the reference variant (headless
    ``features``: against the reference only, labels unused)."""
    outs: dict[str, list[np.ndarray]] = {k: [] for k in variants}
    secs = dict.fromkeys(variants, 0.0)
    labels = []
    for x, y in tqdm(loader, desc="evaluating", unit="batch", disable=not progress, mininterval=2):
        if (y < 0).any() and not features:
            raise ValueError("the evaluation images are unlabelled; pass an ImageFolder or a labelled set")
        labels.append(y.numpy())
        for name, fn in variants.items():
            t = time.perf_counter()
            outs[name].append(np.asarray(fn(x), dtype=np.float32))
            secs[name] += time.perf_counter() - t
    y = np.concatenate(labels)
    logits = {k: np.concatenate(v) for k, v in outs.items()}
    ref = logits.get(reference) if reference else None
    return {k: score(v, y, None if k == reference else ref, secs[k], features) for k, v in logits.items()}


def torch_variant(model: torch.nn.Module) -> Variant:
    model.eval()

    def run(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return model(x).float().numpy()
    return run


def backend_variant(backend) -> Variant:
    return lambda x: backend.run(x.numpy())


def resolve_data(spec: str | None, model_name, num: int | None = None, seed: int = 0):
    """The evaluation ImageSet: a folder, a bundled set name, 'cifar10-test', or the default of the
    model (a model, or a timm name)."""
    spec = spec or default_evaluation_for(model_name)
    if spec in ("cifar10-test", "cifar10:test"):
        return cifar10_test_set(num=num, seed=seed)
    return load_image_set(spec, num=num, seed=seed)




def model_class_names(model: torch.nn.Module) -> tuple[str, ...] | None:
    """The model's class names in output order: its pretrained_cfg's label_names, ImageNet's
    WordNet ids for a 1000-class model, else None (only the count is known)."""
    n = num_classes(model)
    names = tuple((getattr(model, "pretrained_cfg", None) or {}).get("label_names") or ())
    if names and len(names) == n:
        return names
    if n == 1000 and IMAGENET_WNIDS.is_file():
        return tuple(IMAGENET_WNIDS.read_text().split())
    return None


def match_classes(images, model: torch.nn.Module, what: str = "--data"):
    """``images`` with labels in the model's class order; refuses (RuntimeStageError) unlabelled
    images, class folders the model does not have, and a class count that differs from the
    model's when its class names are unknown. Scoring such a set would give silent wrong numbers."""
    if not images.labelled:
        raise RuntimeStageError(f"{what} {images.root} is unlabelled (a flat folder); evaluation needs one "
                                "subfolder per class, ImageNet <wnid>_*.JPEG names, or cifar10-test")
    n = num_classes(model)
    names = model_class_names(model)
    if names is None:
        if len(images.classes) != n:
            raise RuntimeStageError(f"{what} {images.root} has {len(images.classes)} classes, the model "
                                    f"predicts {n}")
        return images
    if tuple(images.classes) == names:
        return images
    index = {c: i for i, c in enumerate(names)}
    unknown = [c for c in images.classes if c not in index]
    if unknown:
        shown = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        expect = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise RuntimeStageError(f"{what} {images.root}: class folder(s) {shown} are not classes of the model "
                                f"({n} classes: {expect})")
    labels = tuple(index[images.classes[y]] for y in images.labels)
    return dataclasses.replace(images, labels=labels, classes=names)


def check_onnx_origin(onnx_file: Path, compressed: Path, expected: str | None = None) -> None:
    """The ONNX file must come from ``compressed``: export_report.json beside it records the
    compressed model's fingerprint and every file's sha256 (export.pipeline)."""
    onnx_file = Path(onnx_file)
    report_path = onnx_file.parent / "export_report.json"
    try:
        report = json.loads(report_path.read_text())
        source = report["source"]["fingerprint"]
        want = report["files"][onnx_file.name]["sha256"]
    except FileNotFoundError:
        raise RuntimeStageError(f"{onnx_file} has no export_report.json beside it: cannot tell which model "
                                "it was exported from (export it with python -m export)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RuntimeStageError(f"{report_path} does not record the origin of {onnx_file.name} "
                                f"({type(e).__name__}: {e}); re-export with python -m export") from None
    expected = expected or fingerprint(compressed)
    if source != expected:
        raise RuntimeStageError(f"{onnx_file} was exported from another model (fingerprint {source}), "
                                f"not from {compressed} ({expected})")
    h = hashlib.sha256()
    with open(onnx_file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest()[:16] != want:
        raise RuntimeStageError(f"{onnx_file} is not the file export wrote (sha256 differs from "
                                f"{report_path.name}); re-export")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compressed", type=Path, help="compressed model directory (from python -m compress)")
    p.add_argument("--model", help="dense model (timm name or bundled reference) when no --compressed")
    p.add_argument("--checkpoint", type=Path, help="local checkpoint for --model")
    p.add_argument("--onnx-dir", type=Path, help="export directory: every *.onnx in it is evaluated via --backend")
    p.add_argument("--onnx", type=Path, action="append", default=[], help="one ONNX file (repeatable)")
    p.add_argument("--backend", default="ort", help="runtime backend for ONNX files (default: ort)")
    p.add_argument("--data", help="image folder, bundled set name, or 'cifar10-test' (full 10k test split); "
                                  "default: the bundled eval set for the model")
    p.add_argument("--num", type=int, help="seeded subset of N images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--no-fake-quant", action="store_true", help="skip the INT8 fake-quant PyTorch variant")
    p.add_argument("--out", type=Path, help="write the JSON result here")


def _onnx_files(args) -> list[Path]:
    for f in args.onnx:
        if not Path(f).is_file():
            raise RuntimeStageError(f"--onnx {f} is not a file")
    files = [Path(f) for f in args.onnx]
    if args.onnx_dir is not None:
        d = Path(args.onnx_dir)
        if not d.is_dir():
            raise RuntimeStageError(f"--onnx-dir {d} is not a directory (run python -m export first)")
        found = [d / f for f in ONNX_ORDER if (d / f).is_file()]
        if not found:
            raise RuntimeStageError(f"--onnx-dir {d} holds none of {', '.join(ONNX_ORDER)}")
        files += found
    return files


def _check_args(args) -> None:
    if args.batch_size < 1:
        raise RuntimeStageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.num is not None and args.num < 1:
        raise RuntimeStageError(f"--num must be >= 1, got {args.num}")


def _variants(args):
    """Build the variants asked for: (variants, model name, info, backends to close, dense model)."""
    variants: dict[str, Variant] = {}
    closers = []
    if args.compressed:
        model, manifest = compress.load_compressed(args.compressed)
        spec = manifest["model"]
        dense = load_dense(manifest)
        variants["dense"] = torch_variant(dense)
        variants["compressed"] = torch_variant(model)
        act_ranges = manifest.get("quant", {}).get("act_ranges")
        if act_ranges and not args.no_fake_quant:
            fq, _ = compress.load_compressed(args.compressed)
            apply_fake_quant_(fq, act_ranges)
            variants["compressed-int8-fakequant"] = torch_variant(fq)
        name, info = spec["name"], {"compressed": str(args.compressed), "manifest_params": manifest.get("params")}
    elif args.model:
        dense = compress.load_model(args.model, checkpoint=args.checkpoint)
        variants["dense"] = torch_variant(dense)
        name, info = args.model, {}
    else:
        raise compress.CompressError("nothing to evaluate: pass --compressed DIR or --model NAME")
    onnx_files = _onnx_files(args)
    if args.compressed:
        expected = info["fingerprint"] = fingerprint(args.compressed)
        for f in onnx_files:
            check_onnx_origin(f, args.compressed, expected)
    if onnx_files:
        for f in onnx_files:
            backend = open_backend(args.backend, f)
            closers.append(backend)
            variants[f"{args.backend}:{Path(f).name}"] = backend_variant(backend)
    info["data_config_model"] = name
    return variants, name, info, closers, dense


def main(args: argparse.Namespace) -> int:
    _check_args(args)
    variants, name, info, closers, dense = _variants(args)
    try:
        features = not has_head(dense)   # headless: feature agreement with the dense model, no labels
        images = resolve_data(args.data, dense, args.num, args.seed)
        images = images if features else match_classes(images, dense)
        loader = make_loader(images, dense, batch_size=args.batch_size)
        scores = evaluate(variants, loader, reference="dense", features=features)
    finally:
        for b in closers:
            b.close()
    result = result_document(name, images, args.seed, info, scores)
    print(format_table(scores))
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0


def result_document(name: str, images, seed: int, info: dict, scores: dict[str, Scores]) -> dict:
    """The eval.json document: model, data, extra info, and the scores of every variant."""
    return {"model": name, "data": {"root": images.root, "num_images": len(images), "seed": seed}, **info,
            "variants": {k: asdict(v) for k, v in scores.items()}}


def format_table(scores: dict[str, Scores]) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}"
    if all(s.top1 is None for s in scores.values()):   # headless model: final features
        rows = ["| variant | images | feature cosine | feature rel. error |", "|---|---|---|---|"]
        for k, s in scores.items():
            cos = "-" if s.cosine is None else f"{s.cosine:.5f}"
            rel = "-" if s.rel_error is None else f"{s.rel_error:.5f}"
            rows.append(f"| {k} | {s.n} | {cos} | {rel} |")
        return "\n".join(rows)
    rows = ["| variant | images | top-1 % | top-5 % | agree % | cosine | KL |", "|---|---|---|---|---|---|---|"]
    for k, s in scores.items():
        cos = "-" if s.cosine is None else f"{s.cosine:.5f}"
        kl = "-" if s.kl is None else f"{s.kl:.5f}"
        rows.append(f"| {k} | {s.n} | {pct(s.top1)} | {pct(s.top5)} | {pct(s.agreement)} | {cos} | {kl} |")
    return "\n".join(rows)
