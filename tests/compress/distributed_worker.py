"""One rank of test_distributed's torchrun launch (2 gloo ranks): every sharded statistics pass here is
compared on rank 0 with the single-process one over the same images; each rank writes what it saw
to OUT/rank{r}.json for the test to judge.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.compress.distributed_worker OUT
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

TINY_VIT = {"depth": 2, "embed_dim": 64, "num_heads": 2}
BATCH = 8


def _trimmed(counts: torch.Tensor) -> list[float]:
    """Histogram counts without trailing empty bins (they change no percentile)."""
    nz = torch.nonzero(counts).flatten()
    return counts[:int(nz[-1]) + 1].tolist() if len(nz) else []


def compare(got, want) -> dict:
    """How far a sharded Stats is from the single-process one."""
    from compress.quantize import RangeObserver

    out = {"images": [got.images, want.images], "layers": sorted(got.layers) == sorted(want.layers),
           "gram_rel": 0.0, "vec_rel": 0.0, "counts_equal": True,
           "logits_shape": [list(got.logits.shape), list(want.logits.shape)],
           "logits_max_diff": float((got.logits - want.logits).abs().max()),
           "amax_equal": True, "widths_equal": True, "hist_equal": True, "percentiles_equal": True}
    for n, w in want.layers.items():
        g = got.layers[n]
        out["gram_rel"] = max(out["gram_rel"], float((g.gram - w.gram).norm() / w.gram.norm()))
        for a, b in ((g.abs_sum, w.abs_sum), (g.sum, w.sum)):
            out["vec_rel"] = max(out["vec_rel"], float((a - b).norm() / b.norm()))
        out["counts_equal"] &= g.count == w.count
    for n, w in want.ranges.items():
        g = got.ranges[n]
        out["amax_equal"] &= g["amax"] == w["amax"]
        out["widths_equal"] &= g["width"] == w["width"]
        out["hist_equal"] &= _trimmed(g["counts"]) == _trimmed(w["counts"])
        if w["histogram"]:
            out["percentiles_equal"] &= (RangeObserver.from_state(g).percentile(99.0)
                                         == RangeObserver.from_state(w).percentile(99.0))
    return out


def main(out: Path) -> None:
    import timm
    import torch.distributed as dist

    import compress  # noqa: F401  (registers vit_cifar_ref)
    from calibration_data import load_image_set, make_loader
    from compress import distributed, stats
    from compress.errors import CompressError
    from compress.models import compressible_layers

    torch.set_num_threads(1)
    dist.init_process_group("gloo")   # this worker's group: distributed.collect leaves it up
    r = dist.get_rank()
    torch.manual_seed(0)
    model = timm.create_model("vit_cifar_ref", pretrained=False, **TINY_VIT).eval()
    layers = list(compressible_layers(model))
    report: dict = {}

    def loader(model):
        return lambda part: make_loader(part, model, batch_size=BATCH)

    def sharded_vs_single(name, num, histogram, **kw):
        images = load_image_set("cifar10-calib", num=num, seed=0)
        got = distributed.collect(model, layers, images, loader(model), BATCH, histogram=histogram, **kw)
        if r == 0:
            want = stats.collect(model, layers, make_loader(images, model, batch_size=BATCH), histogram=histogram)
            report[name] = compare(got, want)
        else:
            report[name] = {"none": got is None}
        return got

    sharded_vs_single("even", 16, False)               # one batch each
    sharded_vs_single("uneven_hist", 24, True)         # rank 0: batch 0, rank 1: batches 1-2
    sharded_vs_single("empty_shard", 8, True)          # one batch: rank 0 has none

    # a rank that fails: every rank stops (none waits in the reduction), rank 0 says which failed
    images = load_image_set("cifar10-calib", num=16, seed=0)

    def failing(part):
        if r == 1:
            raise ValueError("broken image on rank 1")
        return make_loader(part, model, batch_size=BATCH)
    try:
        distributed.collect(model, layers, images, failing, BATCH)
        report["error"] = "no error"
    except CompressError as e:
        report["error"] = f"CompressError: {e}"
    except ValueError as e:
        report["error"] = f"ValueError: {e}"

    # the cache: rank 0 stores it; on the next run no rank runs the pass
    cache = out / "cache"
    first = distributed.collect(model, layers, images, loader(model), BATCH, cache_dir=cache, key="k")

    def never(part):
        raise AssertionError("the pass ran although the cache held the statistics")
    again = distributed.collect(model, layers, images, never, BATCH, cache_dir=cache, key="k")
    report["cache"] = ({"none": first is None and again is None} if r else
                       {"from_cache": again.from_cache, "key": again.key, **compare(again, first)})

    # the whole compress stage: rank 0's artifact equals a single-process run's
    from safetensors.torch import load_file

    from compress.pipeline import Config, run

    def config(name):
        return Config(model="vit_cifar_ref", model_kwargs=dict(TINY_VIT), pretrained=False, out=str(out / name),
                      num_calib=16, batch_size=BATCH, ratio=0.3, comp_rank=8, comp_steps=10, heldout=8,
                      recon_steps=0, quant_calib="percentile", stats_cache=None)   # Adam would amplify rounding
    res = run(config(f"sharded{r}"))             # rank 1 must write nothing: its own path shows it
    if r == 0:
        os.environ["WORLD_SIZE"] = "1"          # now a plain single-process run
        one = run(config("single"))
        ws, w1 = (load_file(str(out / d / "weights.safetensors")) for d in ("sharded0", "single"))
        rel = {k: (ws[k].double() - w1[k].double()).norm() / w1[k].double().norm().clamp_min(1e-30) for k in w1}
        report["pipeline"] = {
            "rank_map_equal": res.manifest["rank_map"] == one.manifest["rank_map"],
            "dense_ranges_equal": (res.manifest["quant"]["dense_act_ranges"]
                                   == one.manifest["quant"]["dense_act_ranges"]),
            "same_tensors": sorted(ws) == sorted(w1),
            "weights_max_rel": float(max(rel.values())),
            "tokens": [res.manifest["calibration"]["tokens"], one.manifest["calibration"]["tokens"]]}
    else:
        report["pipeline"] = {"none": res is None, "wrote": (out / "sharded1").exists()}
    (out / f"rank{r}.json").write_text(json.dumps(report, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
