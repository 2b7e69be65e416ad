"""ONNX byte accounting and process memory measurement."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from runtime.errors import RuntimeStageError
from runtime.memory import current_rss, inspect_onnx, measure_in_subprocess, peak_rss, reset_peak_rss


def test_inspect_onnx_counts_initializers_and_constants_exactly(tmp_path):
    w = numpy_helper.from_array(np.ones((7, 5), np.float32), "w")
    q = numpy_helper.from_array(np.ones((5, 3), np.int8), "q")
    scale = numpy_helper.from_array(np.array(0.5, np.float32), "scale")
    const = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones(4, np.float16)))
    nodes = [const,
             helper.make_node("DequantizeLinear", ["q", "scale"], ["qf"]),
             helper.make_node("MatMul", ["input", "w"], ["h"]),
             helper.make_node("MatMul", ["h", "qf"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 7])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])], [w, q, scale])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    stats = inspect_onnx(path)
    assert stats.weight_bytes == {"float32": 7 * 5 * 4 + 4, "int8": 15, "float16": 8}
    assert stats.weight_count == 35 + 15 + 1 + 4
    assert stats.precision == "int8"  # it has quantization ops
    assert stats.file_bytes == path.stat().st_size
    assert stats.as_memory()["weight_bytes"] == 140 + 4 + 15 + 8
    assert stats.op_counts == {"Constant": 1, "DequantizeLinear": 1, "MatMul": 2}


def test_inspect_onnx_rejects_missing_and_unreadable_files(tmp_path):
    with pytest.raises(RuntimeStageError, match="no such ONNX file"):
        inspect_onnx(tmp_path / "none.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(RuntimeStageError, match="not a readable ONNX file"):
        inspect_onnx(bad)


def test_process_rss_sees_a_large_allocation():
    assert current_rss() > 0 and peak_rss() >= current_rss()
    if not reset_peak_rss():
        pytest.skip("this kernel cannot reset the peak RSS")
    before = peak_rss()
    # fresh anonymous pages, touched: a heap allocation could reuse memory freed (but still resident)
    # by earlier tests in the same process, and then the RSS would not move
    import mmap

    block = mmap.mmap(-1, 64 * 2**20)
    block.write(b"\1" * len(block))
    assert peak_rss() - before > 48 * 2**20
    block.close()


def test_fresh_process_probe_accounts_for_the_model(ref_onnx):
    weights = inspect_onnx(ref_onnx).total_weight_bytes
    figures = measure_in_subprocess("ort", ref_onnx, {"intra_op_threads": 1}, batch_sizes=(1, 4), runs=1)
    assert figures["batch_sizes"] == [1, 4]
    assert figures["baseline_rss_bytes"] > 0
    assert figures["peak_rss_bytes"] >= figures["after_load_rss_bytes"] > figures["baseline_rss_bytes"]
    assert figures["peak_rss_delta_bytes"] == figures["peak_rss_bytes"] - figures["baseline_rss_bytes"]
    # onnxruntime holds the weights in memory, so the model costs at least its weights.
    assert figures["peak_rss_delta_bytes"] >= weights
    assert figures["gpu_bytes"] is None or figures["gpu_bytes"] >= 0


def test_fresh_process_probe_reports_failure_in_one_line(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(RuntimeStageError, match="memory probe") as info:
        measure_in_subprocess("ort", bad, {}, batch_sizes=(1,))
    assert "\n" not in str(info.value)
