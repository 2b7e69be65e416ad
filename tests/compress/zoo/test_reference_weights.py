"""The committed reference weights reproduce the accuracy their model card states."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from compress import load_model
from compress.zoo import reference
from calibration_data import make_loader
from runtime.evaluate import evaluate, resolve_data, torch_variant


@pytest.mark.parametrize("arch", ["vit_cifar_ref", "vit_cifar_narrow"])
def test_bundled_weights_reproduce_the_stated_accuracy(arch):
    card = json.loads((Path(reference.WEIGHTS_DIR) / f"{arch}.json").read_text())
    path = reference.weights_path(arch)
    with safe_open(str(path), "pt") as f:                   # the training run's own record agrees
        assert float(f.metadata()["test_top1"]) == card["cifar10_test_top1"]
    model = load_model(arch)                       # bundled weights, no checkpoint given
    images = resolve_data(card["bundled_eval"], arch)
    assert len(images) == card["bundled_eval_images"]
    scores = evaluate({"dense": torch_variant(model)}, make_loader(images, model, batch_size=250))
    top1 = scores["dense"].top1
    assert abs(top1 - card["bundled_eval_top1"]) <= card["bundled_eval_tolerance"], top1
