"""compress.quant_noise: the INT8 error and the rounding noise that export's INT8 gate is built on."""
from __future__ import annotations

import torch

from compress.models import load_model
from compress.quant_noise import main, rounding_noise


def test_noise_is_zero_without_perturbation_and_grows_with_it():
    torch.manual_seed(0)
    model = load_model("vit_cifar_ref").eval()
    calib = [torch.randn(4, 3, 32, 32)]
    images = [torch.randn(4, 3, 32, 32)]
    none = rounding_noise(model, calib, images, eps=0.0)
    assert none.rounding_noise == 0.0 and 0 < none.int8_error < 1 and none.images == 4
    some = rounding_noise(model, calib, images, eps=1e-2)
    assert some.rounding_noise > 0 and some.int8_error == none.int8_error   # same ranges, same float model


def test_cli_prints_both_figures(capsys):
    assert main(["--model", "vit_cifar_ref", "--num-calib", "4", "--num", "4"]) == 0
    out = capsys.readouterr().out
    assert "vit_cifar_ref on 4 evaluation images" in out and "rel. L2 from float" in out


def test_cli_bad_model_is_one_line(capsys):
    assert main(["--model", "no_such_model_xyz", "--num", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_model_xyz" in err[0]
