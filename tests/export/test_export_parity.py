"""Parity of every export against PyTorch on real images (polygraphy Comparator + ORT)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from compress.quantize import apply_fake_quant_, calibrate_activations, remove_fake_quant_
from export.parity import TOLERANCES, Tolerance, check_parity, cpu_int8_saturates
from export_testlib import compress_like


def _parity(path, model, batches, precision, ranges=None):
    if ranges is not None:
        apply_fake_quant_(model, ranges)
    try:
        return check_parity(path, model, batches, TOLERANCES[precision])
    finally:
        if ranges is not None:
            remove_fake_quant_(model)


@pytest.mark.parametrize("stem", ["model", "dense"])
def test_all_exports_match_pytorch(tiny, tiny_onnx, cifar_batches, stem):
    m = tiny[stem]
    ranges = tiny["ranges" if stem == "model" else "dense_ranges"]
    fp32 = _parity(tiny_onnx[f"{stem}.onnx"], m, cifar_batches, "fp32")
    assert fp32 and fp32.max_abs < 1e-5 * max(1.0, fp32.logit_scale) and fp32.top1_agreement == 1.0
    fp16 = _parity(tiny_onnx[f"{stem}.fp16.onnx"], m, cifar_batches, "fp16")
    assert fp16 and fp16.images == 16, str(fp16)
    int8 = _parity(tiny_onnx[f"{stem}.int8.onnx"], m, cifar_batches, "int8", ranges)
    assert int8, str(int8)
    assert fp32.max_abs < fp16.max_abs  # each reduced precision is visible, not silently fp32
    assert fp32.max_abs < int8.max_abs


def test_int8_file_is_the_fake_quant_model_layer_by_layer(tiny, tiny_onnx, cifar_batches):
    """With one layer quantized at a time the INT8 graph equals PyTorch fake-quant to float
    rounding (whole-network differences are single rounding-boundary flips that propagate)."""
    import onnx

    from export.pipeline import quantized_linears
    from export.qdq import insert_qdq

    proto = onnx.load(tiny_onnx["model.onnx"])
    model = tiny["model"]
    x = cifar_batches[0]
    for layer in ("blocks.0.mlp.fc1", "blocks.1.attn.proj", "head"):
        sub = {layer: tiny["ranges"][layer]}
        path = tiny_onnx["model.onnx"].parent / f"one_{layer}.onnx"
        onnx.save(insert_qdq(proto, quantized_linears(model, sub)), str(path))
        r = _parity(path, model, [x], "int8", sub)
        assert r.max_abs < 1e-4 * max(1.0, r.logit_scale), str(r)


def test_int8_saturation_is_read_from_the_cpu_flags():
    assert cpu_int8_saturates("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n", "x86_64")
    assert not cpu_int8_saturates("flags\t\t: avx2 avx512f avx512bw avx512_vnni\n", "x86_64")
    assert not cpu_int8_saturates("flags\t\t: avx2 avx_vnni\n", "x86_64")
    assert not cpu_int8_saturates("flags\t\t: avx2 amx_int8\n", "x86_64")
    assert not cpu_int8_saturates("Features\t: fp asimd asimddp\n", "aarch64")
    assert not cpu_int8_saturates("", "x86_64")          # flags unknown: no claim


def test_int8_kernels_are_exact_unless_the_cpu_saturates(tiny, tiny_onnx, cifar_batches):
    """ORT's fused int8 GEMMs reproduce the QDQ graph where they accumulate in int32; on x86 without
    VNNI large products saturate int16 pair sums, which the default (float Q/DQ) check is immune to."""
    model = tiny["model"]
    apply_fake_quant_(model, tiny["ranges"])
    try:
        graph = check_parity(tiny_onnx["model.int8.onnx"], model, cifar_batches[:1], TOLERANCES["int8"])
        kernels = check_parity(tiny_onnx["model.int8.onnx"], model, cifar_batches[:1], TOLERANCES["int8"],
                               int8_kernels=True)
    finally:
        remove_fake_quant_(model)
    assert graph and graph.rel_l2 < 0.05, str(graph)
    if not cpu_int8_saturates():
        assert kernels and kernels.rel_l2 < 0.05, str(kernels)
    assert graph.rel_l2 <= kernels.rel_l2 + 1e-3     # the float Q/DQ path is the closer one


def test_parity_fails_loudly_on_a_wrong_reference(tiny, tiny_onnx, cifar_batches):
    bad = check_parity(tiny_onnx["model.onnx"], tiny["dense"], cifar_batches, TOLERANCES["fp32"])
    assert not bad and "FAIL" in str(bad) and bad.to_dict()["passed"] is False
    strict = check_parity(tiny_onnx["model.fp16.onnx"], tiny["model"], cifar_batches,
                          Tolerance(atol=0.0, rtol=0.0, min_top1=1.0))
    assert not strict  # fp16 is not bit-exact: a zero tolerance must fail


def _export_and_check(dense, model, ranges, dense_ranges, input_size, batches, tmp_path,
                      stems=("dense", "model")):
    import onnx

    from export.fp16 import to_fp16
    from export.pipeline import export_variant, quantized_linears
    from export.qdq import insert_qdq

    results = {}
    for stem, m, r in (("dense", dense, dense_ranges), ("model", model, ranges)):
        if stem not in stems:
            continue
        proto = export_variant(m, input_size, 17, expect_pairs=stem == "model")
        for name, p, prec, rr in ((f"{stem}.onnx", proto, "fp32", None),
                                  (f"{stem}.int8.onnx", insert_qdq(proto, quantized_linears(m, r)), "int8", r),
                                  (f"{stem}.fp16.onnx", to_fp16(proto), "fp16", None)):
            onnx.save(p, str(tmp_path / name))
            results[name] = _parity(tmp_path / name, m, batches, prec, rr)
    for name, res in results.items():
        assert res, str(res)
    return results


def test_reference_model_exports_match_pytorch(tmp_path):
    """vit_cifar_ref (bundled weights when trained, else random) compressed to rank/4 pairs."""
    import timm

    from calibration_data import load_image_set, make_loader
    from compress.models import load_model

    dense = load_model("vit_cifar_ref")  # bundled weights if present, random init otherwise
    model = compress_like(dense, rank_frac=0.25, comp_rank=4, skip=())
    loader = make_loader(load_image_set("cifar10-calib", num=16), dense, batch_size=8)
    batches = [x for x, _ in loader]
    ranges = calibrate_activations(model, batches)
    res = _export_and_check(dense, model, ranges, None, (3, 32, 32), [b.numpy() for b in batches],
                            tmp_path, stems=("model",))  # the dense files are covered by the tiny tests
    assert res["model.onnx"].top1_agreement == 1.0
    size = (tmp_path / "model.onnx").stat().st_size
    assert size < 4 * sum(p.numel() for p in dense.parameters()) * 0.5  # rank/4 pairs: < half of dense
    assert (tmp_path / "model.int8.onnx").stat().st_size < 0.4 * size
    assert timm.data.resolve_data_config({}, model=dense)["input_size"] == (3, 32, 32)


@pytest.mark.slow
def test_deit_tiny_exports_match_pytorch(tmp_path):
    """deit_tiny_patch16_224, random init (no hub), 4 real ImageNet images."""
    from calibration_data import load_image_set, make_loader
    from compress.models import load_model

    torch.manual_seed(0)
    dense = load_model("deit_tiny_patch16_224", pretrained=False)
    with torch.no_grad():
        for p in dense.parameters():
            if p.ndim == 1:
                p.add_(0.02 * torch.randn_like(p))
    model = compress_like(dense, rank_frac=0.25, comp_rank=8, skip=())
    batches = [x for x, _ in make_loader(load_image_set("imagenet", num=4), dense, batch_size=4)]
    ranges = calibrate_activations(model, batches)
    dense_ranges = {k: {"input": v["input"]} for k, v in calibrate_activations(dense, batches).items()}
    res = _export_and_check(dense, model, ranges, dense_ranges, (3, 224, 224),
                            [b.numpy() for b in batches], tmp_path)
    assert np.isfinite([r.max_abs for r in res.values()]).all()


def test_int8_gate_is_accuracy_against_the_float_model(tiny, tiny_onnx, cifar_batches, tmp_path):
    """The INT8 gate compares the file's distance to the float model with fake-quant's: the exported file
    passes; the same file with one weight scale off by 4x (a wrong-scale bug) fails it."""
    import onnx
    from onnx import numpy_helper

    from compress.quantize import model_outputs

    model, ranges = tiny["model"], tiny["ranges"]
    float_out = model_outputs(model, [torch.from_numpy(b) for b in cifar_batches]).numpy()
    proto = onnx.load(tiny_onnx["model.int8.onnx"])
    scale = next(i for i in proto.graph.initializer if i.name.endswith("fc1.second.weight_scale"))
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 4, scale.name))
    broken = tmp_path / "broken.int8.onnx"
    onnx.save(proto, str(broken))
    apply_fake_quant_(model, ranges)
    try:
        good = check_parity(tiny_onnx["model.int8.onnx"], model, cifar_batches, TOLERANCES["int8"],
                            float_outputs=float_out)
        bad = check_parity(broken, model, cifar_batches, TOLERANCES["int8"], float_outputs=float_out)
    finally:
        remove_fake_quant_(model)
    assert good and good.accuracy.passed, str(good)
    assert 0 < good.accuracy.fake_quant_error < 0.5 and good.accuracy.file_top1 is not None
    assert not bad and bad.accuracy.file_error > 1.25 * bad.accuracy.fake_quant_error, str(bad)
    assert good.to_dict()["accuracy"]["passed"] and not bad.to_dict()["passed"]
