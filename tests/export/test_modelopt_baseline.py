"""The ModelOpt baseline wrapper: its arguments, calibration images and QDQ summary run everywhere;
the quantization itself only where nvidia-modelopt is installed (an optional extra, not in CI)."""
from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compress.zoo import reference as ref
from export.errors import ExportError
from export.modelopt_baseline import (FILENAME, ModeloptSettings, calibration_images, modelopt_int8,
                                      modelopt_version, qdq_summary, quantize_arguments)
from export.onnx_export import INPUT_NAME


def test_quantize_arguments_are_modelopt_defaults_but_cpu_and_fp32(tmp_path):
    x = np.zeros((4, 3, 32, 32), dtype=np.float64)
    kw = quantize_arguments(tmp_path / "dense.onnx", x, tmp_path / FILENAME)
    assert kw["quantize_mode"] == "int8" and kw["calibration_method"] == "entropy"
    assert kw["calibration_eps"] == ["cpu"] and kw["high_precision_dtype"] == "fp32"
    assert kw["output_path"] == str(tmp_path / FILENAME)
    data = kw["calibration_data"][INPUT_NAME]
    assert data.dtype == np.float32 and data.shape == x.shape and data.flags.c_contiguous
    kw16 = quantize_arguments("a.onnx", x, "b.onnx", ModeloptSettings(high_precision_dtype="fp16"))
    assert kw16["high_precision_dtype"] == "fp16"


@pytest.mark.parametrize("bad, why", [(np.zeros((0, 3, 8, 8)), "non-empty"), (np.zeros((3, 8, 8)), "NCHW"),
                                      (np.full((1, 3, 8, 8), np.nan), "NaN")])
def test_quantize_arguments_refuse_bad_calibration(bad, why):
    with pytest.raises(ExportError, match=why):
        quantize_arguments("a.onnx", bad, "b.onnx")


def test_calibration_images_are_the_manifests(tmp_path):
    """The same images (folder, count, seed) and preprocessing compress calibrated on."""
    from calibration_data import load_image_set, make_loader

    manifest = {"calibration": {"path": "cifar10-calib", "images": 6, "seed": 3}}
    x = calibration_images(manifest, ref.data_config())
    images = load_image_set("cifar10-calib", num=6, seed=3)
    want = np.concatenate([b.numpy() for b, _ in make_loader(images, ref.data_config(), batch_size=4)])
    assert x.dtype == np.float32 and x.shape == (6, 3, 32, 32)
    np.testing.assert_array_equal(x, want)
    with pytest.raises(ExportError, match="does not record its calibration images"):
        calibration_images({}, ref.data_config())
    with pytest.raises(ExportError, match="ModelOpt calibration images"):
        calibration_images({"calibration": {"path": str(tmp_path / "none"), "images": 2}}, ref.data_config())


def _qdq_graph():
    """x -> Q/DQ -> MatMul(DQ(int8 w)) -> MatMul(float w) -> y."""
    w8 = numpy_helper.from_array(np.ones((4, 4), np.int8), "w8")
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    s = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w8", "s"], ["wd"]),
             helper.make_node("MatMul", ["xd", "wd"], ["h"]),
             helper.make_node("MatMul", ["h", "w"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w8, w, s])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_qdq_summary_counts_quantized_matmuls():
    assert qdq_summary(_qdq_graph()) == {"matmuls": 2, "matmuls_quantized": 1, "quantize_nodes": 1,
                                         "dequantize_nodes": 2}


def test_missing_modelopt_is_one_line_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "modelopt", None)   # import modelopt -> ImportError
    with pytest.raises(ExportError, match=r"vit-edge\[modelopt\]") as e:
        modelopt_version()
    assert "\n" not in str(e.value)
    with pytest.raises(ExportError, match="nvidia-modelopt"):
        modelopt_int8("a.onnx", np.zeros((1, 3, 8, 8), np.float32), "b.onnx")


def test_modelopt_int8_quantizes_the_dense_onnx(tiny, tiny_onnx, cifar_batches, tmp_path):
    """ModelOpt's INT8 of the tiny dense ViT: every block Linear quantized, float32 elsewhere, close to
    PyTorch FP32 on real images when run by ONNX Runtime."""
    pytest.importorskip("modelopt.onnx.quantization", reason="nvidia-modelopt is an optional extra")
    import onnxruntime as ort
    import torch

    x = np.concatenate(cifar_batches)
    out = tmp_path / FILENAME
    before = tiny_onnx["dense.onnx"].read_bytes()
    info = modelopt_int8(tiny_onnx["dense.onnx"], x, out)
    assert tiny_onnx["dense.onnx"].read_bytes() == before        # ModelOpt works on a copy
    assert [p.name for p in tmp_path.iterdir()] == [FILENAME]    # and leaves nothing else behind
    assert info["tool"].startswith("nvidia-modelopt ") and info["calibration_images"] == len(x)
    assert info["matmuls_quantized"] >= 8            # 2 blocks x (qkv, proj, fc1, fc2)
    proto = onnx.load(str(out))
    assert {t.elem_type for t in (v.type.tensor_type for v in proto.graph.output)} == {TensorProto.FLOAT}
    y = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {INPUT_NAME: x})[0]
    with torch.no_grad():
        y0 = tiny["dense"](torch.from_numpy(x)).numpy()
    assert np.abs(y - y0).max() < 0.3 * np.abs(y0).max()
    assert (y.argmax(1) == y0.argmax(1)).mean() >= 0.8
