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


def test_attribution_splits_the_error_and_ranks_layers():
    from compress.quant_noise import attribute

    torch.manual_seed(0)
    model = load_model("vit_cifar_ref").eval()
    calib, images = [torch.randn(4, 3, 32, 32)], [torch.randn(8, 3, 32, 32)]
    a = attribute(model, calib, images)
    r = rounding_noise(model, calib, images, eps=0.0)
    assert a.all_layers == r.int8_error and a.images == 8
    assert 0 < a.weights_only < 1 and 0 < a.activations_only < 1 and 0 < a.float_head < 1
    assert 0 <= a.agreement <= 1 and 0 <= a.agreement_float_head <= 1
    errs = [e for _, e in a.layers]
    assert errs == sorted(errs, reverse=True) and all(e > 0 for e in errs)
    assert "head" in dict(a.layers) and len(a.layers) == 6 * 4 + 1   # 6 blocks x (qkv, proj, fc1, fc2) + head
    assert dict(a.layers)["head"] < a.all_layers


def test_cli_attribute_lists_the_worst_layers(capsys):
    assert main(["--model", "vit_cifar_ref", "--num-calib", "4", "--num", "4", "--attribute", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "only the weights quantized" in out and "float classifier" in out and "the 3 worst of 25" in out
