"""CLI: `python -m compress --model NAME --ratio 0.6 --out DIR` (see --help)."""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys

import torch

from calibration_data import CalibrationDataError
from cliutil import OneLineParser, reserve_output, run_cli

from .artifact import replace_refusal
from .distributed import is_main
from .errors import CompressError
from .refine import RECON_PARAMS
from .sensitivity import TARGETS as SENSITIVITY_TARGETS
from .options import (add_calibration_arguments, add_method_arguments, add_model_options, add_weights_arguments,
                      model_options)
from .pipeline import FINETUNE_TARGETS, Config, config_defaults, default_stats_cache, run
from .report import finetune_outcome


class _Parser(OneLineParser):
    """Also requires a budget: one of --ratio/--params/--size-mb/--plan, or --target-latency-ms (or both)."""

    def parse_args(self, args=None, namespace=None):
        a = super().parse_args(args, namespace)
        if (a.ratio is None and a.params is None and a.size_mb is None and a.plan is None
                and a.target_latency_ms is None):
            self.error("give a budget: one of --ratio, --params, --size-mb, --plan, and/or --target-latency-ms")
        return a


def get_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m compress",
        description="Activation-aware mixed-rank low-rank compression (+ INT8 PTQ ranges) of a timm ViT. "
                    "Writes DIR/{manifest.json, weights.safetensors, report.md, ranks.png}.")
    d = config_defaults()
    g = p.add_argument_group("model")
    add_weights_arguments(g)
    add_model_options(g)
    g.add_argument("--include-head", action="store_true", help="also factorise the classifier head")
    g = p.add_argument_group("calibration")
    add_calibration_arguments(g, d)
    g.add_argument("--batch-size", type=int, default=d["batch_size"])
    g.add_argument("--seed", type=int, default=d["seed"])
    g.add_argument("--no-stats-cache", action="store_true", help="always recompute the statistics")
    g = p.add_argument_group("budget (one of --ratio/--params/--size-mb/--plan, and/or --target-latency-ms)")
    b = g.add_mutually_exclusive_group()
    b.add_argument("--ratio", type=float, help="fraction of ALL model parameters to remove, e.g. 0.6")
    b.add_argument("--params", type=int, help="parameter count of the whole compressed model")
    b.add_argument("--size-mb", type=float, help="float32 size of the compressed model in MB (10^6 bytes)")
    b.add_argument("--plan", metavar="PATH", help="re-apply a saved rank plan: a compressed directory, its "
                                                  "manifest.json or a plan JSON (same model)")
    g.add_argument("--target-latency-ms", type=float, default=None, metavar="MS",
                   help="latency budget, predicted from the latency table at --latency-batch (alone, or with one of "
                        "the parameter budgets: both must hold)")
    g.add_argument("--latency-table", default=None, metavar="PATH|auto",
                   help="per-layer latency table (`python -m runtime latency-table`): layers are factorised only at "
                        "widths whose pair is faster than dense there; 'auto' = this machine's cached table "
                        "(the default when --target-latency-ms is given)")
    g.add_argument("--latency-precision", default=d["latency_precision"], choices=("int8", "fp32"),
                   help="which timings of the table decide (default %(default)s: the deployable)")
    g.add_argument("--latency-batch", type=int, default=d["latency_batch"],
                   help="batch size of --target-latency-ms (default %(default)s)")
    g = p.add_argument_group("method")
    add_method_arguments(g, d)
    g.add_argument("--comp-images", type=int, default=d["comp_images"],
                   help="calibration images used by the sequential compensation pass (0: all; default %(default)s)")
    g.add_argument("--gram-precision", default=d["gram_precision"], choices=("float64", "float32"),
                   help="dtype of each batch's Gram product (sums are float64); float32 is ~2x faster")
    g.add_argument("--alpha", type=float, default=d["alpha"], help="exponent of the diag variant")
    g.add_argument("--damping", type=float, default=d["damping"],
                   help="whitening damping, relative to mean(diag C) (default %(default)s)")
    g.add_argument("--comp-damping", type=float, default=d["comp_damping"],
                   help="ridge of the compensation fit, relative to mean(diag C~) (default %(default)s)")
    g = p.add_argument_group("refinement (beyond the paper; each kept only where held-out calibration images "
                             "say it pays)")
    g.add_argument("--heldout", type=int, default=d["heldout"],
                   help="calibration images held out of every fit, to judge the refinements "
                        f"(default {d['heldout']}; drawn after the --num-calib ones)")
    g.add_argument("--seq-refit", action=argparse.BooleanOptionalAction, default=d["seq_refit"],
                   help="refit each layer's factors to the compressed network's own inputs, layer by layer "
                        f"(default {'on' if d['seq_refit'] else 'off'})")
    g.add_argument("--recon-steps", type=int, default=d["recon_steps"], metavar="N",
                   help="block-wise reconstruction: Adam steps per block against the dense "
                        f"block's outputs, no labels (0: off; default {d['recon_steps']})")
    g.add_argument("--recon-lr", type=float, default=d["recon_lr"],
                   help=f"reconstruction step, relative to each tensor's RMS (default {d['recon_lr']:g})")
    g.add_argument("--recon-params", choices=RECON_PARAMS, default=d["recon_params"],
                   help="what reconstruction tunes: the low-rank factors and their biases, or every parameter "
                        f"of the block (norms, layer scales, layers left dense too; default {d['recon_params']})")
    g.add_argument("--recon-readout", action=argparse.BooleanOptionalAction, default=d["recon_readout"],
                   help="reconstruct (and judge) the last block on what the head reads (final norm and pooling: "
                        "the CLS token of a ViT) instead of every output token (default "
                        f"{'on' if d['recon_readout'] else 'off'}: on the real ViT-S/14 it did not raise top-1)")
    g.add_argument("--recon-readout-weight", type=float, default=d["recon_readout_weight"], metavar="W",
                   help="the other blocks' reconstruction also compares what the head would read of them, "
                        f"weighted W times the tokens (default {d['recon_readout_weight']:g}: off)")
    g.add_argument("--refine-damping", type=float, default=d["refine_damping"],
                   help=f"ridge of the refit's input Gram, relative to its mean diagonal (default {d['refine_damping']:g})")
    g.add_argument("--sensitivity-images", type=int, default=d["sensitivity_images"], metavar="N",
                   help="reallocate ranks by each layer's measured effect on the final features, probed on N "
                        f"calibration images (0: off; default {d['sensitivity_images']})")
    g.add_argument("--sensitivity-target", choices=SENSITIVITY_TARGETS, default=d["sensitivity_target"],
                   help="what a layer's effect is measured on: the final features (relative squared error) or, "
                        f"for a classifier, the KL of its logits (default {d['sensitivity_target']})")
    g = p.add_argument_group("recovery fine-tuning (beyond the paper)")
    g.add_argument("--finetune-steps", type=int, default=d["finetune_steps"], metavar="N",
                   help="Adam steps distilling the dense model into the low-rank factors on the calibration "
                        "images (random flips), best held-out iterate kept, before INT8 calibration; 0 = off, "
                        f"the paper's no-fine-tuning setting; reported separately with its cost (default "
                        f"{d['finetune_steps']})")
    g.add_argument("--finetune-lr", type=float, default=d["finetune_lr"], metavar="LR",
                   help="peak learning rate of the fine-tuning (Adam, cosine decay to 0; default "
                        f"{d['finetune_lr']:g}: on the real ViT-S/14's feature target 1e-4 never lowered the "
                        "held-out loss; the logit target on vit_cifar_ref took 3e-5)")
    g.add_argument("--finetune-images", type=int, default=d["finetune_images"], metavar="N",
                   help="unlabelled images the distillation trains on: the calibration images, topped up to N "
                        "with images of the same set drawn after the held-out ones (never in the statistics; "
                        f"default {d['finetune_images']}: the calibration images only)")
    g.add_argument("--finetune-target", default=d["finetune_target"], choices=FINETUNE_TARGETS,
                   help="what the distillation matches: every final token and the pooled features (features, "
                        "headless models too), the classifier's logits (logits), or auto: logits for a "
                        f"classifier, features for a headless model; default {d['finetune_target']}")
    g = p.add_argument_group("quantization")
    g.add_argument("--no-quant", action="store_true", help="skip INT8 calibration and fake-quant evaluation")
    g.add_argument("--quant-calib", default=d["quant_calib"], choices=("minmax", "percentile"))
    g.add_argument("--percentile", type=float, default=d["percentile"])
    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, help="output directory (replaced atomically)")
    g.add_argument("--device", default=d["device"])
    g.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch default); recorded in the manifest: float reductions "
                        "depend on it, so weights differ across thread counts by float rounding (~1e-4), "
                        "while equal inputs and threads give byte-identical weights")
    g.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    cache = None if args.no_stats_cache else (args.stats_cache or str(default_stats_cache()))
    return Config(model=args.model, out=args.out, **model_options(args), checkpoint=args.checkpoint, pretrained=args.pretrained,
                  calib=args.calib, num_calib=args.num_calib, batch_size=args.batch_size, seed=args.seed,
                  ratio=args.ratio, params=args.params, size_mb=args.size_mb, plan=args.plan,
                  target_latency_ms=args.target_latency_ms, latency_table=args.latency_table,
                  latency_precision=args.latency_precision, latency_batch=args.latency_batch, method=args.method,
                  allocation=args.allocation, granule=args.granule, comp_rank=args.comp_rank,
                  comp_steps=args.comp_steps, comp_images=args.comp_images,
                  finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr,
                  finetune_target=args.finetune_target, finetune_images=args.finetune_images,
                  gram_precision=args.gram_precision, alpha=args.alpha, damping=args.damping,
                  comp_damping=args.comp_damping, quant=not args.no_quant,
                  quant_calib=args.quant_calib, percentile=args.percentile, include_head=args.include_head,
                  stats_cache=cache, device=args.device, heldout=args.heldout, seq_refit=args.seq_refit,
                  recon_steps=args.recon_steps, recon_lr=args.recon_lr, recon_params=args.recon_params,
                  recon_readout=args.recon_readout,
                  recon_readout_weight=args.recon_readout_weight, refine_damping=args.refine_damping,
                  sensitivity_images=args.sensitivity_images, sensitivity_target=args.sensitivity_target)


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    def body() -> int:
        # under torchrun only rank 0 holds and writes --out
        with (reserve_output(args.out, kind="dir", accepts=replace_refusal) if is_main()
              else contextlib.nullcontext()):  # before any expensive work
            if args.threads > 0:
                torch.set_num_threads(args.threads)
            result = run(config_from_args(args))
        if result is None:  # a torchrun rank > 0: its share of the statistics went to rank 0
            return 0
        _print_summary(result)
        return 0

    return run_cli(body, (CompressError, CalibrationDataError))


def _print_summary(result) -> None:
    m = result.manifest
    p = m["params"]
    print(f"{m['model']['name']}: {p['before']:,} -> {p['after']:,} parameters "
          f"({p['removed_ratio']:.1%} of the model, {p['compressible_removed_ratio']:.1%} of compressible layers)")
    ag = m["agreement"].get("compressed_fp32_vs_dense")
    if ag and ag.get("top1_agreement") is None:   # headless: final-feature agreement
        i8 = m["agreement"].get("compressed_int8_vs_dense")
        print(f"final-feature cosine with the dense model on the calibration images: {ag['cosine']:.4f} (fp32)"
              + (f", {i8['cosine']:.4f} (int8)" if i8 else ""))
    elif ag:
        print(f"top-1 agreement with the dense model on the calibration images: {ag['top1_agreement']:.1%} (fp32)"
              + (f", {m['agreement']['compressed_int8_vs_dense']['top1_agreement']:.1%} (int8)"
                 if "compressed_int8_vs_dense" in m["agreement"] else ""))
    rf = m.get("refine")
    if rf:
        kept = [b["kept"] for b in rf["blocks"].values() if b.get("kept")]
        print(f"refinement on {rf['heldout_images']} held-out images: final-feature cosine "
              f"{rf['heldout_output_cosine_plain']['mean']:.4f} -> {rf['heldout_output_cosine_refined']['mean']:.4f}"
              + (f"; kept per block: {', '.join(kept)}" if rf["kept"] else "; did not pay, reverted"))
    ft = m.get("finetune")
    if ft:
        print(f"fine-tuned {ft['steps']} steps on {ft['images']} calibration images in {ft['seconds']:.1f} s: "
              + finetune_outcome(ft))
    lat = m.get("latency")
    if lat:
        b = str(lat["batch"])
        print(f"predicted {lat['precision']} latency at batch {b} on {lat['backend']} ({lat['machine']['cpu']}): "
              f"{lat['predicted_ms'][b]:.2f} ms vs {lat['dense_predicted_ms'][b]:.2f} ms dense")
    print(f"wrote {result.out} in {m['timings']['total']:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
