"""The method study: every step of the compress stage on and off, at equal parameter budgets,
scored on real labelled images the model was never calibrated on.

One row per variant (``VARIANTS``: a name, what it is, the compress options it sets; every other
option is compress's default) and budget, FP32, plus INT8 fake-quant rows for the variants in
``--int8`` (default: compress's default configuration). Each row reports top-1 with the model's own
head (unchanged), top-1 agreement and KL against the dense model, the cosine of the final features
(what the head reads: the CLS token for ViTs) to the dense model's, mean and min over images, and
the wall time of its compress run. A headless model (no classifier) gets the feature metrics only.
``--baseline`` sets smaller dense models beside the compressed one at their parameter count.

One calibration pass: each configuration reuses the previous one's statistics (and its
factorisation when the method is the same, compress.run(..., reuse=)); the evaluation images
are decoded once. Results: study.json, study.md, study.png.

    python -m runtime study --model vit_small_patch14_imgfocus --pretrained --out runs/study-imgfocus
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from calibration_data import make_loader
from cliutil import atomic_write_bytes, atomic_write_text, figure_png, write_json
from compress import (Config, add_calibration_arguments, add_weights_arguments, config_defaults, default_stats_cache,
                      distributed, fake_quant, features_and_logits, load_model, output_cosine, run)
from runtime.errors import RuntimeStageError
from runtime.evaluate import resolve_data, score

log = logging.getLogger(__name__)

_OFF = dict(method="whiten", allocation="mixed", comp_rank=0, seq_refit=False, recon_steps=0, finetune_steps=0,
            sensitivity_images=0, recon_readout=False,
            recon_readout_weight=0.0, recon_params="factors", sensitivity_target="features",
            finetune_target="features")
_PROBES = config_defaults()["sensitivity_images"]   # the sensitivity rows use compress's own probe count
_FT_LR = config_defaults()["finetune_lr"]   # the slow distillation row uses compress's own step
_SENS_RECON = dict(seq_refit=True, sensitivity_images=_PROBES, recon_steps=-1)
# name -> (what the row shows, the compress options it sets on top of _OFF)
VARIANTS: dict[str, tuple[str, dict]] = {
    "plain": ("plain SVD of W (baseline)", dict(method="plain")),
    "uniform": ("whitened SVD, uniform ranks", dict(allocation="uniform")),
    "whiten": ("whitened SVD, mixed ranks (paper §2-3)", {}),
    "comp": ("+ rank-8 compensation (paper §4)", dict(comp_rank=8)),
    "seq": ("+ sequential refit (held-out validated)", dict(seq_refit=True)),
    "seq+uniform": ("+ sequential refit, uniform ranks", dict(seq_refit=True, allocation="uniform")),
    "sens": ("+ sequential refit, ranks by end-to-end sensitivity", dict(seq_refit=True, sensitivity_images=_PROBES)),
    "recon": ("+ block reconstruction (held-out validated)", dict(recon_steps=-1)),
    "seq+recon": ("+ sequential refit + block reconstruction", dict(seq_refit=True, recon_steps=-1)),
    "sens+recon": ("+ sequential refit, sensitivity ranks, block reconstruction", _SENS_RECON),
    "sens+recon+probes": (f"+ sensitivity ranks measured on {4 * _PROBES} probe images, block reconstruction",
                          dict(_SENS_RECON, sensitivity_images=4 * _PROBES)),
    "sens+recon+block": ("+ sensitivity ranks, block reconstruction of every block parameter (norms, layer scales)",
                         dict(_SENS_RECON, recon_params="block")),
    "sens-kl+recon+block": ("+ sensitivity ranks measured on the head's KL, whole-block reconstruction",
                            dict(_SENS_RECON, recon_params="block", sensitivity_target="logits")),
    "sens+recon+readout": ("+ sensitivity ranks, block reconstruction, last block on what the head reads",
                           dict(_SENS_RECON, recon_readout=True)),
    "sens+recon+readout-all": ("+ sensitivity ranks, block reconstruction, every block also on what the head reads",
                               dict(_SENS_RECON, recon_readout=True, recon_readout_weight=1.0)),
    "sens+recon+distill": ("+ sensitivity ranks, block reconstruction, feature distillation (lr 1e-4)",
                           dict(_SENS_RECON, finetune_steps=-1, finetune_lr=1e-4)),
    "sens+recon+distill-slow": (f"+ sensitivity ranks, block reconstruction, feature distillation (lr {_FT_LR:g})",
                                dict(_SENS_RECON, finetune_steps=-1)),
    "sens+recon+block+distill-logits": (f"+ sensitivity ranks, whole-block reconstruction, logit distillation "
                                        f"(lr {_FT_LR:g}; a headless model's features)",
                                        dict(_SENS_RECON, recon_params="block", finetune_steps=-1,
                                             finetune_target="auto")),
    "distill": ("+ sequential refit + feature distillation", dict(seq_refit=True, finetune_steps=-1)),
    "distill-logits": ("+ sequential refit + logit distillation", dict(seq_refit=True, finetune_steps=-1,
                                                                        finetune_target="logits")),
}
# -1 above: the study's --recon-steps (and --recon-lr) / --finetune-steps (and --finetune-images)


def variant_options(name: str, recon_steps: int, finetune_steps: int, recon_lr: float | None = None,
                    finetune_images: int | None = None) -> dict:
    """The compress options of a row (``recon_lr`` / ``finetune_images`` None: compress's default)."""
    opts = dict(_OFF, **VARIANTS[name][1])
    if opts["recon_steps"] < 0:
        opts["recon_steps"] = recon_steps
        if recon_lr is not None:
            opts["recon_lr"] = recon_lr
    if opts["finetune_steps"] < 0:
        opts["finetune_steps"] = finetune_steps
        if finetune_images is not None:
            opts["finetune_images"] = finetune_images
    return opts


def default_variant(recon_steps: int, finetune_steps: int, recon_lr: float | None = None,
                    finetune_images: int | None = None) -> str | None:
    """The variant equal to compress's own defaults (None if none is)."""
    defaults = config_defaults()
    for name in VARIANTS:
        opts = variant_options(name, recon_steps, finetune_steps, recon_lr, finetune_images)
        if all(defaults[k] == v for k, v in opts.items()):
            return name
    return None


@dataclass(frozen=True)
class StudyConfig:
    model: str
    out: Path
    checkpoint: str | None = None
    pretrained: bool | None = None
    calib: str | None = None
    num_calib: int = config_defaults()["num_calib"]
    data: str | None = None
    num: int | None = None
    ratios: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7)
    variants: tuple[str, ...] = tuple(VARIANTS)
    int8: tuple[str, ...] | None = None      # None: the default variant
    recon_steps: int = 100
    recon_lr: float = config_defaults()["recon_lr"]
    finetune_steps: int = config_defaults()["finetune_steps"]
    finetune_images: int = config_defaults()["finetune_images"]
    baselines: tuple[str, ...] = ()
    stats_cache: str | None = None
    batch_size: int = 100

    def __post_init__(self):
        unknown = [v for v in self.variants + (self.int8 or ()) if v not in VARIANTS]
        if unknown:
            raise RuntimeStageError(f"unknown study variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
        if self.recon_steps < 1 or self.finetune_steps < 1:
            raise RuntimeStageError("--recon-steps and --finetune-steps must be >= 1 (they size their rows)")
        if not self.recon_lr > 0:
            raise RuntimeStageError(f"--recon-lr must be > 0, got {self.recon_lr}")


def _eval_tensor(model, data: str | None, num: int | None):
    images = resolve_data(data, model, num, 0)
    xs, ys = [], []
    for x, y in make_loader(images, model, batch_size=250):
        xs.append(x)
        ys.append(y)
    return images, torch.cat(xs), torch.cat(ys).numpy()


def _outputs(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Final features and logits (None for a headless model) on every image."""
    model.eval()
    feats, logits = [], []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            f, z = features_and_logits(model, x[i:i + batch_size])
            feats.append(f.float())
            logits.append(None if z is None else z.float())
    return torch.cat(feats).numpy(), (None if logits[0] is None else torch.cat(logits).numpy())


def _metrics(feats, logits, labels, ref_feats, ref_logits) -> dict:
    out = {}
    if logits is not None:
        s = score(logits, labels, ref_logits) if labels is not None else None
        if s is not None:
            out.update(top1=s.top1, top5=s.top5, agreement=s.agreement, kl=s.kl)
    if ref_feats is not None:
        mean, low = output_cosine(torch.from_numpy(feats), torch.from_numpy(ref_feats))
        out.update(feature_cosine=mean, feature_cosine_min=low)
    return out


def run_study(cfg: StudyConfig) -> dict | None:
    dense = load_model(cfg.model, checkpoint=cfg.checkpoint, pretrained=cfg.pretrained)
    images, x, y = _eval_tensor(dense, cfg.data, cfg.num)
    labels = y if (y >= 0).all() else None
    ref_f, ref_z = _outputs(dense, x, cfg.batch_size)
    params = sum(p.numel() for p in dense.parameters())
    rows = [{"ratio": 0.0, "variant": "dense", "int8": False, "params": params,
             **{k: v for k, v in _metrics(ref_f, ref_z, labels, None, None).items()}}]
    for spec in cfg.baselines:
        name, _, ckpt = spec.partition("=")
        small = load_model(name, checkpoint=ckpt or None)
        f, z = _outputs(small, x, cfg.batch_size)
        m = _metrics(f, z, labels, None, ref_z)   # features of another model are not comparable
        if z is not None and labels is not None:
            m.update(agreement=score(z, labels, ref_z).agreement)
        rows.append({"ratio": None, "variant": f"baseline:{name}", "int8": False,
                     "params": sum(p.numel() for p in small.parameters()), **m})
    default = default_variant(cfg.recon_steps, cfg.finetune_steps, cfg.recon_lr, cfg.finetune_images)
    int8 = cfg.int8 if cfg.int8 is not None else ((default,) if default else ())
    stats_cache = cfg.stats_cache or str(default_stats_cache())
    work = Path(tempfile.mkdtemp(prefix="study-"))
    # variant by variant: one factorisation serves all its budgets, and a stopped study has whole rows;
    # every configuration reuses the previous one's statistics (its factors too when the method is the same)
    jobs = [(r, v) for v in cfg.variants for r in cfg.ratios]
    first = len(rows)   # under torchrun this rank runs jobs[rank::world], rank 0 gathers (compress.distributed)
    result = {"model": cfg.model, "checkpoint": cfg.checkpoint, "data": images.root, "num_images": len(x),
              "num_calib": cfg.num_calib, "default_variant": default, "recon_steps": cfg.recon_steps,
              "recon_lr": cfg.recon_lr,
              "finetune_steps": cfg.finetune_steps, "finetune_images": cfg.finetune_images, "variants": {k: VARIANTS[k][0] for k in cfg.variants},
              "rows": rows, "complete": False}
    prepared = None
    try:
        for ratio, variant in tqdm(distributed.split_jobs(jobs), desc="study", unit="config"):
            opts = variant_options(variant, cfg.recon_steps, cfg.finetune_steps, cfg.recon_lr, cfg.finetune_images)
            t = time.perf_counter()
            res = run(Config(model=cfg.model, checkpoint=cfg.checkpoint, pretrained=cfg.pretrained, calib=cfg.calib,
                             num_calib=cfg.num_calib, ratio=ratio, quant=variant in int8, stats_cache=stats_cache,
                             out=str(work / "c"), **opts), reuse=prepared)
            prepared = res.prepared
            seconds = time.perf_counter() - t
            model, m = res.model, res.manifest
            refine = m.get("refine") or {}
            kept = [b.get("kept") for b in refine.get("blocks", {}).values() if b.get("kept")]
            for int8_row in ((False, True) if variant in int8 else (False,)):
                with (fake_quant(model, m["quant"]["act_ranges"]) if int8_row else contextlib.nullcontext()):
                    f, z = _outputs(model, x, cfg.batch_size)
                rows.append({"ratio": ratio, "variant": variant, "int8": int8_row, "params": m["params"]["after"],
                             "removed": m["params"]["removed_ratio"], "compress_seconds": round(seconds, 1),
                             "refine_kept": kept or None, "refine_reverted": (not refine["kept"]) if refine else None,
                             **_metrics(f, z, labels, ref_f, ref_z)})
                log.info("%s", rows[-1])
            write(result, cfg.out)   # after every configuration: a long study's finished rows survive a stop
    finally:
        shutil.rmtree(work, ignore_errors=True)
    job_rows = distributed.gather_rows(rows[first:], order=lambda row: jobs.index((row["ratio"], row["variant"])))
    if job_rows is None:   # a torchrun rank > 0: rank 0 writes the study
        return None
    rows[first:] = job_rows
    result["complete"] = True
    return result


def write(result: dict, out: Path) -> None:
    if not distributed.is_main():   # under torchrun rank 0 alone writes
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "study.json", result)
    atomic_write_text(out / "study.md", format_markdown(result))
    plot(result, out / "study.png")


# what studies must share to sit in one table; and which settings a variant's rows depend on (a row
# uses a setting when its variant leaves this option to the study, -1); studies older than a setting
# ran at the value given here
_SAME = ("model", "checkpoint", "data", "num_images", "num_calib")
_SETTINGS = {"recon_steps": "recon_steps", "finetune_steps": "finetune_steps", "recon_lr": "recon_steps",
             "finetune_images": "finetune_steps"}
_BEFORE = {"recon_lr": 1e-3, "finetune_images": 0}


def merge(results: list[dict]) -> dict:
    """One study from several run on the same model, images and calibration set (a long study in
    pieces, or rows added later): rows are joined, a later study's row replaces an earlier one's at the
    same variant, budget and precision. The row marked default is compress's default now (rows record
    their variant's options, not the defaults of their day). Variants a stopped study never reached
    are left out; the merge is complete when no variant lacks a budget. Raises if the studies are
    not comparable."""
    def facts(r: dict) -> dict:
        dense = r["rows"][0]
        return {**{k: r.get(k) for k in _SAME}, "dense parameters": dense.get("params"), "dense top-1": dense.get("top1")}

    first = results[0]
    for other in results[1:]:
        for key, a in facts(first).items():
            b = facts(other)[key]
            if a != b:
                raise RuntimeStageError(f"cannot merge studies with different {key} ({a!r} vs {b!r}); merge only "
                                        "studies of one model, evaluation set and calibration set")
    def measured(r: dict) -> set[str]:
        return {row["variant"] for row in r["rows"][1:]}

    setting = lambda r, key: r.get(key, _BEFORE.get(key))
    steps = {}
    for key, option in _SETTINGS.items():   # each setting from the studies whose rows use it
        used = {setting(r, key) for r in results
                if any(VARIANTS.get(v, ("", {}))[1].get(option, 0) < 0 for v in measured(r))}
        if len(used) > 1:
            raise RuntimeStageError(f"cannot merge studies whose rows used different --{key.replace('_', '-')} "
                                    f"({sorted(used)}); rerun one of them with the other's")
        steps[key] = used.pop() if used else setting(first, key)
    rows, variants = {}, {}
    for r in results:
        variants.update({v: what for v, what in r["variants"].items() if v in measured(r)})
        for row in r["rows"][1:]:
            rows[(row["variant"], row["ratio"], row["int8"])] = row
    ratios = {q for _, q, _ in rows}
    # complete: every variant has its FP32 row at every budget (a stopped piece's missing variants are left out)
    return {**{k: first.get(k) for k in _SAME}, **steps, "variants": variants,
            "default_variant": default_variant(steps["recon_steps"], steps["finetune_steps"], steps["recon_lr"],
                                               steps["finetune_images"]),
            "rows": [first["rows"][0]] + list(rows.values()),
            "complete": all((v, q, False) in rows for v in variants for q in ratios)}


# ----------------------------------------------------------------------------- tables and plot
def _configs(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["ratio"] and not r["variant"].startswith("baseline:")]


def _label(result: dict, variant: str, int8: bool) -> str:
    desc = result["variants"].get(variant, variant)
    return (f"{variant}{' + INT8' if int8 else ''}{' (default)' if variant == result.get('default_variant') else ''}"
            f" | {desc}")


def _table(result: dict, title: str, cell) -> list[str]:
    rows = _configs(result["rows"])
    ratios = sorted({r["ratio"] for r in rows})
    keys = []
    for r in rows:
        if (r["variant"], r["int8"]) not in keys:
            keys.append((r["variant"], r["int8"]))
    out = [title, "", "| variant | what | " + " | ".join(f"{100 * r:.0f}% fewer" for r in ratios) + " |",
           "|---|---|" + "---:|" * len(ratios)]
    for variant, int8 in keys:
        cells = []
        for ratio in ratios:
            hit = [r for r in rows if (r["variant"], r["int8"], r["ratio"]) == (variant, int8, ratio)]
            cells.append(cell(hit[0]) if hit else "-")
        out.append(f"| {_label(result, variant, int8)} | " + " | ".join(cells) + " |")
    return out + [""]


def format_markdown(result: dict) -> str:
    dense = result["rows"][0]
    has_top1 = "top1" in dense
    head = (f"{result['model']} on {result['num_images']:,} images of {result['data']} (never calibrated on); "
            f"{result['num_calib']} calibration images; dense: "
            + (f"top-1 {100 * dense['top1']:.2f}%, " if has_top1 else "headless (feature metrics only), ")
            + f"{dense['params']:,} parameters. Block reconstruction: {result['recon_steps']} steps per block "
              f"at lr {result.get('recon_lr', _BEFORE['recon_lr']):g}; "
              f"distillation: {result['finetune_steps']} steps"
            + (f" on {result['finetune_images']} images." if result.get("finetune_images") else "."))
    out = [head, ""] + ([] if result.get("complete", True) else ["**Partial: the study is still running or was "
                                                                  "stopped; rows so far.**", ""])
    if has_top1:
        out += _table(result, "Top-1 % with the dense model's head, unchanged (agreement with dense %):",
                      lambda r: f"{100 * r['top1']:.2f} ({100 * r['agreement']:.1f})")
    out += _table(result, "Final-feature cosine to dense, mean / min over images:",
                  lambda r: f"{r['feature_cosine']:.3f} / {r['feature_cosine_min']:.2f}")
    out += _table(result, "Wall time of the compress stage, s (statistics and factors reused after the first run):",
                  lambda r: f"{r['compress_seconds']:.0f}")
    base = [r for r in result["rows"] if r["variant"].startswith("baseline:")]
    if base and has_top1:
        out += ["Smaller dense models at their own parameter count (same images):", "",
                "| model | parameters | top-1 % |", "|---|---:|---:|"]
        for r in base:
            out.append(f"| {r['variant'].split(':', 1)[1]} | {r['params']:,} | {100 * r['top1']:.2f} |")
        out.append("")
    return "\n".join(out)


def plot(result: dict, path: Path) -> None:
    import matplotlib  # lazy: a slow import, needed only to draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _configs(result["rows"])
    dense = result["rows"][0]
    metrics = ([("top1", "top-1 % (dense head)")] if "top1" in dense else []) + [("feature_cosine",
                                                                                  "final-feature cosine to dense")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4.5), squeeze=False)
    keys = []
    for r in rows:
        if (r["variant"], r["int8"]) not in keys:
            keys.append((r["variant"], r["int8"]))
    names = list(dict.fromkeys(v for v, _ in keys))   # one colour per variant, its INT8 row dashed
    order = [*range(0, 20, 2), *range(1, 20, 2)]      # tab20's dark shades first, then the light ones
    colour = {v: plt.get_cmap("tab20")(order[i % 20]) for i, v in enumerate(names)}
    for ax, (metric, label) in zip(axes[0], metrics):
        for variant, int8 in keys:
            pts = sorted((r["ratio"], r[metric]) for r in rows if (r["variant"], r["int8"]) == (variant, int8))
            scale = 100 if metric == "top1" else 1
            ax.plot([100 * p[0] for p in pts], [scale * p[1] for p in pts], "--" if int8 else "-", marker="o",
                    color=colour[variant], lw=2.5 if variant == result.get("default_variant") else 1.2,
                    label=f"{variant}{' INT8' if int8 else ''}")
        if metric == "top1":
            ax.axhline(100 * dense["top1"], color="k", lw=1, label="dense")
        ax.set_xlabel("% of all parameters removed")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle(f"{result['model']}: every step on/off at equal budgets (thick: the default)")
    fig.tight_layout()
    atomic_write_bytes(path, figure_png(fig, dpi=110))


# ----------------------------------------------------------------------------- CLI
def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(t) for t in text.split(",") if t.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(t for t in text.split(",") if t)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_weights_arguments(p, model_default="vit_cifar_ref")
    add_calibration_arguments(p, config_defaults())
    p.add_argument("--data", default=None, help="evaluation images: folder, bundled name or cifar10:test "
                                                "(default: the model's own evaluation set)")
    p.add_argument("--num", type=int, help="seeded subset of the evaluation images")
    p.add_argument("--ratios", type=_floats, default=(0.4, 0.5, 0.6, 0.7),
                   help="fractions of all parameters to remove, comma-separated (default: 0.4,0.5,0.6,0.7)")
    p.add_argument("--variants", type=_names, default=tuple(VARIANTS),
                   help=f"rows, comma-separated (default: all of {', '.join(VARIANTS)})")
    p.add_argument("--int8", type=_names, default=None,
                   help="variants that also get an INT8 fake-quant row (default: compress's default one; '' none)")
    p.add_argument("--recon-steps", type=int, default=100, help="block-reconstruction steps of the recon rows")
    lr = config_defaults()["recon_lr"]
    p.add_argument("--recon-lr", type=float, default=lr,
                   help=f"block-reconstruction step of the recon rows, relative to each tensor's RMS "
                        f"(default: compress's, {lr:g})")
    p.add_argument("--finetune-steps", type=int, default=StudyConfig.finetune_steps,
                   help=f"distillation steps of the distill rows (default {StudyConfig.finetune_steps}: compress's own)")
    p.add_argument("--finetune-images", type=int, default=StudyConfig.finetune_images,
                   help="images the distill rows train on (compress --finetune-images; default "
                        f"{StudyConfig.finetune_images}: compress's own)")
    p.add_argument("--baseline", action="append", default=[], metavar="MODEL[=CHECKPOINT]",
                   help="a smaller dense model to set against the compressed one (repeatable)")
    p.add_argument("--batch-size", type=int, default=100, help="evaluation batch size")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--merge", type=Path, action="append", default=[], metavar="STUDY.json",
                   help="join earlier studies of one model, evaluation set and calibration set into --out "
                        "instead of running one (repeatable; a later file's rows replace an earlier one's)")
    p.add_argument("--out", type=Path, required=True, help="folder for study.json, study.md, study.png")


def _read_study(path: Path) -> dict:
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RuntimeStageError(f"--merge {path}: not a readable study.json ({e}); pass the study.json a "
                                "runtime study wrote") from None
    if not isinstance(result, dict) or not result.get("rows") or result["rows"][0].get("variant") != "dense":
        raise RuntimeStageError(f"--merge {path}: not a study.json (no dense row); pass the study.json a "
                                "runtime study wrote")
    return result


def main(args: argparse.Namespace) -> int:
    if args.merge:
        result = merge([_read_study(p) for p in args.merge])
        write(result, args.out)
        print(format_markdown(result))
        return 0
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = StudyConfig(model=args.model, out=args.out, checkpoint=args.checkpoint, pretrained=args.pretrained,
                      calib=args.calib, num_calib=args.num_calib, data=args.data, num=args.num, ratios=args.ratios,
                      variants=args.variants, int8=args.int8, recon_steps=args.recon_steps, recon_lr=args.recon_lr,
                      finetune_steps=args.finetune_steps, finetune_images=args.finetune_images, baselines=tuple(args.baseline),
                      stats_cache=args.stats_cache, batch_size=args.batch_size)
    result = run_study(cfg)
    if result is None:   # a torchrun rank > 0
        return 0
    write(result, args.out)
    print(format_markdown(result))
    return 0
