"""Fixtures for export tests: a tiny compressed ViT, its dense original, INT8 ranges, real images.

The compressed model is built the way compress/ builds one (SVD truncation + a small
compensation pair, nonzero biases) but without running the search, so the graph tests
stay fast; ranges come from compress.quantize.calibrate_activations on real CIFAR images.
"""
from __future__ import annotations

import pytest
import torch

from compress.zoo import reference as ref
from compress.quantize import calibrate_activations
from export_testlib import compress_like, tiny_vit


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The test machine is shared: keep PyTorch to one thread here (ORT parity runs use one too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cifar_batches():
    """16 real CIFAR-10 calibration images, preprocessed for the CIFAR data config, 2 batches."""
    from calibration_data import load_image_set, make_loader

    images = load_image_set("cifar10-calib", num=16)
    return [x.numpy() for x, _ in make_loader(images, ref.data_config(), batch_size=8)]


@pytest.fixture(scope="session")
def tiny(cifar_batches):
    """dict: dense / model (compressed) modules and their INT8 ranges from calibrate_activations."""
    dense = tiny_vit()
    model = compress_like(dense)
    batches = [torch.from_numpy(b) for b in cifar_batches]
    ranges = calibrate_activations(model, batches)
    dense_ranges = {k: {"input": v["input"]} for k, v in calibrate_activations(dense, batches).items()}
    return {"dense": dense, "model": model, "ranges": ranges, "dense_ranges": dense_ranges}


@pytest.fixture(scope="session")
def tiny_onnx(tiny, tmp_path_factory):
    """The eight files of the tiny pair, written once: {"model.onnx": path, ...}."""
    import onnx

    from export.fp16 import to_fp16
    from export.pipeline import export_variant, int8_fp16, quantized_linears
    from export.qdq import insert_qdq

    out = tmp_path_factory.mktemp("tiny_onnx")
    paths = {}
    for stem, r in (("dense", tiny["dense_ranges"]), ("model", tiny["ranges"])):
        m = tiny[stem]
        proto = export_variant(m, (3, 32, 32), 17, expect_pairs=stem == "model")
        qspecs = quantized_linears(m, r)
        for name, p in ((f"{stem}.onnx", proto),
                        (f"{stem}.int8.onnx", insert_qdq(proto, qspecs)),
                        (f"{stem}.fp16.onnx", to_fp16(proto)),
                        (f"{stem}.int8-fp16.onnx", int8_fp16(proto, qspecs))):
            onnx.save(p, str(out / name))
            paths[name] = out / name
    return paths
