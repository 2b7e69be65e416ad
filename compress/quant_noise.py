"""How chaotic a model's INT8 simulation is: the figures behind export's INT8 gate (export.parity).

    python -m compress.quant_noise --model vit_small_patch14_imgfocus

Calibrates min-max INT8 ranges on ``--num-calib`` calibration images, then on ``--num`` images not
calibrated on (the model's evaluation set) reports two relative L2 distances of the logits:
``int8_error`` (fake-quant vs float) and ``rounding_noise`` (fake-quant on the images vs fake-quant
on the images times 1 + eps N(0, 1), seeded). Where the noise is of the order of the INT8 error, two
exact INT8 implementations that merely accumulate in another order cannot agree element-wise.

``--attribute`` also says where the INT8 error comes from: the same distance with only the
weights or only the activations quantized, with everything but the classifier quantized (a float
head), and with one layer at a time quantized (weights and its input activations), worst first.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch
from tqdm import tqdm

from calibration_data import CalibrationDataError, default_calibration_for, default_evaluation_for, load_image_set, make_loader
from cliutil import OneLineParser, run_cli

from .errors import CompressError
from .models import compressible_layers, load_model
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


@dataclass(frozen=True)
class Attribution:
    all_layers: float                 # every layer quantized (= RoundingNoise.int8_error)
    weights_only: float
    activations_only: float
    float_head: float | None          # every layer but the classifier (None: headless model)
    agreement: float | None           # top-1 agreement of INT8 with float (None: headless)
    agreement_float_head: float | None
    layers: tuple[tuple[str, float], ...]   # one layer quantized at a time, worst first
    images: int


@torch.no_grad()
def attribute(model, calib_batches, batches) -> Attribution:
    """Where ``model``'s INT8 error comes from (module docstring), on ``batches`` not calibrated on."""
    ranges = calibrate_activations(model, calib_batches)
    y = model_outputs(model, batches)
    heads = set(compressible_layers(model, include_head=True)) - set(compressible_layers(model))

    def run(names, weights=True, activations=True):
        apply_fake_quant_(model, {n: ranges[n] for n in names}, weights=weights, activations=activations)
        try:
            return model_outputs(model, batches)
        finally:
            remove_fake_quant_(model)

    agree = (lambda yq: float((yq.argmax(1) == y.argmax(1)).double().mean())) if heads else (lambda yq: None)
    yq = run(ranges)
    yh = run([n for n in ranges if n not in heads]) if heads else None
    per_layer = [(n, _rel(run([n]), y)) for n in tqdm(ranges, desc="INT8 one layer at a time", unit="layer",
                                                        mininterval=5, disable=None)]
    return Attribution(_rel(yq, y), _rel(run(ranges, activations=False), y), _rel(run(ranges, weights=False), y),
                       _rel(yh, y) if heads else None, agree(yq), agree(yh) if heads else None,
                       tuple(sorted(per_layer, key=lambda t: -t[1])), len(y))


def _attribution_lines(a: Attribution, top: int) -> list[str]:
    out = [f"only the weights quantized: {a.weights_only:.1%}; only the activations: {a.activations_only:.1%}"]
    if a.float_head is not None:
        out.append(f"float classifier, the rest INT8: {a.float_head:.1%} (top-1 agreement with float "
                   f"{a.agreement_float_head:.1%}, all INT8 {a.agreement:.1%})")
    out.append(f"one layer at a time, the {min(top, len(a.layers))} worst of {len(a.layers)}:")
    out += [f"  {name}: {err:.2%}" for name, err in a.layers[:top]]
    return out


def main(argv=None) -> int:
    p = OneLineParser(prog="python -m compress.quant_noise", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a model name (compress --help lists the kinds)")
    p.add_argument("--num-calib", type=int, default=32, help="calibration images for the ranges (default 32)")
    p.add_argument("--num", type=int, default=64, help="evaluation images, never calibrated on (default 64)")
    p.add_argument("--eps", type=float, default=1e-6, help="relative input perturbation (default 1e-6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attribute", action="store_true",
                   help="also split the INT8 error: weights vs activations, a float head, one layer at a time")
    p.add_argument("--top", type=int, default=10, help="layers listed by --attribute (default 10)")
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
        if args.attribute:
            print("\n".join(_attribution_lines(attribute(model, *batches), args.top)))
        return 0

    return run_cli(body, (CompressError, CalibrationDataError))


if __name__ == "__main__":
    sys.exit(main())
