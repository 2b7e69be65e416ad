"""Sharded statistics (compress/distributed.py, stats.accumulate/merge_range_states): 2 gloo ranks
launched with torchrun on this CPU give what one process gives."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from compress import distributed, stats
from compress.quantize import RangeObserver

from .conftest import TINY_VIT

ROOT = Path(__file__).resolve().parents[2]


def _torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """2 ranks on a free loopback port (--standalone), 1 thread each."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_shards_are_contiguous_disjoint_and_cover_every_batch():
    for n in range(0, 12):
        for world in (1, 2, 3, 5):
            parts = [distributed.shard(n, r, world) for r in range(world)]
            assert [b for p in parts for b in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_single_process_is_not_sharded(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.shards_statistics() and distributed.is_main()
    assert distributed.split_jobs([1, 2, 3]) == [1, 2, 3]
    assert distributed.gather_rows([{"i": 1}, {"i": 0}], order=lambda r: r["i"]) == [{"i": 0}, {"i": 1}]


def _histogram_pass():
    """Batches whose range grows 30x, so one observer halves its bin resolution on the way."""
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(500, 16, generator=gen) * s for s in (1.0, 1.5, 0.5, 2.0, 12.0, 30.0)]
    model = nn.Sequential(nn.Linear(16, 4))

    def acc(bs, widths=None):
        return stats.accumulate(model, [], bs, range_layers=["0"], histogram=True, widths=widths).ranges["0"]
    return batches, acc


def test_histograms_of_seeded_shards_merge_into_the_single_pass_histogram():
    batches, acc = _histogram_pass()
    whole, first = acc(batches), acc(batches[:1])
    head, tail = acc(batches[:3]), acc(batches[3:], widths={"0": first["width"]})
    assert whole["width"] > first["width"] and tail["width"] > head["width"]   # resolutions differ
    merged = stats.merge_range_states([head, tail])
    assert merged["width"] == whole["width"] and merged["amax"] == whole["amax"]
    n = len(whole["counts"])
    assert torch.equal(merged["counts"][:n], whole["counts"]) and not merged["counts"][n:].any()
    one, two = RangeObserver.from_state(whole), RangeObserver.from_state(merged)
    for p in (90.0, 99.0, 99.99):
        assert one.percentile(p) == two.percentile(p)


def test_unseeded_shards_merge_only_approximately_and_say_so(caplog):
    batches, acc = _histogram_pass()
    whole = acc(batches)
    with caplog.at_level(logging.WARNING, logger="compress.stats"):
        merged = stats.merge_range_states([acc(batches[:3]), acc(batches[3:])])
    assert "merged approximately" in caplog.text
    assert merged["counts"].sum() == whole["counts"].sum() and merged["amax"] == whole["amax"]


def test_min_max_states_merge_to_the_max():
    states = [{"amax": a, "width": 0.0, "zeros": 0, "histogram": False, "counts": torch.zeros(0)} for a in (2.0, 5.0)]
    assert stats.merge_range_states(states)["amax"] == 5.0


def test_two_gloo_ranks_give_the_single_process_statistics_and_artifact(tmp_path):
    """tests/compress/distributed_worker.py on 2 ranks: statistics (even, uneven with histograms, an empty
    shard), a failing rank, the cache, and the whole compress stage, each against one process."""
    res = _torchrun("-m", "tests.compress.distributed_worker", str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for name in ("even", "uneven_hist", "empty_shard", "cache"):
        c = r0[name]
        assert r1[name] == {"none": True}, name                 # only rank 0 gets the statistics
        assert c["images"][0] == c["images"][1] and c["layers"] and c["counts_equal"], name
        assert c["gram_rel"] < 1e-12 and c["vec_rel"] < 1e-12, name
        assert c["logits_shape"][0] == c["logits_shape"][1] and c["logits_max_diff"] == 0.0, name  # image order
        assert c["amax_equal"] and c["widths_equal"] and c["hist_equal"] and c["percentiles_equal"], name
    assert r0["cache"]["from_cache"] and r0["cache"]["key"] == "k"
    assert r0["error"] == "CompressError: rank 1 failed in the statistics pass: ValueError: broken image on rank 1"
    assert r1["error"] == "ValueError: broken image on rank 1"
    p = r0["pipeline"]
    assert p["rank_map_equal"] and p["dense_ranges_equal"] and p["same_tensors"] and p["tokens"][0] == p["tokens"][1]
    assert p["weights_max_rel"] < 1e-5                           # float rounding, not a different fit
    assert r1["pipeline"] == {"none": True, "wrote": False}


def test_torchrun_cli_writes_the_single_process_artifact_once(tmp_path, capsys):
    from safetensors.torch import load_file

    from compress.__main__ import main

    args = ["--model", "vit_cifar_ref", "--random-init", "--model-kwargs", json.dumps(TINY_VIT), "--num-calib", "16",
            "--batch-size", "8", "--ratio", "0.3", "--comp-steps", "5", "--heldout", "8", "--no-stats-cache",
            "--threads", "1"]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    res = _torchrun("-m", "compress", *args, "--out", str(tmp_path / "two"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("wrote ") == 1                       # rank 0 alone reports and writes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]
    m1, m2 = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "two"))
    assert m1["rank_map"] == m2["rank_map"] and m1["calibration"]["tokens"] == m2["calibration"]["tokens"]
    w1, w2 = (load_file(str(tmp_path / d / "weights.safetensors")) for d in ("one", "two"))
    assert sorted(w1) == sorted(w2)
    for k in w1:
        assert torch.allclose(w1[k], w2[k], rtol=1e-4, atol=1e-6), k


def test_cuda_means_this_ranks_gpu(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.local_device("cuda") == "cuda:1" and distributed.local_device("cuda:0") == "cuda:0"
    assert distributed.local_device("cpu") == "cpu"
