"""compress's command-line options, declared once and shared by every command that compresses
(python -m compress, runtime sweep/fit/study): the weights, the model's build and preprocessing
options, the calibration set and the method. Defaults are pipeline.Config's (``d``), passed in.
"""
from __future__ import annotations

import argparse
import json

from .allocate import ALLOCATIONS
from .errors import CompressError
from .svd import METHODS

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
# How a checkpoint's position table of another grid is resampled; "auto" is the framework's own way.
POS_INTERPOLATIONS = ("auto", "bicubic", "bicubic-antialias", "bilinear", "bilinear-antialias", "nearest")


def add_weights_arguments(g, model_default: str | None = None) -> None:
    """--model, --checkpoint and --pretrained/--random-init."""
    g.add_argument("--model", required=model_default is None, default=model_default,
                   help="timm model name (e.g. deit_tiny_patch16_224, vit_cifar_ref), or a user entry point "
                        "package.module:function / file.py:function" + (f" (default {model_default})"
                                                                        if model_default else ""))
    g.add_argument("--checkpoint", help="local weights: .safetensors or a torch file (weights_only)")
    w = g.add_mutually_exclusive_group()
    w.add_argument("--pretrained", dest="pretrained", action="store_const", const=True, default=None,
                   help="pretrained weights (bundled for vit_cifar_*, the converted cache for the zoo models, "
                        "else timm's hub)")
    w.add_argument("--random-init", dest="pretrained", action="store_const", const=False,
                   help="random weights even for bundled models (default: the bundled or converted weights "
                        "when present, random init for other models)")


def add_calibration_arguments(g, d: dict) -> None:
    """--calib, --num-calib and --stats-cache (defaults ``d``: pipeline.config_defaults())."""
    g.add_argument("--calib", help="image folder (flat or one subfolder per class) or a built-in set; default: "
                                   "the set the model's pretrained_cfg names")
    g.add_argument("--num-calib", type=int, default=d["num_calib"],
                   help="images to use (seeded subset; default %(default)s)")
    g.add_argument("--stats-cache", metavar="DIR", default=None,
                   help="cache calibration statistics here (default: ~/.cache/vit-edge/compress-stats)")


def add_method_arguments(g, d: dict) -> None:
    """--method, --allocation, --granule, --comp-rank and --comp-steps (defaults ``d``)."""
    g.add_argument("--method", default=d["method"], choices=METHODS, help="default %(default)s")
    g.add_argument("--allocation", default=d["allocation"], choices=ALLOCATIONS, help="default %(default)s")
    g.add_argument("--granule", type=int, default=d["granule"],
                   help="ranks are multiples of this (default %(default)s)")
    g.add_argument("--comp-rank", type=int, default=d["comp_rank"],
                   help="rank q of the paper's compensation term (0 = off, the default: on real weights the "
                        "sequential refit beats it at equal parameters); kept only if it beats the SVD at "
                        "width r+q on the held-out images")
    g.add_argument("--comp-steps", type=int, default=d["comp_steps"],
                   help="Adam steps refining the closed-form compensation start (0: closed form only; "
                        "default %(default)s)")


def add_model_options(g) -> None:
    """--img-size, --num-classes, --model-kwargs, --pos-interpolation and the preprocessing overrides
    (an argparse group); ``model_options(args)`` turns them into load options."""
    g.add_argument("--img-size", type=int, nargs="+", metavar="PX",
                   help="image size the model is built for (timm img_size: one value, or H W)")
    g.add_argument("--num-classes", type=int, metavar="N", help="classifier outputs (0: headless backbone)")
    g.add_argument("--model-kwargs", type=_json_object, default={}, metavar="JSON",
                   help="keywords for timm.create_model or the entry point, e.g. '{\"drop_path_rate\": 0}'")
    g.add_argument("--pos-interpolation", default="auto", choices=POS_INTERPOLATIONS,
                   help="resampling of a checkpoint's position table of another grid (default auto: the "
                        "checkpoint framework's own: timm bicubic with antialias, transformers bicubic)")
    g.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                   help="preprocessing override: input size (default: the model's data config)")
    g.add_argument("--mean", type=float, nargs="+", help="preprocessing override: per-channel mean")
    g.add_argument("--std", type=float, nargs="+", help="preprocessing override: per-channel std")
    g.add_argument("--interpolation", choices=INTERPOLATIONS, help="preprocessing override: resize interpolation")
    g.add_argument("--crop-pct", type=float, help="preprocessing override: center-crop fraction (1: no crop)")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e.msg} at column {e.colno}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def model_options(args) -> dict:
    """{model_kwargs, data_config, pos_interpolation} from ``add_model_options``' arguments."""
    kwargs = dict(args.model_kwargs or {})
    for key, value in (("img_size", args.img_size), ("num_classes", args.num_classes)):
        if value is None:
            continue
        if key == "img_size":
            if len(value) > 2:
                raise CompressError(f"--img-size takes one value or H W, got {len(value)}")
            value = value[0] if len(value) == 1 else tuple(value)
        if key in kwargs and kwargs[key] != value:
            raise CompressError(f"--{key.replace('_', '-')} {value} contradicts --model-kwargs {key}={kwargs[key]}")
        kwargs[key] = value
    data = {k: getattr(args, k) for k in ("input_size", "mean", "std", "interpolation", "crop_pct")
            if getattr(args, k, None) is not None}
    return {"model_kwargs": kwargs, "data_config": data, "pos_interpolation": args.pos_interpolation}
