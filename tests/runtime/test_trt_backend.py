"""TensorRT backend: what runs everywhere (imports, ONNX facts, one-line errors, the CLI's exit
code) and, where TensorRT and a GPU exist, network construction, engine build and parity."""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from runtime.backends import open_backend
from runtime.backends import trt as trt_backend
from runtime.errors import RuntimeStageError

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
ROOT = Path(__file__).resolve().parents[2]


def _linear_onnx(path: Path, precision: str = "fp32", input_name: str = "input", hw: int = 4, seed: int = 0) -> Path:
    """A real tiny classifier graph (Flatten -> MatMul -> Add) in the export stage's layout:
    fp32; fp16 (float16 weights, Casts at the edges, float32 I/O); int8 (Q/DQ on input and weights)."""
    rng = np.random.default_rng(seed)
    k = 3 * hw * hw
    w = rng.standard_normal((k, 10)).astype(np.float32) * 0.1
    b = rng.standard_normal(10).astype(np.float32)
    nodes, inits = [], []
    x = input_name
    if precision == "fp16":
        nodes.append(helper.make_node("Cast", [x], ["x16"], to=TensorProto.FLOAT16))
        x, w, b = "x16", w.astype(np.float16), b.astype(np.float16)
    if precision == "int8":
        scale_w = (np.abs(w).max(axis=0) / 127).astype(np.float32)
        w_q = np.round(w / scale_w).astype(np.int8)
        inits += [numpy_helper.from_array(np.float32(0.05), "sx"), numpy_helper.from_array(np.int8(0), "zx"),
                  numpy_helper.from_array(w_q, "Wq"), numpy_helper.from_array(scale_w, "sw"),
                  numpy_helper.from_array(np.zeros(10, np.int8), "zw")]
        nodes += [helper.make_node("QuantizeLinear", [x, "sx", "zx"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xdq"]),
                  helper.make_node("DequantizeLinear", ["Wq", "sw", "zw"], ["W"], axis=1)]
        x = "xdq"
    else:
        inits.append(numpy_helper.from_array(w, "W"))
    inits.append(numpy_helper.from_array(b, "b"))
    nodes += [helper.make_node("Flatten", [x], ["f"], axis=1), helper.make_node("MatMul", ["f", "W"], ["m"])]
    if precision == "fp16":
        nodes += [helper.make_node("Add", ["m", "b"], ["y16"]),
                  helper.make_node("Cast", ["y16"], ["logits"], to=TensorProto.FLOAT)]
    else:
        nodes.append(helper.make_node("Add", ["m", "b"], ["logits"]))
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 3, hw, hw])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _export_dir(root: Path, precision: str) -> Path:
    """The two files `runtime engine --precision <precision>` builds (int8: *.int8-fp16.onnx)."""
    from runtime.engine import onnx_name
    root.mkdir(parents=True, exist_ok=True)
    for i, variant in enumerate(("dense", "model")):
        _linear_onnx(root / onnx_name(variant, precision), precision, seed=i)
    return root


def _engine_args(onnx_dir: Path, out: Path, *extra: str) -> argparse.Namespace:
    from runtime import engine
    p = argparse.ArgumentParser()
    engine.add_arguments(p)
    return p.parse_args(["--onnx-dir", str(onnx_dir), "--out", str(out), *extra])


# ---------------------------------------------------------------- everywhere

def test_module_imports_without_tensorrt():
    # imported at the top of this file; tensorrt must not have come with it where it is absent
    assert hasattr(trt_backend, "TrtBackend") and hasattr(trt_backend, "build_engine")
    if not HAVE_TRT:
        assert "tensorrt" not in sys.modules


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here")
def test_require_tensorrt_is_one_user_error_line():
    with pytest.raises(RuntimeStageError) as e:
        trt_backend.require_tensorrt()
    msg = str(e.value)
    assert isinstance(e.value, trt_backend.TensorRTUnavailable)
    assert "\n" not in msg and msg.startswith("TensorRT is not installed") and "pip install '.[trt]'" in msg
    reason = trt_backend.TrtBackend.unavailable_reason("trt")
    assert reason == msg


@pytest.mark.skipif(HAVE_TRT and torch.cuda.is_available(), reason="TensorRT and a GPU are here")
def test_open_backend_refuses_in_one_line(tmp_path):
    path = _linear_onnx(tmp_path / "dense.onnx")
    with pytest.raises(RuntimeStageError) as e:
        open_backend("trt", path)
    assert "\n" not in str(e.value) and "unavailable" in str(e.value)


def test_onnx_input_spec_reads_the_input(tmp_path):
    assert trt_backend.onnx_input_spec(_linear_onnx(tmp_path / "a.onnx", hw=5)) == ("input", (3, 5, 5))
    with pytest.raises(RuntimeStageError, match="no input named 'input'"):
        trt_backend.onnx_input_spec(_linear_onnx(tmp_path / "b.onnx", input_name="pixels"))


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_onnx_precision_and_weight_bytes(tmp_path, precision):
    path = _linear_onnx(tmp_path / "m.onnx", precision)
    assert trt_backend.onnx_precision(path) == precision
    weights = trt_backend.onnx_weight_bytes(path)
    arrays = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer]
    assert weights["total"] == sum(a.nbytes for a in arrays)
    for dtype in {a.dtype.name for a in arrays}:
        assert weights[dtype] == sum(a.nbytes for a in arrays if a.dtype.name == dtype)
    # the test graphs are real: ONNX Runtime runs them and they agree with the fp32 math
    import onnxruntime as ort
    x = np.random.default_rng(1).standard_normal((2, 3, 4, 4)).astype(np.float32)
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    ref = ort.InferenceSession(str(_linear_onnx(tmp_path / "ref.onnx")),
                               providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert y.shape == (2, 10) and np.abs(y - ref).max() < 0.1


def test_build_refuses_a_file_of_another_precision(tmp_path):
    path = _linear_onnx(tmp_path / "dense.onnx", "fp32")
    with pytest.raises(RuntimeStageError, match="is a fp32 graph, not int8"):
        trt_backend.build_engine(path, tmp_path / "x.engine", precision="int8")
    assert not (tmp_path / "x.engine").exists()


def test_write_atomic_replaces_whole_file(tmp_path):
    target = tmp_path / "sub" / "f.bin"
    trt_backend.write_atomic(target, b"old")
    trt_backend.write_atomic(target, b"new bytes")
    assert target.read_bytes() == b"new bytes" and [p.name for p in target.parent.iterdir()] == ["f.bin"]


@pytest.mark.skipif(HAVE_TRT and torch.cuda.is_available(), reason="TensorRT and a GPU are here")
def test_engine_cli_says_one_line_and_exits_3(tmp_path, capsys):
    from runtime import engine
    args = _engine_args(_export_dir(tmp_path / "onnx", "fp16"), tmp_path / "engines", "--precision", "fp16")
    assert engine.main(args) == engine.EXIT_NO_TENSORRT == 3
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert "TensorRT" in err or "GPU" in err
    assert not (tmp_path / "engines" / "engine_report.json").exists()   # no number was made up


@pytest.mark.skipif(HAVE_TRT and torch.cuda.is_available(), reason="TensorRT and a GPU are here")
@pytest.mark.skipif(not (ROOT / "runtime" / "__main__.py").is_file(), reason="runtime CLI not wired yet")
def test_python_m_runtime_engine_exits_non_zero(tmp_path):
    onnx_dir = _export_dir(tmp_path / "onnx", "int8")
    proc = subprocess.run([sys.executable, "-m", "runtime", "engine", "--onnx-dir", str(onnx_dir),
                           "--precision", "int8", "--out", str(tmp_path / "e")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert len((proc.stdout + proc.stderr).strip().splitlines()) == 1


def test_engine_cli_bad_input_is_exit_2(tmp_path, capsys):
    from runtime import engine
    onnx_dir = _export_dir(tmp_path / "onnx", "fp16")
    assert engine.main(_engine_args(onnx_dir, tmp_path / "e", "--precision", "int8")) == 2
    err = capsys.readouterr().err
    assert "dense.int8-fp16.onnx" in err and len(err.strip().splitlines()) == 1
    assert engine.main(_engine_args(onnx_dir, tmp_path / "e", "--min-batch", "8", "--opt-batch", "4")) == 2


def test_engine_int8_takes_the_fp16_elsewhere_file(tmp_path, capsys):
    """--precision int8 builds *.int8-fp16.onnx into the benchmark's *.int8.engine names; an export
    that has only the float32-elsewhere *.int8.onnx is told what is missing and why."""
    from runtime import engine
    assert [engine.onnx_name("model", p) for p in ("fp32", "fp16", "int8")] == \
        ["model.onnx", "model.fp16.onnx", "model.int8-fp16.onnx"]
    assert [engine.engine_name("dense", p) for p in ("fp32", "fp16", "int8")] == \
        ["dense.engine", "dense.fp16.engine", "dense.int8.engine"]
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    for v in ("dense", "model"):
        _linear_onnx(onnx_dir / f"{v}.int8.onnx", "int8")
    assert engine.main(_engine_args(onnx_dir, tmp_path / "e", "--precision", "int8")) == 2
    err = capsys.readouterr().err.strip()
    assert "dense.int8-fp16.onnx, model.int8-fp16.onnx" in err and "FP32" in err and "\n" not in err
    args = _engine_args(_export_dir(tmp_path / "both", "int8"), tmp_path / "e", "--precision", "int8")
    assert set(engine._inputs(args).values()) == {tmp_path / "both" / "dense.int8-fp16.onnx",
                                                   tmp_path / "both" / "model.int8-fp16.onnx"}


# ---------------------------------------------------------------- where TensorRT is installed

@pytest.mark.trt
def test_network_construction_from_onnx(request):
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install '.[trt]')")
    onnx_path = request.getfixturevalue("ref_onnx")   # a real vit_cifar_ref export
    try:
        _, _, _, network, _ = parsed = trt_backend.parse_network(onnx_path)
    except (RuntimeError, TypeError) as e:   # some setups cannot create a Builder without a GPU
        if torch.cuda.is_available():
            raise
        pytest.skip(f"TensorRT cannot create a builder without a GPU here: {e}")
    assert network.num_inputs == 1 and network.num_outputs == 1
    assert network.get_input(0).name == "input" and tuple(network.get_input(0).shape) == (-1, 3, 32, 32)
    assert network.get_output(0).name == "logits" and network.num_layers > 10
    flag = trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    if trt_backend.trt_major(trt) < 11 and hasattr(network, "get_flag"):
        assert network.get_flag(flag)
    del parsed


_WHY = ("tensorrt is not installed (pip install '.[trt]')" if not HAVE_TRT else
        "no CUDA GPU (torch.cuda.is_available() is False)")
needs_trt_gpu = pytest.mark.skipif(not (HAVE_TRT and torch.cuda.is_available()),
                                   reason=f"needs TensorRT and a CUDA GPU: {_WHY}")


@pytest.mark.trt
@needs_trt_gpu
# fp32 allows for TF32 matmuls (on by default in TensorRT 10 builds)
@pytest.mark.parametrize("precision,tol", [("fp32", 1e-2), ("fp16", 2e-2), ("int8", 0.3)])
def test_engine_matches_onnxruntime(tmp_path, precision, tol):
    import onnxruntime as ort
    onnx_path = _linear_onnx(tmp_path / f"dense.{precision}.onnx", precision)
    info = trt_backend.build_engine(onnx_path, tmp_path / "dense.engine", precision=precision, max_batch=16,
                                    timing_cache_path=tmp_path / "timing.cache")
    assert info["engine_bytes"] == (tmp_path / "dense.engine").stat().st_size > 0
    assert info["device_memory_bytes"] >= 0 and (tmp_path / "timing.cache").stat().st_size > 0
    x = np.random.default_rng(0).standard_normal((20, 3, 4, 4)).astype(np.float32)
    ref = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with open_backend("trt", tmp_path / "dense.engine", precision=precision) as be:
        y = be.run(x)                      # 20 > max batch 16: run in two chunks
        assert y.shape == (20, 10) and np.abs(y - ref).max() < tol
        out, ms = be.timed_run(x[:4])
        assert np.abs(out - ref[:4]).max() < tol and ms > 0
        assert all(t > 0 for t in be.time_runs(x[:8], n=3))
        mem = be.memory()
        assert mem["file_bytes"] == info["engine_bytes"] and "activation_bytes.b8" in mem
        assert be.input_shape() == (-1, 3, 4, 4) and be.describe()["precision"] == precision


@pytest.mark.trt
@needs_trt_gpu
def test_engine_cli_builds_both_engines(tmp_path):
    from runtime import engine
    args = _engine_args(_export_dir(tmp_path / "onnx", "fp16"), tmp_path / "e", "--max-batch", "8")
    assert engine.main(args) == 0
    report = json.loads((tmp_path / "e" / "engine_report.json").read_text())
    assert set(report["engines"]) == {"dense", "model"}
    for e in report["engines"].values():
        assert Path(e["engine"]).stat().st_size == e["engine_bytes"]
    assert engine.main(args) == 0   # the rebuild finds the timing cache the first build wrote
    report = json.loads((tmp_path / "e" / "engine_report.json").read_text())
    assert all(e["timing_cache_reused"] for e in report["engines"].values())
