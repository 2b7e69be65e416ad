"""Image sets on disk (ImageFolder or flat folder) and the DataLoaders that feed models.

Preprocessing is never hard-coded: it is resolved from the model's timm data config, so
calibration and evaluation see exactly what the weights were trained on.
"""
from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform
from timm.data import resolve_data_config as timm_resolve
from timm.models import get_pretrained_cfg

from .cifar10 import CLASSES, load_cifar10
from .errors import CalibrationDataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif"}
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
BUNDLED = {
    "cifar10-calib": BUNDLED_DIR / "cifar10" / "calib",
    "cifar10-eval": BUNDLED_DIR / "cifar10" / "eval",
    "imagenet": BUNDLED_DIR / "imagenet",
}
IMAGENET_WNIDS = BUNDLED_DIR / "imagenet_wnids.txt"


@dataclass(frozen=True)
class ImageSet:
    """A list of images with integer labels (-1 when unknown) and the class names."""
    root: str
    paths: tuple[Path, ...] = ()
    labels: tuple[int, ...] = ()
    classes: tuple[str, ...] = ()
    skipped: int = 0
    arrays: np.ndarray | None = field(default=None, repr=False, compare=False)  # uint8 NHWC

    def __len__(self) -> int:
        return len(self.arrays) if self.arrays is not None else len(self.paths)

    @property
    def labelled(self) -> bool:
        return len(self.labels) > 0 and min(self.labels) >= 0

    def fingerprint(self) -> str:
        """Content-independent identity of the set (relative names + count), for cache keys."""
        h = hashlib.sha256()
        if self.arrays is not None:
            h.update(self.root.encode())
            h.update(np.ascontiguousarray(self.arrays[:64]).tobytes())
        for p in self.paths:
            h.update(p.name.encode())
            h.update(str(p.stat().st_size).encode())
        h.update(str(len(self)).encode())
        return h.hexdigest()[:16]


def bundled_path(name: str) -> Path:
    """Path of a bundled image set: 'cifar10-calib', 'cifar10-eval' or 'imagenet'."""
    if name not in BUNDLED:
        raise CalibrationDataError(f"unknown bundled set {name!r}; choose one of {', '.join(BUNDLED)}")
    return BUNDLED[name]


CIFAR10_SPLITS = {"cifar10:train": "train", "cifar10:test": "test"}


def _pretrained_cfg(model) -> dict:
    """A built model's pretrained_cfg, or for a timm name the one registered with timm (None for
    names without one, e.g. an entry point)."""
    if isinstance(model, str):
        try:
            cfg = get_pretrained_cfg(model)
        except RuntimeError:   # a name timm reads as 'arch.tag' with an unknown tag
            return {}
        return cfg.to_dict() if cfg is not None else {}
    return getattr(model, "pretrained_cfg", None) or {}


def _default_set(model, key: str) -> str | Path:
    """A model's default image set: the one its pretrained_cfg's ``key`` names (the zoo models set
    theirs), else the bundled ImageNet images."""
    name = _pretrained_cfg(model).get(key)
    return bundled_path(name) if name in BUNDLED else (name or bundled_path("imagenet"))


def default_calibration_for(model) -> str | Path:
    """The calibration set that matches a model's training data (a model, or a timm name)."""
    return _default_set(model, "calibration")


def default_evaluation_for(model) -> str | Path:
    return _default_set(model, "evaluation")


def is_spec(path) -> bool:
    """Whether ``path`` names a built-in set ('cifar10:train', 'cifar10:test') rather than a folder."""
    return isinstance(path, (str, Path)) and str(path) in CIFAR10_SPLITS


def cifar10_split(split: str, num: int | None = None, seed: int = 0, archive: str | Path | None = None) -> ImageSet:
    """A seeded random subset of a CIFAR-10 split (shared/data), in memory. The subset of ``num``
    images is a prefix of the subset of any larger ``num`` with the same seed, so extra images
    (e.g. a held-out split) never change which images the first ``num`` are."""
    x, y = load_cifar10(split, archive)
    order = np.random.default_rng(seed).permutation(len(x))[:num]
    return ImageSet(f"cifar10:{split}", (), tuple(int(v) for v in y[order]), CLASSES, 0, arrays=x[order])


# What PIL raises for a file it will not decode: not an image, truncated or corrupt, or larger
# than its decompression-bomb limit (Image.MAX_IMAGE_PIXELS; DecompressionBombError is no OSError).
UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except UNREADABLE:
        return False


def _wnid_labels(files: list[Path]) -> tuple[list[int], tuple[str, ...]] | None:
    """Flat ImageNet-style names '<wnid>_<name>.JPEG' -> standard class indices."""
    wnids = IMAGENET_WNIDS.read_text().split()
    index = {w: i for i, w in enumerate(wnids)}
    labels = [index.get(p.name.split("_", 1)[0], -1) for p in files]
    return (labels, tuple(wnids)) if labels and min(labels) >= 0 else None


def load_image_set(path: str | Path, num: int | None = None, seed: int = 0,
                   check: bool = True) -> ImageSet:
    """Scan ``path`` (a name from ``BUNDLED`` or ``CIFAR10_SPLITS`` works too) for images.

    Layouts: ImageFolder (``root/<class>/*.jpg``, labels from sorted class folders) or a
    flat folder (unlabelled, or ImageNet-labelled when files are named ``<wnid>_*``).
    ``num`` takes a seeded random subset (deterministic), ``check`` skips files that are
    not decodable images (counted in ``skipped``); an empty result is an error.
    """
    if is_spec(path):
        if num is not None and num < 1:
            raise CalibrationDataError(f"number of images must be >= 1, got {num}")
        return cifar10_split(CIFAR10_SPLITS[str(path)], num, seed)
    if isinstance(path, str) and path in BUNDLED:
        path = BUNDLED[path]
    root = Path(path).expanduser()
    if not root.exists():
        raise CalibrationDataError(f"image folder {root} does not exist; pass an existing folder with --calib/--data")
    if not root.is_dir():
        raise CalibrationDataError(f"{root} is not a folder; pass a folder of images (flat or one subfolder per class)")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files: list[Path] = []
    labels: list[int] = []
    classes: tuple[str, ...] = ()
    if subdirs:
        classes = tuple(d.name for d in subdirs)
        for i, d in enumerate(subdirs):
            found = sorted(p for p in d.rglob("*") if p.is_file() and not p.name.startswith("."))
            files += found
            labels += [i] * len(found)
    else:
        files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    candidates = [(p, y) for p, y in zip(files, labels or [-1] * len(files))
                  if p.suffix.lower() in IMAGE_SUFFIXES]
    skipped = len(files) - len(candidates)
    if num is not None:
        if num < 1:
            raise CalibrationDataError(f"number of images must be >= 1, got {num}")
        rng = random.Random(seed)
        # sample more than needed so unreadable files can be replaced deterministically
        order = list(range(len(candidates)))
        rng.shuffle(order)
        candidates = [candidates[i] for i in order]
    kept: list[tuple[Path, int]] = []
    for p, y in candidates:
        if num is not None and len(kept) >= num:
            break
        if check and not _readable(p):
            skipped += 1
            continue
        kept.append((p, y))
    if not kept:
        raise CalibrationDataError(
            f"no readable images in {root} ({skipped} files skipped); expected .jpg/.png files, "
            "flat or in one subfolder per class")
    if skipped:
        log.warning("skipped %d non-image or unreadable files in %s", skipped, root)
    if num is not None and len(kept) < num:
        log.warning("asked for %d images but %s holds only %d usable ones", num, root, len(kept))
    paths = tuple(p for p, _ in kept)
    labs = [y for _, y in kept]
    if not subdirs:
        wn = _wnid_labels(list(paths))
        if wn is not None:
            labs, classes = wn
    return ImageSet(str(root), paths, tuple(labs), classes, skipped)


def cifar10_test_set(archive: str | Path | None = None, num: int | None = None, seed: int = 0) -> ImageSet:
    """The full CIFAR-10 test split (10,000 images) from shared/data, as an in-memory set."""
    x, y = load_cifar10("test", archive)
    if num is not None and num < len(x):
        idx = np.sort(np.random.default_rng(seed).choice(len(x), num, replace=False))
        x, y = x[idx], y[idx]
    return ImageSet("cifar10:test", (), tuple(int(v) for v in y), CLASSES, 0, arrays=x)


def resolve_data_config(model_or_config) -> dict:
    """timm data config of a model (or a dict/pretrained_cfg passed through)."""
    if isinstance(model_or_config, dict):
        return timm_resolve(model_or_config)
    return timm_resolve({}, model=model_or_config)


class _Dataset(torch.utils.data.Dataset):
    def __init__(self, images: ImageSet, transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        label = self.images.labels[i] if self.images.labels else -1
        if self.images.arrays is not None:
            img = Image.fromarray(self.images.arrays[i])
        else:
            path = self.images.paths[i]
            try:
                with Image.open(path) as im:
                    img = im.convert("RGB")  # grayscale, palette and RGBA become RGB
            except UNREADABLE as e:
                raise CalibrationDataError(f"cannot read image {path}: {str(e).splitlines()[0]}") from None
        return self.transform(img), label


def make_loader(images: ImageSet, model_or_data_config, batch_size: int = 64,
                num_workers: int = 0) -> torch.utils.data.DataLoader:
    """Deterministic (unshuffled) loader of (float32 NCHW, int64 labels) preprocessed for the model."""
    cfg = resolve_data_config(model_or_data_config)
    transform = create_transform(**cfg, is_training=False)
    return torch.utils.data.DataLoader(_Dataset(images, transform), batch_size=batch_size,
                                       shuffle=False, num_workers=num_workers)
