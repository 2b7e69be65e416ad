"""How chaotic a model's INT8 simulation is: the figures behind export's INT8 gate (export.parity).

    python -m compress.quant_noise --model vit_small_patch14_imgfocus

Calibrates min-max INT8 ranges on ``--num-calib`` calibration images, then on ``--num`` images not
calibrated on (the model's evaluation set) reports two relative L2 distances of the logits:
``int8_error`` (fake-quant vs float) and ``rounding_noise`` (fake-quant on the images vs fake-quant
on the images times 1 + eps N(0, 1), seeded). Where the noise is of the order of the INT8 error, two
exact INT8 implementations that merely accumulate in another order cannot agree element-wise.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

from calibration_data import CalibrationDataError, default_calibration_for, default_evaluation_for, load_image_set, make_loader
from cliutil import OneLineParser, run_cli

from .errors import CompressError
from .models import load_model
from .quantize import apply_fake_quant_, calibrate_activations, model_outputs, remove_fake_quant_


@dataclass(frozen=True)
class RoundingNoise:
    int8_error: float       # ||fake-quant - float|| / ||float||
    rounding_noise: float   # ||fake-quant(x (1 + eps n)) - fake-quant(x)|| / ||fake-quant(x)||
    eps: float
    images: int


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@torch.no_grad()
def rounding_noise(model, calib_batches, batches, eps: float = 1e-6, seed: int = 0) -> RoundingNoise:
    """The INT8 error and the rounding noise of ``model`` on ``batches`` (see the module docstring)."""
    ranges = calibrate_activations(model, calib_batches)
    y = model_outputs(model, batches)
    gen = torch.Generator().manual_seed(seed)
    perturbed = [x * (1 + eps * torch.randn(x.shape, generator=gen)) for x in batches]
    apply_fake_quant_(model, ranges)
    try:
        yq, yq2 = model_outputs(model, batches), model_outputs(model, perturbed)
    finally:
        remove_fake_quant_(model)
    return RoundingNoise(_rel(yq, y), _rel(yq2, yq), eps, len(y))


def main(argv=None) -> int:
    p = OneLineParser(prog="python -m compress.quant_noise", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a model name (compress --help lists the kinds)")
    p.add_argument("--num-calib", type=int, default=32, help="calibration images for the ranges (default 32)")
    p.add_argument("--num", type=int, default=64, help="evaluation images, never calibrated on (default 64)")
    p.add_argument("--eps", type=float, default=1e-6, help="relative input perturbation (default 1e-6)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    def body() -> int:
        torch.manual_seed(args.seed)
        model = load_model(args.model).eval()
        batches = [[b[0] if isinstance(b, (list, tuple)) else b
                    for b in make_loader(load_image_set(src, num, seed=seed), model, batch_size=32)]
                   for src, num, seed in ((default_calibration_for(model), args.num_calib, args.seed),
                                          (default_evaluation_for(model), args.num, args.seed + 1))]
        r = rounding_noise(model, *batches, eps=args.eps, seed=args.seed)
        print(f"{args.model} on {r.images} evaluation images: INT8 (fake-quant) logits {r.int8_error:.1%} rel. L2 "
              f"from float; a {r.eps:g} relative input perturbation moves them {r.rounding_noise:.1%}")
        return 0

    return run_cli(body, (CompressError, CalibrationDataError))


if __name__ == "__main__":
    sys.exit(main())
