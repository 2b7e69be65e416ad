"""Calibration and evaluation images: folders on disk, the bundled real sets, CIFAR-10.

    images = load_image_set("cifar10-calib", num=256)      # or any folder
    loader = make_loader(images, model, batch_size=64)     # preprocessing from timm's data config
"""
from .cifar10 import load_cifar10
from .errors import CalibrationDataError
from .images import (BUNDLED, CIFAR10_SPLITS, IMAGENET_WNIDS, ImageSet, bundled_path, cifar10_split, cifar10_test_set,
                     default_calibration_for, default_evaluation_for, is_spec, load_image_set, make_loader,
                     resolve_data_config)

__all__ = ["BUNDLED", "CIFAR10_SPLITS", "IMAGENET_WNIDS", "CalibrationDataError", "ImageSet", "bundled_path",
           "cifar10_split",
           "cifar10_test_set", "default_calibration_for", "default_evaluation_for", "is_spec", "load_image_set",
           "load_cifar10", "make_loader", "resolve_data_config"]
