"""Calibration statistics of the dense model, gathered in one pass with forward hooks.

Per compressible Linear (inputs flattened over batch and tokens, METHOD.md notation):
the Gram matrix C = X X^T (float64, streaming, so memory does not grow with the number
of images), the sums of |x| and of x (for the ``diag`` and ``mean-input`` variants) and the
token count. The same pass records the per-tensor input range of every Linear of the
dense model (for its INT8 export) and the dense logits (to measure agreement later).
Results can be cached on disk (safetensors + JSON) keyed by the model's weights, the
layer set and the calibration images, so runs with other budgets or methods skip the pass.
Everything but the ranges is a sum over images, so ``collect`` = ``finish(accumulate(...))``
and shards of the images can be accumulated apart and added (compress/distributed.py);
histograms merge with ``merge_range_states``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from cliutil import atomic_path, write_json

from .errors import CompressError
from .quantize import RangeObserver, quantizable_layers

log = logging.getLogger(__name__)

CACHE_VERSION = 1


@dataclass(frozen=True)
class LayerStats:
    """Sufficient statistics of one layer's input: Gram, sum |x|, sum x, token count."""
    gram: torch.Tensor      # n x n float64, sum over tokens of x x^T
    abs_sum: torch.Tensor   # n float64
    sum: torch.Tensor       # n float64
    count: int

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)


@dataclass(frozen=True)
class Stats:
    layers: dict[str, LayerStats]
    ranges: dict[str, dict]            # every Linear of the dense model -> RangeObserver state
    logits: torch.Tensor               # dense model outputs on the calibration images
    images: int
    key: str = ""
    from_cache: bool = field(default=False, compare=False)


GRAM_PRECISIONS = {"float64": torch.float64, "float32": torch.float32}


def accumulate_gram(acc: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None = None,
                    precision: str = "float64") -> None:
    """acc += x^T y (rows are tokens), summed in float64 (METHOD.md Notation).

    ``precision`` is the dtype of the per-batch product: "float64" (default, exact to
    double rounding) or "float32" (about 2x faster on CPUs; each batch's product carries
    ~1e-6 relative rounding, far below the whitening damping, and batches are still summed
    in float64 so the error does not grow with the number of images).
    """
    dt = GRAM_PRECISIONS[precision]
    xd = x.detach().to(dt)
    if y is None:
        _accumulate_symmetric(acc, xd)
        return
    yd = y.detach().to(dt)
    if dt == acc.dtype and xd.device == acc.device:
        acc.addmm_(xd.T, yd)
    else:
        acc.add_((xd.T @ yd).to(device=acc.device, dtype=acc.dtype))


def _accumulate_symmetric(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc += x^T x computing only the block upper triangle, then mirroring it (a blocked syrk).

    ``acc`` is symmetric before and after. With 2-4 column blocks the products cost 60-75% of
    the full x^T x (measured in float64 on 12,608 tokens: 0.59x at width 3072, 0.74x at 768).
    """
    n = x.shape[1]
    blocks = 4 if n >= 2048 else 2 if n >= 512 else 1
    edges = [round(i * n / blocks) for i in range(blocks + 1)]
    direct = x.dtype == acc.dtype and x.device == acc.device
    for a, b in zip(edges, edges[1:]):
        if direct:
            acc[a:b, a:].addmm_(x[:, a:b].T, x[:, a:])
        else:
            acc[a:b, a:].add_((x[:, a:b].T @ x[:, a:]).to(device=acc.device, dtype=acc.dtype))
    for a, b in zip(edges, edges[1:]):
        diag = acc[a:b, a:b]
        diag.copy_((diag + diag.T) / 2)          # GEMM kernels need not round (i, j) and (j, i) alike
        acc[b:, a:b] = acc[a:b, b:].T


def _inputs(batch) -> torch.Tensor:
    """Loaders yield (images, labels); plain tensors are accepted too."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@dataclass
class Partial:
    """The unreduced sums of ``collect`` over some batches: what the ranks of a sharded pass add up
    (compress/distributed.py) before ``finish`` checks them and makes ``Stats``."""
    sums: dict[str, dict]        # layer -> gram, abs_sum, sum (float64 tensors), count (int)
    ranges: dict[str, dict]      # every range layer -> RangeObserver state
    logits: list[torch.Tensor]   # dense outputs, one tensor per batch, in batch order
    images: int


@torch.no_grad()
def collect(model: nn.Module, layer_names: Iterable[str], batches: Iterable, device: str = "cpu",
            range_layers: Iterable[str] | None = None, total: int | None = None,
            histogram: bool = False, precision: str = "float64") -> Stats:
    """One forward pass over ``batches`` gathering the statistics of ``layer_names``.

    ``histogram`` keeps |x| histograms of the Linear inputs (needed for percentile ranges);
    ``precision`` is the per-batch Gram product dtype (see ``accumulate_gram``).
    """
    return finish(accumulate(model, layer_names, batches, device, range_layers, total, histogram, precision))


@torch.no_grad()
def accumulate(model: nn.Module, layer_names: Iterable[str], batches: Iterable, device: str = "cpu",
               range_layers: Iterable[str] | None = None, total: int | None = None,
               histogram: bool = False, precision: str = "float64",
               widths: dict[str, float] | None = None) -> Partial:
    """The sums of ``collect`` over ``batches``, unchecked (an empty ``batches`` gives zeros).

    ``widths``: histogram bin widths to start from instead of laying the bins out at the first
    batch, so that a shard's histograms share the bins of the whole pass (``merge_range_states``).
    """
    names = list(layer_names)
    mods = {n: model.get_submodule(n) for n in names}
    range_mods = (quantizable_layers(model) if range_layers is None
                  else {n: model.get_submodule(n) for n in range_layers})
    acc = {n: dict(gram=torch.zeros(m.in_features, m.in_features, dtype=torch.float64),
                   abs_sum=torch.zeros(m.in_features, dtype=torch.float64),
                   sum=torch.zeros(m.in_features, dtype=torch.float64), count=0)
           for n, m in mods.items()}
    observers = {n: RangeObserver(histogram) for n in range_mods}
    for n, w in (widths or {}).items():
        if histogram and w > 0 and n in observers:
            o = observers[n]
            o.width, o.counts = float(w), torch.zeros(o.bins, dtype=torch.float64)

    def gram_hook(name):
        def hook(_mod, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            a = acc[name]
            accumulate_gram(a["gram"], x, precision=precision)
            x64 = x.to(torch.float64)
            a["abs_sum"] += x64.abs().sum(0).cpu()
            a["sum"] += x64.sum(0).cpu()
            a["count"] += x64.shape[0]
        return hook

    def range_hook(name):
        def hook(_mod, inputs):
            observers[name].update(inputs[0])
        return hook

    handles = [m.register_forward_pre_hook(gram_hook(n)) for n, m in mods.items()]
    handles += [m.register_forward_pre_hook(range_hook(n)) for n, m in range_mods.items()]
    model.eval().to(device)
    logits, images = [], 0
    try:
        for batch in tqdm(batches, desc="calibration statistics", unit="batch", total=total,
                          mininterval=5, disable=None):
            x = _inputs(batch).to(device)
            logits.append(model(x).float().cpu())
            images += x.shape[0]
    finally:
        for h in handles:
            h.remove()
    return Partial(acc, {n: o.state() for n, o in observers.items()}, logits, images)


def finish(p: Partial) -> Stats:
    """``Stats`` from the sums of the whole calibration set, refusing empty or non-finite ones."""
    images = p.images
    if images == 0:
        raise CompressError("the calibration loader yielded no images")
    layers = {}
    for n, a in p.sums.items():
        if a["count"] == 0:
            raise CompressError(f"{n}: its forward hooks saw no tokens in {images} images (the model never calls "
                                "this Linear; it reads its weight directly?), so it cannot be compressed")
        if not (torch.isfinite(a["gram"]).all() and torch.isfinite(a["abs_sum"]).all()):
            raise CompressError(f"non-finite activations at the input of {n}: check the model weights "
                                "and the calibration images")
        layers[n] = LayerStats(a["gram"], a["abs_sum"], a["sum"], a["count"])
    return Stats(layers, p.ranges, torch.cat(p.logits), images)


def merge_range_states(states: list[dict]) -> dict:
    """One RangeObserver state from the states of disjoint shards of a pass.

    The max is the max. Histograms started from the same bin width (``accumulate(widths=)``) differ
    only by how often each halved its resolution, so each is re-binned to the coarsest width (and
    coarser while more than ``max_bins`` bins would be needed, as one observer does): the counts are
    then those of one observer over all the images, up to values on a bin edge. Histograms laid out
    independently (a layer whose first batch was all zeros) are re-binned by bin centre, which is
    approximate: that is logged.
    """
    amax = max(float(s["amax"]) for s in states)
    zeros = sum(int(s.get("zeros", 0)) for s in states)
    empty = torch.zeros(0, dtype=torch.float64)
    if not bool(states[0].get("histogram", True)):
        return {"amax": amax, "width": 0.0, "zeros": 0, "histogram": False, "counts": empty}
    laid = [s for s in states if float(s["width"]) > 0]
    if not laid:   # every shard saw only zeros
        return {"amax": amax, "width": 0.0, "zeros": zeros, "histogram": True, "counts": empty}
    unlaid_zeros = sum(int(s.get("zeros", 0)) for s in states if float(s["width"]) == 0)
    base = min(float(s["width"]) for s in laid)
    ratios = [math.log2(float(s["width"]) / base) for s in laid]
    if any(abs(r - round(r)) > 1e-9 for r in ratios):
        log.warning("range histograms of the shards have unrelated bin widths; merged approximately by bin centre")
    max_bins = RangeObserver().max_bins
    width = max(float(s["width"]) for s in laid)

    def length(w):
        return max([math.ceil(amax / w)] + [math.ceil(len(s["counts"]) * float(s["width"]) / w) for s in laid])

    while length(width) > max_bins:
        width *= 2
    counts = torch.zeros(length(width), dtype=torch.float64)
    for s in laid:
        c = s["counts"].double()
        idx = ((torch.arange(len(c), dtype=torch.float64) + 0.5) * (float(s["width"]) / width)).long()
        counts.index_add_(0, idx.clamp_(max=len(counts) - 1), c)
    counts[0] += unlaid_zeros
    return {"amax": amax, "width": width, "zeros": zeros, "histogram": True, "counts": counts}


# ----------------------------------------------------------------------------- cache
def cache_key(model_fingerprint: str, layer_names: Iterable[str], calib_hash: str, images: int,
              extra: str = "") -> str:
    h = hashlib.sha256()
    for part in (f"v{CACHE_VERSION}", model_fingerprint, ",".join(layer_names), calib_hash,
                 str(images), extra):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def cached_collect(cache_dir: str | Path | None, key: str, compute: Callable[[], Stats]) -> Stats:
    """``compute()`` unless ``cache_dir/key.*`` holds a valid earlier result; then store it."""
    if cache_dir is None:
        return compute()
    cache_dir = Path(cache_dir).expanduser()
    found = load_stats(cache_dir, key)
    if found is not None:
        log.info("calibration statistics loaded from cache %s", cache_dir / f"{key}.json")
        return found
    return store(cache_dir, key, compute())


def store(cache_dir: str | Path, key: str, stats: Stats) -> Stats:
    """Write ``stats`` as cache entry ``key`` (a failed write is only a warning); ``stats`` keyed."""
    cache_dir = Path(cache_dir).expanduser()
    try:
        save_stats(cache_dir, key, stats)
    except OSError as e:
        log.warning("could not write the statistics cache in %s: %s", cache_dir, e)
    return Stats(stats.layers, stats.ranges, stats.logits, stats.images, key)


def save_stats(cache_dir: Path, key: str, stats: Stats) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    tensors = {"logits": stats.logits.contiguous()}
    meta = {"version": CACHE_VERSION, "key": key, "images": stats.images, "layers": {},
            "ranges": {}}
    for n, s in stats.layers.items():
        tensors[f"{n}/gram"] = s.gram.contiguous()
        tensors[f"{n}/abs_sum"] = s.abs_sum.contiguous()
        tensors[f"{n}/sum"] = s.sum.contiguous()
        meta["layers"][n] = {"count": s.count}
    for n, r in stats.ranges.items():
        tensors[f"range/{n}/counts"] = r["counts"].contiguous()
        meta["ranges"][n] = {k: v for k, v in r.items() if k != "counts"}
    # tensors first, JSON last: the JSON's presence marks a complete entry
    with atomic_path(cache_dir / f"{key}.safetensors") as tmp:
        save_file(tensors, str(tmp))
    write_json(cache_dir / f"{key}.json", meta, indent=None)


def load_stats(cache_dir: Path, key: str) -> Stats | None:
    """The cached entry, or None when absent or unreadable (a broken entry is recomputed)."""
    meta_path, data_path = cache_dir / f"{key}.json", cache_dir / f"{key}.safetensors"
    if not (meta_path.is_file() and data_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("version") != CACHE_VERSION or meta.get("key") != key:
            return None
        t = load_file(str(data_path))
        layers = {n: LayerStats(t[f"{n}/gram"], t[f"{n}/abs_sum"], t[f"{n}/sum"], int(v["count"]))
                  for n, v in meta["layers"].items()}
        ranges = {n: dict(v, counts=t[f"range/{n}/counts"]) for n, v in meta["ranges"].items()}
        return Stats(layers, ranges, t["logits"], int(meta["images"]), key, from_cache=True)
    except Exception as e:  # noqa: BLE001 - any damage to a cache entry means: recompute
        log.warning("ignoring unreadable statistics cache entry %s: %s", data_path, e)
        return None
