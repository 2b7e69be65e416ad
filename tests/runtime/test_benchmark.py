"""The interleaved benchmark on a real (tiny) export directory, and its report."""
from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pytest

from runtime.benchmark import (BenchConfig, check_export_report, find_variants, interleaved_schedule,
                               latency_stats, left_out, run_benchmark)
from runtime.errors import RuntimeStageError
from runtime.memory import inspect_onnx
from runtime.report import render_markdown, write_outputs

REPEATS = 5
BATCHES = (1, 4)


@pytest.fixture(scope="module")
def bench(tiny_export_dir):
    config = BenchConfig(backend="ort", batch_sizes=BATCHES, warmup=1, repeats=REPEATS,
                         options={"intra_op_threads": 1})
    return run_benchmark(tiny_export_dir, config)


def test_schedule_interleaves_every_variant_once_per_repeat_with_rotation():
    names = ["a", "b", "c"]
    schedule = list(interleaved_schedule(names, 4))
    assert len(schedule) == 12
    for r in range(4):
        this = [n for rep, n in schedule if rep == r]
        assert sorted(this) == names and this[0] == names[r % 3]
    assert Counter(n for _, n in schedule) == {"a": 4, "b": 4, "c": 4}
    # Consecutive runs never repeat a variant back to back within a repeat.
    assert all(schedule[i][1] != schedule[i + 1][1] for i in range(len(schedule) - 1) if schedule[i][0] == schedule[i + 1][0])


def test_latency_stats_on_known_samples():
    stats = latency_stats([i / 1000 for i in range(1, 101)], batch_size=8)  # 1..100 ms
    assert stats["runs"] == 100
    assert stats["p50_ms"] == pytest.approx(50.5) and stats["p90_ms"] == pytest.approx(90.1)
    assert stats["p99_ms"] == pytest.approx(99.01) and stats["min_ms"] == pytest.approx(1.0)
    assert stats["throughput_ips"] == pytest.approx(8 / 0.0505)


def test_variant_discovery(tiny_export_dir, tmp_path):
    names = [v.name for v, _ in find_variants(tiny_export_dir, BenchConfig())]
    assert names == ["dense-fp32", "dense-int8", "lowrank-fp32", "lowrank-int8"]
    shutil.copy(tiny_export_dir / "dense.onnx", tmp_path / "dense.onnx")
    shutil.copy(tiny_export_dir / "dense.onnx", tmp_path / "dense.fp16.onnx")
    assert [v.name for v, _ in find_variants(tmp_path, BenchConfig())] == ["dense-fp32"]  # CPU: no fp16
    assert [v.name for v, _ in find_variants(tmp_path, BenchConfig(include_fp16=True))] == ["dense-fp32", "dense-fp16"]
    assert [v.name for v, _ in find_variants(tmp_path, BenchConfig(backend="trt"))] == ["dense-fp32", "dense-fp16"]
    with pytest.raises(RuntimeStageError, match="lowrank-int8 asked for"):
        find_variants(tmp_path, BenchConfig(variants=("lowrank-int8",)))
    for name in ("dense.int8-fp16.onnx", "dense.modelopt-int8.onnx"):
        shutil.copy(tiny_export_dir / "dense.int8.onnx", tmp_path / name)
    # the TensorRT file (FP16 outside the INT8 GEMMs) is timed on trt only unless asked for; ModelOpt's anywhere
    assert [v.name for v, _ in find_variants(tmp_path, BenchConfig())] == ["dense-fp32", "dense-modelopt-int8"]
    assert set(left_out(tmp_path, BenchConfig())) == {"dense-int8-fp16", "dense-fp16"}
    assert "TensorRT" in left_out(tmp_path, BenchConfig())["dense-int8-fp16"]
    assert [v.name for v, _ in find_variants(tmp_path, BenchConfig(backend="trt"))] == [
        "dense-fp32", "dense-int8-fp16", "dense-modelopt-int8", "dense-fp16"]
    assert left_out(tmp_path, BenchConfig(backend="trt")) == {}
    asked = BenchConfig(variants=("dense-int8-fp16",))
    assert [v.name for v, _ in find_variants(tmp_path, asked)] == ["dense-int8-fp16"] and left_out(tmp_path, asked) == {}
    # prebuilt engines: `runtime engine --precision int8` writes dense.int8.engine (from *.int8-fp16.onnx)
    (tmp_path / "engines").mkdir()
    (tmp_path / "engines" / "dense.int8.engine").write_bytes(b"")
    engines = BenchConfig(backend="trt", engine_dir=str(tmp_path / "engines"))
    assert [v.name for v, _ in find_variants(tmp_path, engines)] == ["dense-int8"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeStageError, match="holds none of"):
        find_variants(tmp_path / "empty", BenchConfig())
    with pytest.raises(RuntimeStageError, match="no such export directory"):
        find_variants(tmp_path / "missing", BenchConfig())


@pytest.mark.parametrize("kwargs", [dict(batch_sizes=()), dict(batch_sizes=(0,)), dict(repeats=0),
                                    dict(warmup=-1), dict(variants=("dense-fp64",))])
def test_config_validates_itself(kwargs):
    with pytest.raises(RuntimeStageError):
        BenchConfig(**kwargs)


def test_latency_figures_are_consistent(bench):
    assert list(bench["variants"]) == ["dense-fp32", "dense-int8", "lowrank-fp32", "lowrank-int8"]
    for v in bench["variants"].values():
        assert set(v["latency"]) == {str(b) for b in BATCHES}
        for bs, lat in v["latency"].items():
            samples = lat["samples_ms"]
            assert lat["runs"] == len(samples) == REPEATS
            assert 0 < lat["min_ms"] <= lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] <= lat["max_ms"]
            assert lat["p50_ms"] == pytest.approx(float(np.median(samples)))
            assert lat["throughput_ips"] == pytest.approx(int(bs) * 1e3 / np.mean(samples))


def test_bytes_add_up_with_the_files(bench, tiny_export_dir):
    for name, v in bench["variants"].items():
        path = tiny_export_dir / v["file"]
        mem = v["memory"]
        assert mem["file_bytes"] == path.stat().st_size
        assert mem["weight_bytes"] == sum(n for k, n in mem.items() if k.startswith("weight_bytes."))
        assert mem["weight_bytes"] == inspect_onnx(path).total_weight_bytes <= mem["file_bytes"]
        assert v["precision"] == ("int8" if ".int8." in v["file"] else "fp32")
        proc = v["process"]
        assert proc["peak_rss_delta_bytes"] >= mem["weight_bytes"] > 0
    dense, low = bench["variants"]["dense-fp32"]["memory"], bench["variants"]["lowrank-fp32"]["memory"]
    assert low["weight_bytes.float32"] < 0.75 * dense["weight_bytes.float32"]  # blocks kept ~40% of their weights
    assert bench["variants"]["dense-int8"]["memory"]["file_bytes"] < 0.5 * dense["file_bytes"]


def test_ratios_are_against_the_dense_references(bench):
    variants, ratios = bench["variants"], bench["ratios"]
    assert set(ratios) == {"dense-fp32", "dense-int8"}
    for ref, table in ratios.items():
        assert table[ref]["file_bytes"] == 1.0 and all(r == 1.0 for r in table[ref]["p50"].values())
        for name, row in table.items():
            assert row["file_bytes"] == pytest.approx(variants[name]["memory"]["file_bytes"]
                                                      / variants[ref]["memory"]["file_bytes"])
            for bs, r in row["p50"].items():
                assert r == pytest.approx(variants[name]["latency"][bs]["p50_ms"] / variants[ref]["latency"][bs]["p50_ms"])


def test_export_report_sizes_are_checked(tiny_export_dir, tmp_path):
    """export_report.json as export.pipeline writes it: files[name] = {"bytes", "initializer_bytes"}."""
    import onnx
    from onnx import numpy_helper

    for name in ("dense.onnx", "model.onnx"):
        shutil.copy(tiny_export_dir / name, tmp_path / name)
    assert check_export_report(tmp_path) is None

    def init_bytes(name):  # independent of runtime.memory: numpy sizes of the loaded initializers
        out = {}
        for t in onnx.load(str(tmp_path / name)).graph.initializer:
            a = numpy_helper.to_array(t)
            out[a.dtype.name] = out.get(a.dtype.name, 0) + a.nbytes
        return out

    dense, low = (tmp_path / "dense.onnx").stat().st_size, (tmp_path / "model.onnx").stat().st_size
    report = {"files": {"dense.onnx": {"bytes": dense, "initializer_bytes": init_bytes("dense.onnx")},
                        "model.onnx": {"bytes": low + 1, "initializer_bytes": init_bytes("model.onnx")},
                        "model.int8.onnx": {"bytes": 5}}}  # listed but not in the directory: ignored
    (tmp_path / "export_report.json").write_text(json.dumps(report))
    check = check_export_report(tmp_path)
    assert set(check) == {"dense.onnx", "model.onnx"}
    assert check["dense.onnx"]["match"] and check["dense.onnx"]["file_bytes"] == dense
    assert not check["model.onnx"]["match"] and check["model.onnx"]["report_bytes"] == low + 1
    report["files"]["model.onnx"]["bytes"] = low
    report["files"]["model.onnx"]["initializer_bytes"]["float32"] += 4
    (tmp_path / "export_report.json").write_text(json.dumps(report))
    assert not check_export_report(tmp_path)["model.onnx"]["match"]


def test_outputs_are_written(bench, tmp_path):
    paths = write_outputs(bench, tmp_path / "out")
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(bench))
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["md"].read_text()
    assert md == render_markdown(bench)
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| variant")
            and not line.startswith("| batch")]
    assert len(rows) == 4 + 4 * len(BATCHES)  # size table + latency table
    assert "interleaved" in md and bench["machine"]["cpu"] in md
    assert not list((tmp_path / "out").glob("*.tmp"))
