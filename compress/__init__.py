"""Activation-aware mixed-rank compression of ViTs (METHOD.md §1-§5), as verbs over plain data.

Importing the package registers the bundled models (vit_cifar_ref/_narrow, the zoo) with timm;
it touches no data and no CUDA. The stage in one call, and its steps one by one::

    from compress import run, Config, load_compressed
    result = run(Config(model="vit_cifar_ref", ratio=0.5, out="runs/x"))   # -> runs/x/{manifest.json, ...}
    model, manifest = load_compressed("runs/x")

    from compress import load_model, collect, factorise, allocate, apply_, calibrate_, fake_quant
    model = load_model("vit_cifar_ref")
    stats = collect(model, images)                 # calibration_data.ImageSet or batches
    factors = factorise(model, stats, "whiten")    # every layer's SVD and error curve
    for ratio in (0.3, 0.5):                       # one factorisation, every budget
        plan = allocate(factors, ratio)
        lowrank = copy.deepcopy(model); apply_(lowrank, factors, plan)

``run(cfg, reuse=result.prepared)`` runs another budget on the same statistics and factors;
``Config(plan=DIR)`` / ``--plan DIR`` re-applies a saved plan (``load_plan``).
"""
from . import distributed, latency, zoo  # noqa: F401  (zoo: registers its models with timm)
from .allocate import ALLOCATIONS, Budget, LayerPlan, Plan
from .artifact import fingerprint, load_compressed, load_dense, read_manifest, save_compressed
from .compensate import compensate_
from .errors import CompressError
from .finetune import distill_
from .lowrank import LowRankLinear, lowrank_layers
from .models import compressible_layers, excluded_linears, features_and_logits, has_head, load_model, num_classes
from .options import (add_calibration_arguments, add_method_arguments, add_model_options, add_weights_arguments,
                      model_options)
from .pipeline import Config, Prepared, RunResult, config_defaults, default_stats_cache, prepare, run
from .quantize import apply_fake_quant_, model_outputs, quantize_weight, remove_fake_quant_
from .refine import RefineConfig, output_cosine, refine_
from .stats import Stats
from .svd import METHODS
from .verbs import Factors, allocate, apply_, calibrate_, collect, factorise, fake_quant, load_plan

__all__ = ["ALLOCATIONS", "METHODS", "Budget", "CompressError", "Config", "Factors", "LayerPlan", "LowRankLinear",
           "Plan", "Prepared", "RefineConfig", "RunResult", "Stats", "add_calibration_arguments",
           "add_method_arguments", "add_model_options", "add_weights_arguments", "allocate", "apply_", "apply_fake_quant_", "calibrate_",
           "collect", "compensate_", "compressible_layers", "config_defaults", "default_stats_cache", "distill_", "distributed",
           "excluded_linears", "factorise", "fake_quant", "features_and_logits", "fingerprint", "has_head",
           "latency", "load_compressed", "load_dense", "load_model", "load_plan", "lowrank_layers", "model_options", "model_outputs", "num_classes",
           "output_cosine", "prepare", "quantize_weight", "read_manifest", "refine_", "remove_fake_quant_", "run",
           "save_compressed"]
