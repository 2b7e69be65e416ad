"""torch.distributed for the statistics pass and for searches over independent configurations.

Under ``torchrun`` (WORLD_SIZE > 1 in the environment; nothing here initialises torch.distributed
otherwise) ``collect`` shards compress's statistics pass: the calibration loader's batches are cut
into one contiguous run per rank (whole batches, so every batch is the one a single process would
form), each rank accumulates its float64 sums (stats.accumulate), and rank 0 receives the totals:
Grams, sums of |x| and x and token counts are summed, range observers merged (maxima; histograms
re-binned to shared bins, stats.merge_range_states), dense logits gathered in image order. Rank 0
finishes the run alone; the other ranks get None. ``split_jobs`` / ``gather_rows`` share independent
jobs (the study's configurations) round-robin and collect their rows on rank 0.

Backend: gloo for CPU tensors, NCCL for CUDA tensors ("cpu:gloo,cuda:nccl" when CUDA is present,
else "gloo"); a device "cuda" means this rank's ``cuda:LOCAL_RANK``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist

from . import stats
from .errors import CompressError
from .stats import Partial, merge_range_states

log = logging.getLogger(__name__)

_independent = False   # set by split_jobs: this process's compress runs are its own, not shards
_jobs_group = False    # split_jobs made the process group (gather_rows then ends it)


def world_size() -> int:
    """torchrun's WORLD_SIZE (1 without torchrun); read from the environment, nothing initialised."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Rank 0, the one that writes (also True without torchrun)."""
    return rank() == 0


def shards_statistics() -> bool:
    """Whether compress's statistics pass is sharded across ranks in this process."""
    return world_size() > 1 and not _independent


def shard(n_batches: int, rank: int, world: int) -> range:
    """The batches of ``rank``: a contiguous run, sizes differing by at most one (possibly empty)."""
    return range(rank * n_batches // world, (rank + 1) * n_batches // world)


def local_device(device: str) -> str:
    """``cuda`` without an index is this rank's GPU under torchrun; anything else is kept."""
    if device == "cuda" and world_size() > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def _init() -> bool:
    """The default process group from torchrun's environment (once); True if this call made it."""
    if dist.is_initialized():
        return False
    backend = "gloo"
    if torch.cuda.is_available() and dist.is_nccl_available():
        backend = "cpu:gloo,cuda:nccl"
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local < torch.cuda.device_count():
            torch.cuda.set_device(local)
    dist.init_process_group(backend)
    log.info("torch.distributed: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


def _done(own: bool) -> None:
    if own and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- statistics pass
def collect(model: torch.nn.Module, layer_names: Iterable[str], images, loader_for: Callable,
            batch_size: int, device: str = "cpu", *, histogram: bool = False, precision: str = "float64",
            cache_dir: str | Path | None = None, key: str = ""):
    """stats.collect of ``images`` sharded over the ranks: the Stats on rank 0, None on the others.

    ``loader_for(part)`` makes the (unshuffled) loader of a slice of ``images`` with ``batch_size``.
    Rank 0 alone reads and writes the cache ``cache_dir/key``; on a hit no rank runs the pass.
    """
    own = _init()
    try:
        r, w = dist.get_rank(), dist.get_world_size()
        found = stats.load_stats(Path(cache_dir).expanduser(), key) if cache_dir and r == 0 else None
        hit = [found is not None]
        dist.broadcast_object_list(hit, src=0)
        if hit[0]:
            if r == 0:
                log.info("calibration statistics loaded from cache %s", Path(cache_dir) / f"{key}.json")
            return found
        dev = local_device(device)
        names = list(layer_names)
        mine = shard(math.ceil(len(images) / batch_size), r, w)
        part = _slice(images, mine.start * batch_size, min(mine.stop * batch_size, len(images)))
        error, partial = None, None
        try:
            widths = None
            if histogram and r > 0 and len(part):
                # the bins of the whole pass are laid out at its first batch: see it too
                first = next(iter(loader_for(_slice(images, 0, batch_size))))
                seen = stats.accumulate(model, [], [first], dev, histogram=True)
                widths = {n: s["width"] for n, s in seen.ranges.items()}
            partial = stats.accumulate(model, names, loader_for(part) if len(part) else [], dev,
                                       total=len(mine), histogram=histogram, precision=precision, widths=widths)
        except Exception as e:  # noqa: BLE001 - told to every rank below, then re-raised here
            error = e
        # every rank learns whether any failed (else the others would wait in the reduction forever)
        info = {"error": None if error is None else f"{type(error).__name__}: {error}",
                "images": 0 if partial is None else partial.images,
                "tail": None if partial is None or not partial.logits else tuple(partial.logits[0].shape[1:])}
        infos = [None] * w
        dist.all_gather_object(infos, info)
        if error is not None:
            raise error
        failed = [(i, x["error"]) for i, x in enumerate(infos) if x["error"]]
        if failed:
            raise CompressError(f"rank {failed[0][0]} failed in the statistics pass: {failed[0][1]}")
        total = _reduce_(partial, infos, dev)
        if r != 0:
            return None
        st = stats.finish(total)
        return stats.store(cache_dir, key, st) if cache_dir else st
    finally:
        _done(own)


def _slice(images, start: int, stop: int):
    """Images ``start:stop`` of an ImageSet (paths, labels and in-memory arrays alike)."""
    sl = slice(start, stop)
    return dataclasses.replace(images, paths=images.paths[sl], labels=images.labels[sl],
                               arrays=None if images.arrays is None else images.arrays[sl])


def _sum_to_root_(t: torch.Tensor, dev: str) -> None:
    """t (on the CPU) becomes the sum over ranks on rank 0; on CUDA the sum runs on the GPU (NCCL)."""
    if dev.startswith("cuda"):
        g = t.to(dev)
        dist.reduce(g, dst=0)
        t.copy_(g.cpu())
    else:
        dist.reduce(t, dst=0)


def _reduce_(p, infos: list[dict], dev: str):
    """The stats.Partial of all ranks on rank 0 (partial sums elsewhere)."""
    r, w = dist.get_rank(), dist.get_world_size()
    for a in p.sums.values():
        _sum_to_root_(a["gram"], dev)
    if p.sums:  # the vectors and counts of every layer in one message each
        vec = torch.cat([torch.cat([a["abs_sum"], a["sum"]]) for a in p.sums.values()])
        _sum_to_root_(vec, dev)
        counts = torch.tensor([a["count"] for a in p.sums.values()], dtype=torch.int64)
        _sum_to_root_(counts, dev)
        at = 0
        for i, a in enumerate(p.sums.values()):
            n = len(a["sum"])
            a["abs_sum"], a["sum"] = vec[at:at + n].clone(), vec[at + n:at + 2 * n].clone()
            a["count"] = int(counts[i])
            at += 2 * n
    states = [None] * w if r == 0 else None
    dist.gather_object(p.ranges, states, dst=0)
    logits = _gather_logits(p.logits, infos, dev)
    if r != 0:
        return None
    ranges = {n: merge_range_states([s[n] for s in states]) for n in p.ranges}
    return Partial(p.sums, ranges, logits, sum(x["images"] for x in infos))


def _gather_logits(mine: list[torch.Tensor], infos: list[dict], dev: str) -> list[torch.Tensor]:
    """Every rank's dense outputs on rank 0, in rank (= image) order; padded to one size to travel."""
    tails = [x["tail"] for x in infos if x["tail"] is not None]
    if not tails:   # no rank saw an image: stats.finish says so
        return []
    tail = tails[0]
    rows = max(x["images"] for x in infos)
    buf = torch.zeros((rows, *tail), dtype=torch.float32)
    if mine:
        y = torch.cat(mine)
        buf[:len(y)] = y
    on = dev if dev.startswith("cuda") else "cpu"
    buf = buf.to(on)
    out = [torch.empty_like(buf) for _ in infos] if dist.get_rank() == 0 else None
    dist.gather(buf, out, dst=0)
    if out is None:
        return []
    return [o[:x["images"]].cpu() for o, x in zip(out, infos) if x["images"]]


# ----------------------------------------------------------------------------- independent jobs
def split_jobs(jobs: Sequence) -> list:
    """This rank's share ``jobs[rank::world]`` of independent jobs (all of them without torchrun).

    From this call on, compress runs in this process are whole runs of their own, not shards of one
    statistics pass. Pair with ``gather_rows``.
    """
    global _independent, _jobs_group
    if world_size() <= 1:
        return list(jobs)
    _independent = True
    _jobs_group = _init()

    return list(jobs)[dist.get_rank()::dist.get_world_size()]


def gather_rows(rows: list, order: Callable) -> list | None:
    """Every rank's result rows on rank 0, sorted (stably) by ``order(row)``; None on the other ranks."""
    if not dist.is_initialized():
        return sorted(rows, key=order)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, rows)
    mine = dist.get_rank()
    _done(_jobs_group)
    if mine != 0:
        return None
    return sorted((row for part in everyone for row in part), key=order)
