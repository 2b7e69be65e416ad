"""runtime.memory_options and the ORT memory options: RSS split by part, per option set, with latency."""
import json

import onnxruntime as ort
import pytest

from runtime.backends import open_backend
from runtime.benchmark import predicted_vs_measured
from runtime.memory_options import OPTION_SETS, format_markdown, study


def test_memory_options_reach_the_session(ref_onnx):
    with open_backend("ort", ref_onnx, mem_pattern=False, prepacking=False, mem_arena=False) as b:
        d = b.describe()
        assert (d["mem_pattern"], d["prepacking"], d["mem_arena"]) == (False, False, False)
        so = b._session.get_session_options()
        assert so.enable_mem_pattern is False and so.enable_cpu_mem_arena is False
        assert so.get_session_config_entry("session.disable_prepacking") == "1"


def test_study_splits_rss_and_times_every_option_set(tiny_export_dir):
    doc = study(tiny_export_dir, ["dense-int8", "lowrank-int8"], threads=1, sets=("default", "no-prepack"),
                warmup=1, repeats=2)
    assert len(doc["rows"]) == 4
    for r in doc["rows"]:
        assert r["weights_bytes"] > 0 and r["latency_ms"]["1"] > 0
        assert r["load_bytes"] + r["run_bytes"] == r["peak_rss_delta_bytes"]
    md = format_markdown(doc)
    assert "| lowrank-int8 | no-prepack |" in md and "× default" in md
    assert set(OPTION_SETS) >= {"default", "no-arena", "no-prepack", "no-mem-pattern", "edge"}


def test_bench_reads_the_plans_predicted_latency(tmp_path):
    comp = tmp_path / "compressed"
    comp.mkdir()
    lat = {"model": "m", "backend": "ort", "threads": 2, "machine": {"cpu": "x"}, "precision": "int8", "batch": 1,
           "target_ms": None, "predicted_ms": {"1": 10.0}, "dense_predicted_ms": {"1": 20.0}}
    (comp / "manifest.json").write_text(json.dumps({"latency": lat}))
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    (onnx_dir / "export_report.json").write_text(json.dumps({"source": {"compressed": str(comp)}}))
    results = {"lowrank-int8": {"latency": {"1": {"p50_ms": 8.0}}}, "dense-int8": {"latency": {"1": {"p50_ms": 21.0}}}}
    pred = predicted_vs_measured(onnx_dir, results)
    assert pred["variants"]["lowrank-int8"]["1"] == {"predicted_ms": 10.0, "measured_p50_ms": 8.0}
    assert pred["variants"]["dense-int8"]["1"]["measured_p50_ms"] == 21.0
    (comp / "manifest.json").write_text(json.dumps({"latency": None}))
    assert predicted_vs_measured(onnx_dir, results) is None
    assert predicted_vs_measured(tmp_path / "nowhere", results) is None
