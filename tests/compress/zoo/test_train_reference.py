"""The reference-model recipe: seeded, resumable, learns, writes loadable safetensors.

The full CIFAR-10 archive is replaced by the bundled real images (train on the calibration
subset, test on part of the evaluation subset) and the architecture by a tiny one, so a
run takes seconds.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from calibration_data import bundled_path
from compress.zoo import reference, train_reference


def _as_arrays(folder, limit):
    paths = sorted(p for p in folder.rglob("*.png"))
    classes = sorted({p.parent.name for p in paths})
    rng = np.random.default_rng(0)
    paths = [paths[i] for i in sorted(rng.choice(len(paths), size=limit, replace=False))]
    x = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    y = np.array([classes.index(p.parent.name) for p in paths], dtype=np.int64)
    return x, y


@pytest.fixture
def tiny_recipe(monkeypatch):
    data = {"train": _as_arrays(bundled_path("cifar10-calib"), 500),
            "test": _as_arrays(bundled_path("cifar10-eval"), 256)}
    monkeypatch.setattr(train_reference, "load_cifar10", lambda split: data[split])
    monkeypatch.setitem(reference.ARCHS, "vit_cifar_narrow",
                        dict(embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0))


def _args(tmp_path, epochs, name="run"):
    return train_reference.get_parser().parse_args(
        ["--arch", "vit_cifar_narrow", "--epochs", str(epochs), "--batch-size", "64", "--lr", "3e-3",
         "--warmup-epochs", "0.5", "--threads", "1", "--no-bf16", "--work-dir", str(tmp_path / name),
         "--out", str(tmp_path / name / "w.safetensors")])


def test_training_learns_and_writes_loadable_weights(tiny_recipe, tmp_path):
    result = train_reference.train(_args(tmp_path, 3))
    hist = result["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert hist[-1]["test_top1"] > 0.15          # 10 classes: chance is 0.10
    state = load_file(result["weights"])
    model = reference.build("vit_cifar_narrow")
    model.load_state_dict(state)                  # strict: every tensor present, shapes right
    log = json.loads((tmp_path / "run" / "vit_cifar_narrow.log.json").read_text())
    assert log["history"] == hist


def test_interrupted_run_resumes_to_the_same_weights(tiny_recipe, tmp_path, monkeypatch):
    straight = load_file(train_reference.train(_args(tmp_path, 2, "straight"))["weights"])

    real_evaluate, calls = train_reference.evaluate, []

    def dies_in_epoch_2(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt   # killed during epoch 2, after epoch 1's checkpoint
        return real_evaluate(*a, **k)

    monkeypatch.setattr(train_reference, "evaluate", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_reference.train(_args(tmp_path, 2, "resumed"))
    assert not (tmp_path / "resumed" / "w.safetensors").exists()
    ckpt = torch.load(tmp_path / "resumed" / "vit_cifar_narrow.last.pt", weights_only=True)
    assert ckpt["epoch"] == 1
    monkeypatch.setattr(train_reference, "evaluate", real_evaluate)
    resumed = load_file(train_reference.train(_args(tmp_path, 2, "resumed"))["weights"])
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)   # seeded + resumable
