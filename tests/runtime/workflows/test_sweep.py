"""`python -m runtime sweep` / `fit`: many budgets from one calibration pass, and the budget search.
Real stages on the tiny ViT (tests/runtime/conftest.py); latency maths on hand-made numbers."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import runtime.__main__ as cli
from runtime.workflows import layout, sweep
from runtime.workflows import run as stages
from runtime.errors import RuntimeStageError

TINY_ARGS = ["--model", "vit_cifar_ref", "--random-init", "--model-arg", "depth=2", "--model-arg", "embed_dim=64",
             "--model-arg", "num_heads=2", "--num-calib", "32", "--comp-steps", "10", "--threads", "1"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A 2-ratio sweep without latency, through the CLI, with a fresh statistics cache."""
    root = tmp_path_factory.mktemp("sweep")
    cache = root / "cache"
    rc = cli.main(["sweep", *TINY_ARGS, "--ratios", "0.5,0.3", "--num-eval", "64", "--num-parity", "16",
                   "--no-bench", "--stats-cache", str(cache), "--out", str(root / "out")])
    assert rc == 0
    return root / "out", cache


def test_sweep_calibrates_once_and_reuses_the_cache(swept):
    out, cache = swept
    doc = json.loads((out / "sweep.json").read_text())
    assert [p["ratio"] for p in doc["points"]] == [0.3, 0.5]
    assert [p["stats_from_cache"] for p in doc["points"]] == [False, True]
    assert doc["calibration"]["passes"] == 1
    assert len(list(cache.glob("*.json"))) == 1  # one statistics entry served both budgets
    keys = {json.loads((out / p["run_dir"] / "compressed/manifest.json").read_text())["calibration"]["stats_cache_key"]
            for p in doc["points"]}
    assert len(keys) == 1


def test_sweep_points_follow_the_budget(swept):
    out, _ = swept
    doc = json.loads((out / "sweep.json").read_text())
    d, (a, b) = doc["dense"], doc["points"]
    assert d["params"] > a["params"] > b["params"]
    assert a["removed_ratio"] == pytest.approx(0.3, abs=0.02) and b["removed_ratio"] == pytest.approx(0.5, abs=0.02)
    for prec in ("fp32", "int8"):
        assert d["bytes"][prec] > a["bytes"][prec] > b["bytes"][prec]
    for p in (a, b):
        assert p["bytes"]["int8"] < p["bytes"]["fp32"]
        assert all(0 <= p[k][prec] <= 1 for k in ("top1", "top5", "agreement") for prec in ("fp32", "int8"))
        assert p["latency_ms"] is None
        ev = json.loads((out / p["run_dir"] / "eval.json").read_text())
        assert p["top1"]["int8"] == ev["variants"]["ort:model.int8.onnx"]["top1"]
        assert ev["data"]["num_images"] == 64
        assert (out / p["run_dir"] / "report.md").is_file()
    assert set(doc["pareto"]) == {"params", "bytes"}  # no latency axis without the benchmark
    assert (out / "pareto.png").read_bytes().startswith(b"\x89PNG")
    md = (out / "sweep.md").read_text()
    assert f"| 0.3 | {a['params']:,} |" in md and "computed 1 time(s) for 2 budgets" in md
    # the int8 columns come from ORT: on a CPU without VNNI the table says why they trail
    assert ("int16 pair sums" in md) == bool(doc["machine"]["cpu_int8_saturates"])
    doc["machine"]["cpu_int8_saturates"] = not doc["machine"]["cpu_int8_saturates"]
    assert ("int16 pair sums" in sweep.render_markdown(doc)) == doc["machine"]["cpu_int8_saturates"]


def test_pareto_front_matches_brute_force():
    rng = random.Random(0)
    for _ in range(50):
        items = [(f"m{i}", rng.randint(1, 6), rng.randint(0, 5) / 5) for i in range(rng.randint(1, 8))]
        front = set(sweep.pareto_front(items))
        for label, cost, acc in items:
            beaten = any((c <= cost and a >= acc) and (c, a) != (cost, acc) for _, c, a in items)
            assert (label in front) == (not beaten)
        costs = [next(c for lab, c, _ in items if lab == f) for f in sweep.pareto_front(items)]
        assert costs == sorted(costs)


def _bench(p50s: dict) -> dict:
    return {"variants": {n: {"latency": {"1": {"p50_ms": v}}} for n, v in p50s.items()}}


def test_normalised_latency_removes_drift_between_runs():
    # the machine got 2x slower for the second run: the ratio to dense in the same run is what counts
    benches = [_bench({"dense-fp32": 10.0, "lowrank-int8": 5.0}), _bench({"dense-fp32": 20.0, "lowrank-int8": 12.0}),
               _bench({"dense-fp32": 12.0, "lowrank-int8": 3.0})]
    got = stages.normalised_latency(benches, "lowrank-int8", 1)
    assert got == pytest.approx([6.0, 7.2, 3.0])  # scale = median(10, 20, 12) = 12
    assert stages.normalised_latency(benches, "dense-fp32", 1) == pytest.approx([12.0] * 3)
    assert stages.normalised_latency(benches, "lowrank-fp32", 1) == [None] * 3


def test_ratio_dirs_are_distinct_and_readable(tmp_path):
    names = [layout.ratio_dir(tmp_path, r).name for r in (0.2, 0.25, 0.3, 0.4375, 0.7)]
    assert names == ["r0.2", "r0.25", "r0.3", "r0.4375", "r0.7"]


@pytest.mark.parametrize("kw, match", [(dict(ratios=()), "empty"), (dict(ratios=(0.2, 1.0)), r"\(0, 1\)"),
                                       (dict(ratios=(0.2, 0.2)), "duplicate"), (dict(ratios=(0.2,), threads=0), "threads")])
def test_sweep_config_validates(kw, match, tmp_path):
    with pytest.raises(RuntimeStageError, match=match):
        sweep.SweepConfig(out=str(tmp_path), **kw)


@pytest.mark.slow
def test_fit_size_target_keeps_the_least_compression(tiny_base_config, tmp_path):
    """Bisection over [0, 0.55] on the INT8 file size (exact, so the outcome is checkable)."""
    import torch

    from runtime.workflows.fit import FitConfig, run_fit

    torch.set_num_threads(1)
    base = tiny_base_config(stats_cache=str(tmp_path / "cache"))
    # a target between the sizes at ratios 0.2 and 0.55 of this model: dense int8 is ~0.16 MB
    config = FitConfig(out=str(tmp_path / "fit"), target_size_mb=0.13, max_ratio=0.55, iterations=4, num_parity=8,
                       threads=1)
    doc = run_fit(base, config)
    rows = sorted(doc["candidates"], key=lambda r: r["ratio"])
    assert doc["outcome"] == "met" and len(rows) == 4
    assert rows[-1]["ratio"] == 0.55 and sum(not r["stats_from_cache"] for r in rows) == 1
    sizes = [r["value"] for r in rows]
    assert sizes == sorted(sizes, reverse=True)  # more compression, smaller file
    best = doc["best"]
    assert best["value"] <= 0.13 and best["ratio"] == min(r["ratio"] for r in rows if r["meets"])
    assert all(not r["meets"] for r in rows if r["ratio"] < best["ratio"])
    assert (tmp_path / "fit" / "best").resolve() == Path(best["dir"]).resolve()
    assert ((tmp_path / "fit" / "best" / "onnx" / "model.int8.onnx").stat().st_size / 1e6
            == pytest.approx(best["value"]))
    # an unreachable target is said in one line, and no best link is left
    miss = run_fit(base, FitConfig(out=str(tmp_path / "fit"), target_size_mb=0.01, max_ratio=0.55, iterations=4,
                                   num_parity=8, threads=1))
    assert miss["outcome"] == "unreachable" and len(miss["candidates"]) == 1
    assert "even --max-ratio 0.55 misses" in miss["message"] and "\n" not in miss["message"]
    assert not (tmp_path / "fit" / "best").exists()
