"""The CLI's model options (shared by every command that builds a model), kept free of torch so
``--help`` stays fast: build keywords, position-table resampling, preprocessing overrides."""
from __future__ import annotations

import argparse
import json

from .errors import CompressError

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
# How a checkpoint's position table of another grid is resampled; "auto" is the framework's own way.
POS_INTERPOLATIONS = ("auto", "bicubic", "bicubic-antialias", "bilinear", "bilinear-antialias", "nearest")


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
