import numpy as np
import pytest
import timm
import torch
from PIL import Image

import compress.zoo  # noqa: F401  (registers the zoo models and their pretrained_cfgs with timm)
from calibration_data import (CalibrationDataError, bundled_path, default_calibration_for, default_evaluation_for,
                              load_image_set, make_loader)


def test_bundled_sets_are_complete_and_balanced():
    calib = load_image_set("cifar10-calib", check=False)
    evaluation = load_image_set("cifar10-eval", check=False)
    assert len(calib) == 500 and len(evaluation) == 2000
    assert np.bincount(evaluation.labels).tolist() == [200] * 10
    assert np.bincount(calib.labels).tolist() == [50] * 10
    imagenet = load_image_set("imagenet")
    assert len(imagenet) == 64 and imagenet.labelled and len(imagenet.classes) == 1000


def test_subset_is_seeded_and_deterministic():
    a = load_image_set("cifar10-eval", num=50, seed=3)
    b = load_image_set("cifar10-eval", num=50, seed=3)
    c = load_image_set("cifar10-eval", num=50, seed=4)
    assert a.paths == b.paths and a.paths != c.paths and len(a) == 50


def test_loader_uses_model_preprocessing():
    model = timm.create_model("vit_cifar_ref")
    x, y = next(iter(make_loader(load_image_set("cifar10-eval", num=8), model, batch_size=8)))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert -3 < x.mean() < 3 and x.std() > 0.3  # normalised with CIFAR mean/std, not [0, 1]
    deit = timm.create_model("deit_tiny_patch16_224")
    x, _ = next(iter(make_loader(load_image_set("imagenet", num=2), deit, batch_size=2)))
    assert x.shape == (2, 3, 224, 224)


def test_flat_folder_with_odd_images(tmp_path):
    Image.new("L", (40, 30), 128).save(tmp_path / "gray.png")
    Image.new("RGBA", (20, 50), (10, 20, 30, 40)).save(tmp_path / "rgba.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 truncated garbage")
    images = load_image_set(tmp_path)
    assert len(images) == 2 and images.skipped == 2 and not images.labelled
    x, y = next(iter(make_loader(images, timm.create_model("vit_cifar_ref"), batch_size=2)))
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [-1, -1]


def test_errors_are_one_line(tmp_path):
    with pytest.raises(CalibrationDataError, match="does not exist"):
        load_image_set(tmp_path / "missing")
    with pytest.raises(CalibrationDataError, match="no readable images"):
        load_image_set(tmp_path)
    (tmp_path / "junk.png").write_bytes(b"nope")
    with pytest.raises(CalibrationDataError) as err:
        load_image_set(tmp_path)
    assert "\n" not in str(err.value)


def test_default_sets_are_the_ones_the_pretrained_cfg_names():
    # by timm name: the cfg registered with timm (the zoo's name theirs, timm's own name none)
    assert default_calibration_for("vit_cifar_ref") == bundled_path("cifar10-calib")
    assert default_evaluation_for("vit_cifar_narrow") == bundled_path("cifar10-eval")
    assert default_calibration_for("vit_small_patch14_imgfocus") == "cifar10:train"
    assert default_calibration_for("deit_small_patch16_224") == bundled_path("imagenet")
    # data, not names: a look-alike name without a registered cfg, and a model whose cfg names a set
    assert default_calibration_for("vit_cifar_unregistered") == bundled_path("imagenet")
    plain = torch.nn.Linear(2, 2)
    assert default_evaluation_for(plain) == bundled_path("imagenet")
    plain.pretrained_cfg = {"calibration": "cifar10-calib", "evaluation": "cifar10:test"}
    assert default_calibration_for(plain) == bundled_path("cifar10-calib")
    assert default_evaluation_for(plain) == "cifar10:test"
