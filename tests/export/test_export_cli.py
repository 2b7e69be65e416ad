"""`python -m export` end to end on a compress-stage artifact, and every bad input it promises to name."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from export.__main__ import main
from export.errors import ExportError
from export_testlib import TINY, write_compressed_dir

KWARGS = {k: TINY[k] for k in ("embed_dim", "depth", "num_heads", "patch_size")}


@pytest.fixture(scope="module")
def compressed_dir(tiny, tmp_path_factory):
    """The tiny pair as a real compress artifact: vit_cifar_ref at tiny width, dense checkpoint beside it."""
    import timm

    dense = timm.create_model("vit_cifar_ref", pretrained=False, **KWARGS)
    dense.load_state_dict(tiny["dense"].state_dict())  # same architecture as the tiny fixture
    root = tmp_path_factory.mktemp("artifact")
    return write_compressed_dir(root / "compressed", dense.eval(), tiny["model"], tiny["ranges"],
                                tiny["dense_ranges"], kwargs=KWARGS)


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("export: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_cli_writes_eight_checked_files_and_a_report(compressed_dir, tmp_path, capsys):
    out = tmp_path / "onnx"
    rc, stdout, err = _run(capsys, "--compressed", compressed_dir, "--out", out, "--num-parity", 8)
    assert rc == 0, err
    names = [f"{stem}{suffix}" for stem in ("dense", "model")
             for suffix in (".onnx", ".int8.onnx", ".fp16.onnx", ".int8-fp16.onnx")]
    assert sorted(p.name for p in out.iterdir()) == sorted(names + ["export_report.json"])  # no temp left
    report = json.loads((out / "export_report.json").read_text())
    assert report["passed"] and report["opset"] == 17 and set(report["files"]) == set(names)
    for name in names:
        f = report["files"][name]
        assert f["bytes"] == (out / name).stat().st_size and f["opset"] == (19 if "int8-fp16" in name else 17)
        assert f["parity"]["passed"] and f["parity"]["images"] == 8
        assert f["lowrank_pairs"] == (7 if name.startswith("model") else 0)
        assert (f["qdq"]["int8_weights"] > 0) == (".int8" in name)
        assert f["precision"] == ("int8" if ".int8" in name else name.split(".")[-2] if ".fp16" in name else "fp32")
        # ORT's own fused int8 kernels are measured too (exact or not depends on the CPU); not for the
        # TensorRT file, which ORT's CPU int8 kernels are not meant to run
        assert ("ort_int8_kernels" in f) == (".int8." in name)
        if ".int8." in name:
            k = f["ort_int8_kernels"]
            assert k["images"] == 8 and k["max_abs"] >= 0 and isinstance(k["cpu_saturates"], bool)
    assert report["files"]["model.int8.onnx"]["qdq"]["int8_weights"] == 2 * 7 + 2  # pairs + dense proj + head
    assert report["files"]["model.int8.onnx"]["initializer_bytes"]["int8"] > 0
    trt, ort_int8 = report["files"]["model.int8-fp16.onnx"], report["files"]["model.int8.onnx"]
    assert trt["qdq"] == ort_int8["qdq"] and trt["initializer_bytes"]["int8"] == ort_int8["initializer_bytes"]["int8"]
    assert trt["initializer_bytes"]["float16"] > trt["initializer_bytes"].get("float32", 0)  # LayerNorm only
    assert report["params"]["model"] < report["params"]["dense"]
    assert report["dense_is_compressed_origin"] is True  # dense rebuilt from the manifest's checkpoint
    assert {"torch", "onnx", "onnxruntime", "polygraphy"} <= set(report["versions"])
    assert "model.int8.onnx" in stdout


def test_cli_options_skip_variants_and_set_opset(compressed_dir, tmp_path, capsys):
    out = tmp_path / "onnx"
    rc, _, err = _run(capsys, "--compressed", compressed_dir, "--out", out, "--no-int8", "--no-fp16",
                      "--opset", 18, "--num-parity", 4)
    assert rc == 0, err
    report = json.loads((out / "export_report.json").read_text())
    assert set(report["files"]) == {"dense.onnx", "model.onnx"} and report["files"]["model.onnx"]["opset"] == 18


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("no_manifest", "no manifest.json"),
    ("bad_json", "is corrupt"),
    ("bad_weights", "is corrupt"),
    ("wrong_rank", "does not match"),
    ("opset", "opset 13 is too old"),
    ("unknown_layer", "architecture mismatch"),
    ("no_quant", "no INT8 calibration"),
])
def test_bad_inputs_are_one_line_errors(compressed_dir, tmp_path, capsys, case, message):
    d = tmp_path / "c"
    if case != "missing":
        shutil.copytree(compressed_dir, d)
    manifest = d / "manifest.json"
    opset = 17
    if case == "no_manifest":
        manifest.unlink()
    elif case == "bad_json":
        manifest.write_text(manifest.read_text()[:200])
    elif case == "bad_weights":
        w = d / "weights.safetensors"
        w.write_bytes(w.read_bytes()[:1000])
    elif case in ("wrong_rank", "unknown_layer", "no_quant"):
        m = json.loads(manifest.read_text())
        if case == "wrong_rank":
            m["layers"]["blocks.0.mlp.fc1"]["rank"] += 1
        elif case == "unknown_layer":
            m["quant"]["act_ranges"]["blocks.9.mlp.fc1"] = {"input": 1.0, "mid": 1.0}
        else:
            del m["quant"]["act_ranges"]
        manifest.write_text(json.dumps(m))
    elif case == "opset":
        opset = 13
    out = tmp_path / "onnx"
    rc, _, err = _run(capsys, "--compressed", d, "--out", out, "--opset", opset, "--num-parity", 4)
    assert rc == 2
    assert message in _error_line(err)
    assert not out.exists() or not any(out.glob("*.onnx"))


def test_parity_failure_exits_1_and_writes_only_the_report(compressed_dir, tmp_path, capsys, monkeypatch):
    from export import parity

    monkeypatch.setitem(parity.TOLERANCES, "fp16", parity.Tolerance(atol=0.0, rtol=0.0, min_top1=1.0))
    out = tmp_path / "onnx"
    rc, _, err = _run(capsys, "--compressed", compressed_dir, "--out", out, "--no-int8", "--num-parity", 4)
    assert rc == 1
    assert "parity failed for dense.fp16.onnx, model.fp16.onnx" in _error_line(err)
    assert [p.name for p in out.iterdir()] == ["export_report.json"]
    report = json.loads((out / "export_report.json").read_text())
    assert not report["passed"] and report["files"]["model.onnx"]["parity"]["passed"]


def test_architecture_mismatch_between_dense_and_compressed(tiny):
    from timm.models.vision_transformer import VisionTransformer

    from compress.lowrank import lowrank_layers
    from export.pipeline import check_architecture
    from export_testlib import compress_like, tiny_vit

    other = compress_like(tiny_vit(seed=3))
    manifest = {"model": {"name": "tiny"}, "layers": {
        n: {"in": m.in_features, "out": m.out_features, "rank": m.rank, "comp_rank": m.comp_rank, "dense": False}
        for n, m in lowrank_layers(tiny["model"]).items()}}
    check_architecture(tiny["model"], tiny["dense"], manifest)  # consistent: no error
    check_architecture(other, tiny["dense"], manifest)  # same shapes, other weights: fine
    manifest["layers"]["blocks.0.mlp.fc1"]["rank"] += 1
    with pytest.raises(ExportError, match="architecture mismatch: blocks.0.mlp.fc1"):
        check_architecture(tiny["model"], tiny["dense"], manifest)
    manifest["layers"]["blocks.0.mlp.fc1"]["rank"] -= 1
    wider = VisionTransformer(img_size=32, patch_size=8, embed_dim=96, depth=2, num_heads=2, num_classes=10)
    with pytest.raises(ExportError, match="architecture mismatch"):
        check_architecture(tiny["model"], wider, manifest)


@torch.library.custom_op("vitedge_export_test::mystery", mutates_args=())
def _mystery(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_mystery.register_fake
def _(x):
    return torch.empty_like(x)


def test_unsupported_op_is_named():
    from export.onnx_export import export_onnx

    class Odd(torch.nn.Module):
        def forward(self, x):
            return _mystery(x).mean(dim=(2, 3))

    with pytest.raises(ExportError, match="unsupported op vitedge_export_test.mystery"):
        export_onnx(Odd(), (3, 8, 8))


def test_cli_modelopt_without_the_extra_is_one_line_and_writes_nothing(compressed_dir, tmp_path, capsys,
                                                                       monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "modelopt", None)   # as where nvidia-modelopt is not installed
    out = tmp_path / "onnx"
    rc, _, err = _run(capsys, "--compressed", compressed_dir, "--out", out, "--modelopt")
    assert rc == 2 and "vit-edge[modelopt]" in _error_line(err)
    assert not out.exists()


def test_cli_modelopt_adds_the_baseline_beside_ours(tiny, tmp_path, capsys):
    """--modelopt: dense.modelopt-int8.onnx calibrated on the manifest's images, its parity with
    PyTorch FP32 reported (not gated), the other eight files unchanged."""
    pytest.importorskip("modelopt.onnx.quantization", reason="nvidia-modelopt is an optional extra")
    import timm

    from calibration_data import bundled_path

    dense = timm.create_model("vit_cifar_ref", pretrained=False, **KWARGS)
    dense.load_state_dict(tiny["dense"].state_dict())
    compressed = write_compressed_dir(tmp_path / "compressed", dense.eval(), tiny["model"], tiny["ranges"],
                                      tiny["dense_ranges"], kwargs=KWARGS,
                                      calibration={"path": str(bundled_path("cifar10-calib")), "images": 16,
                                                   "seed": 0})
    out = tmp_path / "onnx"
    rc, stdout, err = _run(capsys, "--compressed", compressed, "--out", out, "--num-parity", 8, "--modelopt")
    assert rc == 0, err
    report = json.loads((out / "export_report.json").read_text())
    f = report["files"]["dense.modelopt-int8.onnx"]
    assert f["baseline"]["tool"].startswith("nvidia-modelopt ") and f["baseline"]["calibration_images"] == 16
    assert f["baseline"]["matmuls_quantized"] >= 8 and f["precision"] == "int8"
    assert f["parity"]["reference"] == "pytorch fp32" and f["parity"]["images"] == 8
    assert f["bytes"] == (out / "dense.modelopt-int8.onnx").stat().st_size and len(f["sha256"]) == 16
    assert len(report["files"]) == 9 and report["passed"]
    assert "dense.modelopt-int8.onnx" in stdout
