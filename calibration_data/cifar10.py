"""CIFAR-10 as decoded uint8 arrays, read from the lossless PNG archive in shared/data.

Decoding 60,000 PNGs takes ~20 s, so the arrays are cached as an .npz beside the user's
cache directory; the cache is keyed by the archive's size and mtime and rebuilt if stale.
"""
from __future__ import annotations

import io
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from cliutil import atomic_path

from .errors import CalibrationDataError

log = logging.getLogger(__name__)

CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")
DEFAULT_ARCHIVE = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
                   / "cifar10" / "cifar10-png.tar.gz")


def default_archive() -> Path:
    return Path(os.environ.get("CIFAR10_ARCHIVE", DEFAULT_ARCHIVE)).resolve()


def _cache_dir() -> Path:
    root = os.environ.get("VIT_EDGE_CACHE", Path.home() / ".cache" / "vit-edge")
    return Path(root)


def load_cifar10(split: str, archive: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 [N,32,32,3], labels int64 [N]) for split 'train' or 'test'.

    Files are sorted by path inside each split, so the order is deterministic.
    """
    if split not in ("train", "test"):
        raise CalibrationDataError(f"unknown CIFAR-10 split {split!r}; use 'train' or 'test'")
    archive = Path(archive) if archive else default_archive()
    if not archive.is_file():
        raise CalibrationDataError(
            f"CIFAR-10 archive not found at {archive}; set CIFAR10_ARCHIVE to cifar10-png.tar.gz")
    st = archive.stat()
    cache = _cache_dir() / f"cifar10-{st.st_size}-{int(st.st_mtime)}.npz"
    if not cache.is_file():
        _decode_to_cache(archive, cache)
    with np.load(cache) as data:
        return data[f"{split}_x"], data[f"{split}_y"]


def _decode_to_cache(archive: Path, cache: Path) -> None:
    members: dict[str, list[tuple[str, bytes]]] = {"train": [], "test": []}
    with tarfile.open(archive, "r:gz") as tar:
        for m in tqdm(tar, desc="reading CIFAR-10 archive", unit="file", mininterval=2):
            if not m.isfile() or not m.name.endswith(".png"):
                continue
            parts = Path(m.name).parts
            split, cls = parts[-3], parts[-2]
            if split in members and cls in CLASSES:
                members[split].append((m.name, tar.extractfile(m).read()))
    arrays = {}
    for split, items in members.items():
        items.sort()
        xs = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for _, b in items])
        ys = np.array([CLASSES.index(Path(n).parts[-2]) for n, _ in items], dtype=np.int64)
        arrays[f"{split}_x"], arrays[f"{split}_y"] = xs, ys
    if len(arrays["train_x"]) != 50000 or len(arrays["test_x"]) != 10000:
        raise CalibrationDataError(f"{archive} is incomplete: expected 50,000 train and 10,000 test images")
    with atomic_path(cache) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    log.info("cached decoded CIFAR-10 at %s", cache)
    for stale in cache.parent.glob("cifar10-*.npz"):   # an archive copied or touched since: 177 MB each
        if stale != cache:
            stale.unlink(missing_ok=True)
