"""The backend registry and the ONNX Runtime backend, end to end on real exported ViTs."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from runtime.backends import Backend, available_backends, open_backend
from runtime.errors import RuntimeStageError


def _initializer_bytes(path) -> dict[str, int]:
    """Independent count: load the tensors themselves and sum their numpy sizes by dtype."""
    model = onnx.load(str(path))
    tensors = list(model.graph.initializer) + [a.t for n in model.graph.node if n.op_type == "Constant"
                                               for a in n.attribute if a.type == onnx.AttributeProto.TENSOR]
    out: dict[str, int] = {}
    for t in tensors:
        arr = numpy_helper.to_array(t)
        out[arr.dtype.name] = out.get(arr.dtype.name, 0) + arr.nbytes
    return out


def _fp16_graph(path):
    """input (N,3,2,2) -> flatten -> fp16 MatMul with a known 12x5 weight -> logits float32."""
    w = np.arange(60, dtype=np.float16).reshape(12, 5) / 64
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["input", "shape"], ["flat"]),
         helper.make_node("Cast", ["flat"], ["flat16"], to=TensorProto.FLOAT16),
         helper.make_node("MatMul", ["flat16", "w"], ["y16"]),
         helper.make_node("Cast", ["y16"], ["logits"], to=TensorProto.FLOAT)],
        "fp16", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 2, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 5])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([-1, 12], np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return w


def test_registry_reports_every_kind_with_a_one_line_reason():
    kinds = available_backends()
    assert {"ort", "ort-cuda", "trt"} <= kinds.keys()
    assert kinds["ort"] is None
    for reason in kinds.values():
        assert reason is None or (reason and "\n" not in reason)


def test_unknown_backend_is_a_user_error(ref_onnx):
    with pytest.raises(RuntimeStageError, match="unknown backend 'nope'"):
        open_backend("nope", ref_onnx)


def test_trt_without_tensorrt_is_one_line_error(ref_onnx):
    if available_backends()["trt"] is None:
        pytest.skip("TensorRT and a GPU are usable here; the error path cannot be exercised")
    with pytest.raises(RuntimeStageError) as info:
        open_backend("trt", ref_onnx)
    assert "\n" not in str(info.value) and "trt" in str(info.value)


def test_ort_cuda_without_cuda_provider_is_one_line_error(ref_onnx):
    if available_backends()["ort-cuda"] is None:
        pytest.skip("onnxruntime-gpu with CUDA is usable here")
    with pytest.raises(RuntimeStageError, match="CUDAExecutionProvider") as info:
        open_backend("ort-cuda", ref_onnx)
    assert "\n" not in str(info.value)


def test_bad_option_and_bad_files_are_user_errors(ref_onnx, tmp_path):
    with pytest.raises(RuntimeStageError, match="bad options"):
        open_backend("ort", ref_onnx, no_such_option=1)
    with pytest.raises(RuntimeStageError, match="optimization"):
        open_backend("ort", ref_onnx, optimization="fast")
    with pytest.raises(RuntimeStageError, match="no such model file"):
        open_backend("ort", tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf \xff\xfe" * 10)
    with pytest.raises(RuntimeStageError) as info:
        open_backend("ort", junk)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("io_binding", [False, True])
def test_ort_matches_torch_on_reference_model(ref_model, ref_onnx, io_binding):
    torch.manual_seed(1)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        expected = ref_model(x).numpy()
    with open_backend("ort", ref_onnx, intra_op_threads=1, io_binding=io_binding,
                      allow_spinning=not io_binding) as backend:
        assert isinstance(backend, Backend)
        assert backend.name == "ort" and backend.precision == "fp32" and backend.path == ref_onnx
        assert backend.input_shape() == (-1, 3, 32, 32)
        for batch in (x[:1], x):  # the batch axis is dynamic
            got = backend.run(batch.numpy())
            assert got.shape == (len(batch), 10) and got.dtype == np.float32
            np.testing.assert_allclose(got, expected[:len(batch)], rtol=1e-4, atol=1e-4)
        desc = backend.describe()
        assert desc["providers"][0] == "CPUExecutionProvider" and desc["io_binding"] is io_binding
        assert desc["intra_op_threads"] == 1 and desc["allow_spinning"] is not io_binding and desc["version"]
        times = backend.time_runs(x.numpy(), 3)
        assert len(times) == 3 and all(t > 0 for t in times)


def test_ort_memory_adds_up_with_initializers(ref_model, ref_onnx):
    with open_backend("ort", ref_onnx, intra_op_threads=1) as backend:
        mem = backend.memory()
    by_dtype = _initializer_bytes(ref_onnx)
    assert {k: v for k, v in mem.items() if k.startswith("weight_bytes.")} == \
        {f"weight_bytes.{k}": v for k, v in by_dtype.items()}
    assert mem["weight_bytes"] == sum(by_dtype.values())
    assert mem["file_bytes"] == ref_onnx.stat().st_size
    # The file is its weights plus a small graph; the float weights are the model's parameters
    # (within 1%: the exporter may fold a few small constants such as cls token + pos embedding).
    assert 0 < mem["file_bytes"] - mem["weight_bytes"] < 0.02 * mem["file_bytes"]
    params = sum(p.numel() for p in ref_model.parameters())
    assert abs(mem["weight_bytes.float32"] - 4 * params) < 0.01 * 4 * params


def test_ort_counts_external_data_files(ref_model, ref_onnx, tmp_path):
    model = onnx.load(str(ref_onnx))
    path = tmp_path / "ext.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="ext.onnx.data", size_threshold=1024)
    with open_backend("ort", path, intra_op_threads=1) as ext, open_backend("ort", ref_onnx, intra_op_threads=1) as inl:
        x = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
        np.testing.assert_array_equal(ext.run(x), inl.run(x))
        assert ext.memory()["weight_bytes"] == inl.memory()["weight_bytes"]
        assert ext.memory()["file_bytes"] == path.stat().st_size + (tmp_path / "ext.onnx.data").stat().st_size
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(RuntimeStageError, match="missing external data"):
        open_backend("ort", path)


def test_precision_is_read_from_the_graph(tmp_path, tiny_export_dir):
    w = _fp16_graph(tmp_path / "fp16.onnx")
    with open_backend("ort", tmp_path / "fp16.onnx", intra_op_threads=1) as backend:
        assert backend.precision == "fp16"
        assert backend.memory() == {"file_bytes": (tmp_path / "fp16.onnx").stat().st_size, "weight_bytes": 120 + 16,
                                    "weight_bytes.float16": 120, "weight_bytes.int64": 16}
        x = np.random.default_rng(0).standard_normal((3, 3, 2, 2), dtype=np.float32)
        expected = x.reshape(3, 12).astype(np.float16).astype(np.float32) @ w.astype(np.float32)
        np.testing.assert_allclose(backend.run(x), expected, rtol=1e-2, atol=1e-2)
    with open_backend("ort", tiny_export_dir / "model.int8.onnx", intra_op_threads=1) as backend:
        assert backend.precision == "int8"
        assert backend.memory()["weight_bytes.int8"] > backend.memory()["weight_bytes.float32"]


def test_ort_end_to_end_on_deit_tiny(tmp_path, exporter):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    path = exporter(model, tmp_path / "deit_tiny.onnx", 224, batch=1)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = model(x).numpy()
    with open_backend("ort", path, intra_op_threads=1) as backend:
        assert backend.input_shape() == (-1, 3, 224, 224)
        np.testing.assert_allclose(backend.run(x.numpy()), expected, rtol=1e-3, atol=1e-4)
        mem = backend.memory()
    params = sum(p.numel() for p in model.parameters())
    assert abs(mem["weight_bytes.float32"] - 4 * params) < 0.01 * 4 * params
    assert mem["weight_bytes"] == sum(_initializer_bytes(path).values())


def test_thread_count_reaches_onnxruntime_only():
    from runtime.__main__ import _bench_options, get_parser
    from runtime.backends import thread_options

    assert thread_options("ort", 2) == {"intra_op_threads": 2}
    assert thread_options("ort-cuda", 1) == {"intra_op_threads": 1}
    assert thread_options("trt", 2) == {} and thread_options("ort", None) == {}
    # the Makefile passes --threads whatever BACKEND is: TensorRT must not receive it
    args = get_parser().parse_args(["bench", "--onnx-dir", "x", "--backend", "trt", "--threads", "2",
                                     "--out", "y"])
    assert "intra_op_threads" not in _bench_options(args)
