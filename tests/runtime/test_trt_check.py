"""`runtime trt-check` where TensorRT is missing: its parsing of engine-inspector JSON (hand-written
samples in tests/runtime/data, in the layout TensorRT documents for IEngineInspector with
ProfilingVerbosity.DETAILED), its MatMul-to-layer matching, its logit comparison and its one-line exit."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from runtime import trt_check
from runtime.errors import RuntimeStageError

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parents[2]
FC1 = ["blocks.0.mlp.fc1.first", "blocks.0.mlp.fc1.second"]


def test_datatypes_from_the_inspectors_format_strings():
    dt = trt_check.tensor_dtype
    assert dt({"Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format."}) == "int8"
    assert dt({"Format/Datatype": "Row major linear FP16 format"}) == "fp16"
    assert dt({"Format/Datatype": "Channel major FP16 format where channel % 4 == 0"}) == "fp16"
    assert dt({"Format/Datatype": "Float"}) == "fp32" and dt({"Format/Datatype": "Half"}) == "fp16"
    assert dt({"Format/Datatype": "Row major linear BF16 format"}) == "bf16"
    assert dt({"DataType": "Int8", "Format": "Row major linear"}) == "int8"     # a split DataType field
    assert dt({"Format/Datatype": "N/A due to dynamic shapes"}) is None and dt({}) is None


def test_parse_trt10_sample_names_fused_nodes_and_tactics():
    layers = trt_check.parse_inspector((DATA / "inspector_trt10_int8.json").read_text())
    assert [la.layer_type for la in layers][:3] == ["Reformat", "Scale", "CaskGemmMatrixMultiply"]
    gemm = layers[2]
    assert "blocks.0.mlp.fc1.first" in gemm.nodes and "blocks.0.mlp.fc1.first.weight_dq" in gemm.nodes
    assert gemm.inputs == ("int8",) and gemm.outputs == ("int8",) and gemm.tactic.startswith("sm80_xmma_gemm_i8i8")
    assert "blocks.0.mlp.fc1.second" in layers[3].nodes     # known only from its Metadata
    assert not any(la.foreign for la in layers)


def test_every_quantized_matmul_is_found_and_classified():
    layers = trt_check.parse_inspector((DATA / "inspector_trt10_int8.json").read_text())
    res = {r.matmul: r for r in trt_check.matmul_precisions(layers, [*FC1, "blocks.0.mlp.fc2", "head"])}
    assert res["blocks.0.mlp.fc1.first"].status == res["blocks.0.mlp.fc1.second"].status == "int8"
    assert res["blocks.0.mlp.fc1.second"].layer == "gemm_fused_1"
    assert res["blocks.0.mlp.fc2"].status == "not-int8" and res["blocks.0.mlp.fc2"].inputs == ("fp16",)
    assert res["head"].status == "missing" and res["head"].layer is None
    # a node name that is only a prefix of a fused node ("...first" vs "...first.weight_dq") is no match
    assert trt_check.matmul_precisions(layers, ["blocks.0.mlp.fc1.fir"])[0].status == "missing"
    ok = trt_check.PrecisionCheck("model.int8-fp16.onnx", trt_check.matmul_precisions(layers, FC1))
    bad = trt_check.PrecisionCheck("model.int8-fp16.onnx", list(res.values()))
    assert ok and not bad and bad.counts == {"int8": 2, "not-int8": 1, "unknown": 0, "hidden": 0, "missing": 1}
    assert "2/4 quantized MatMuls INT8" in str(bad) and str(bad).endswith("FAIL") and str(ok).endswith("PASS")
    assert not trt_check.PrecisionCheck("x", [])           # nothing checked proves nothing


def test_myelin_regions_hide_matmuls_and_dynamic_shapes_hide_datatypes():
    layers = trt_check.parse_inspector((DATA / "inspector_trt10_myelin.json").read_text())
    assert layers[1].foreign and not layers[0].foreign
    names = ["blocks.0.attn.qkv.first", "blocks.0.attn.qkv.second", "blocks.0.mlp.fc1.first"]
    res = trt_check.matmul_precisions(layers, names)
    assert [r.status for r in res] == ["int8", "hidden", "unknown"]
    assert not trt_check.PrecisionCheck("f", res[:2]) and trt_check.PrecisionCheck("f", res[:2], allow_hidden=True)
    assert not trt_check.PrecisionCheck("f", res, allow_hidden=True)   # no datatype is never a pass


def test_names_only_and_broken_inspector_output_are_refused():
    with pytest.raises(RuntimeStageError, match="ProfilingVerbosity.DETAILED"):
        trt_check.parse_inspector((DATA / "inspector_names_only.json").read_text())
    with pytest.raises(RuntimeStageError, match="not JSON"):
        trt_check.parse_inspector("{Layers: ")
    with pytest.raises(RuntimeStageError, match="no \"Layers\""):
        trt_check.parse_inspector('{"Bindings": []}')


def test_quantized_matmuls_are_the_ones_with_dequantized_int8_weights(tmp_path):
    """A pair (first -> second) with int8 weights and one float MatMul (like q·kᵀ) in a real ONNX graph."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []
    x = "input"
    for name, (k, n) in (("blocks.0.mlp.fc1.first", (4, 2)), ("blocks.0.mlp.fc1.second", (2, 4))):
        inits += [numpy_helper.from_array(rng.integers(-127, 128, (k, n)).astype(np.int8), f"{name}.weight_quantized"),
                  numpy_helper.from_array(np.full(n, 0.01, np.float32), f"{name}.weight_scale")]
        nodes += [helper.make_node("DequantizeLinear", [f"{name}.weight_quantized", f"{name}.weight_scale"],
                                   [f"{name}.w"], name=f"{name}.weight_dq", axis=1),
                  helper.make_node("MatMul", [x, f"{name}.w"], [f"{name}.out"], name=name)]
        x = f"{name}.out"
    inits.append(numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "float_w"))
    nodes.append(helper.make_node("MatMul", [x, "float_w"], ["logits"], name="attn_like"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], inits)
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]), str(path))
    assert trt_check.quantized_matmuls(path) == FC1


def test_logit_comparison_passes_within_tolerance_only():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((64, 10)).astype(np.float32) * 5
    close = trt_check.compare_logits(ref + 0.01, ref)
    assert close["passed"] and close["top1_agreement"] == 1.0 and close["max_abs"] == pytest.approx(0.01, abs=1e-5)
    far = trt_check.compare_logits(ref[::-1].copy(), ref)
    assert not far["passed"] and far["max_abs_fraction"] > trt_check.ATOL_FRACTION


def test_with_float_logits_the_gate_is_distance_to_the_float_model():
    """Two exact INT8 runs of a deep network differ element-wise (rounding flips); the engine passes when
    it is about as close to the float model as ORT's run of the same file, and fails when far off."""
    rng = np.random.default_rng(0)
    fp = rng.standard_normal((64, 10)).astype(np.float32) * 5
    ort_q = fp + rng.standard_normal(fp.shape).astype(np.float32) * 0.5     # ORT's INT8 noise
    engine = fp + rng.standard_normal(fp.shape).astype(np.float32) * 0.5    # another draw of it
    same = trt_check.compare_logits(engine, ort_q, fp)
    assert same["passed"] and same["accuracy"]["passed"]
    assert same["max_abs_fraction"] > trt_check.ATOL_FRACTION           # the element-wise test would fail
    worse = trt_check.compare_logits(fp + (engine - fp) * 2, ort_q, fp)
    assert not worse["passed"] and worse["accuracy"]["file_error"] > 1.25 * worse["accuracy"]["fake_quant_error"]


def test_markdown_names_every_file_and_every_failing_matmul():
    layers = trt_check.parse_inspector((DATA / "inspector_trt10_int8.json").read_text())
    res = trt_check.PrecisionCheck("m", trt_check.matmul_precisions(layers, [*FC1, "blocks.0.mlp.fc2"]))
    entry = {"precision": {"counts": res.counts, "matmuls": [vars(r) for r in res.results]},
             "parity_vs_onnxruntime": {"max_abs": 0.02, "top1_agreement": 0.99},
             "latency": {"1": {"p50_ms": 0.1234}, "32": {"p50_ms": 0.9}}, "passed": False}
    md = trt_check.render_markdown({"tensorrt": "10.x", "gpu": "G", "batches": [1, 32],
                                    "files": {"model.int8-fp16.onnx": entry}})
    assert "| model.int8-fp16.onnx | 2 | 1 | 0 | 0 | 0 | 0.02 | 99.0% | 0.123 | 0.900 | FAIL |" in md
    assert "blocks.0.mlp.fc2 (not-int8, fp16)" in md


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_cli_without_tensorrt_is_one_line_and_exit_3(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "runtime", "trt-check", "--onnx-dir", str(tmp_path),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 3, proc.stderr
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1 and "TensorRT is not installed" in lines[0]
    assert not (tmp_path / "out" / "trt_check.json").exists()
