"""ORT per-node profile split into Linears / attention / the rest, on a real pipeline export."""
from __future__ import annotations

import json

import pytest

from runtime import profile
from runtime.benchmark import BENCH_FILES
from runtime.__main__ import main as runtime_main


@pytest.mark.parametrize("name,op,expected", [
    ("blocks.3.mlp.fc1.second", "MatMul", ("linear", "mlp.fc1")),
    ("blocks.0.attn.qkv.input_q", "QuantizeLinear", ("linear", "attn.qkv")),
    ("blocks.11.attn.proj_MatMulIntegerToFloat", "MatMulIntegerToFloat", ("linear", "attn.proj")),
    ("head", "Gemm", ("linear", "head")),
    ("node_matmul_12", "FusedMatMul", ("attention", "-")),
    ("blocks.0.norm1", "LayerNormalization", ("other", "-")),
    ("headless_softmax", "Softmax", ("other", "-")),
])
def test_nodes_are_classified_by_layer_name_then_op(name, op, expected):
    assert profile.classify(name, op) == expected


def test_summary_adds_up_per_run():
    ev = [{"cat": "Node", "name": "blocks.0.mlp.fc1.first_kernel_time", "dur": 3000, "args": {"op_name": "MatMul"}},
          {"cat": "Node", "name": "n7_kernel_time", "dur": 1000, "args": {"op_name": "MatMul"}},
          {"cat": "Node", "name": "sm_kernel_time", "dur": 2000, "args": {"op_name": "Softmax"}},
          {"cat": "Node", "name": "sm_fence_before", "dur": 99, "args": {"op_name": "Softmax"}},
          {"cat": "Session", "name": "model_run", "dur": 7000}]
    s = profile.summarize(ev, runs=2)
    assert s["kinds_ms"] == {"linear": 1.5, "attention": 0.5, "other": 1.0}
    assert s["total_ms"] == pytest.approx(3.0) and s["linear_layers_ms"] == {"mlp.fc1": 1.5}


def test_cli_profiles_every_variant_of_an_export(tiny_run_dir, tmp_path):
    rc = runtime_main(["profile", "--onnx-dir", str(tiny_run_dir / "onnx"), "--warmup", "1", "--repeats", "3",
                       "--out", str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "profile.json").read_text())
    # every file of the benchmark's table (the TensorRT-only *.int8-fp16.onnx are not in it)
    files = {v.filename for v in BENCH_FILES if (tiny_run_dir / "onnx" / v.filename).is_file()}
    assert len(doc["variants"]) == len(files) >= 4
    for name, s in doc["variants"].items():
        assert s["total_ms"] > 0
        assert sum(s["kinds_ms"].values()) == pytest.approx(s["total_ms"])
        # every compressed layer kind of the tiny ViT is found by name in every variant
        assert {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"} <= set(s["linear_layers_ms"]), name
    assert {"lowrank-fp32", "lowrank-int8"} <= set(doc["ratios"])
    assert "| lowrank-int8 |" in (tmp_path / "profile.md").read_text()


def test_missing_export_is_one_line_error(tmp_path, capsys):
    assert runtime_main(["profile", "--onnx-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "python -m export" in err[0]
