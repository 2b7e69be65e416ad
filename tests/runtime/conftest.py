"""Real ONNX exports of real timm models (random init: runtime tests measure speed, size
and parity, never accuracy), built once per session in a temporary directory."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch


def export_onnx(model: torch.nn.Module, path: Path, image_size: int, batch: int = 2) -> Path:
    """torch.onnx.export with the export stage's contract: input/logits, dynamic batch, opset 17."""
    x = torch.randn(batch, 3, image_size, image_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=["logits"],
                          opset_version=17, dynamo=False,
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def lowrank_copy(model: torch.nn.Module, keep: float = 0.4, granule: int = 8) -> torch.nn.Module:
    """Replace every block Linear by a truncated-SVD LowRankLinear holding ~``keep`` of its weights."""
    import copy

    model = copy.deepcopy(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small SVDs: extra threads only fight the other jobs on the machine
    try:
        _truncate_all(model, keep, granule)
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def _truncate_all(model, keep, granule):
    from compress.lowrank import LowRankLinear, replace_module_

    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("blocks.")]
    for name in names:
        lin = model.get_submodule(name)
        m, n = lin.weight.shape
        rank = max(granule, int(keep * m * n / (m + n)) // granule * granule)
        U, S, Vh = torch.linalg.svd(lin.weight.detach().double(), full_matrices=False)
        A, B = (U[:, :rank] * S[:rank]).float(), Vh[:rank].float()
        bias = None if lin.bias is None else lin.bias.detach()
        replace_module_(model, name, LowRankLinear.from_factors(A, B, bias))


@pytest.fixture(scope="session")
def exporter():
    """The export_onnx helper, as a fixture (tests/ has no packages to import helpers from)."""
    return export_onnx


@pytest.fixture(scope="session")
def ref_model():
    import timm

    import compress.zoo  # noqa: F401  (registers vit_cifar_ref with timm)

    torch.manual_seed(0)
    return timm.create_model("vit_cifar_ref", pretrained=False).eval()


@pytest.fixture(scope="session")
def ref_onnx(ref_model, tmp_path_factory) -> Path:
    return export_onnx(ref_model, tmp_path_factory.mktemp("ref") / "dense.onnx", 32)


@pytest.fixture(scope="session")
def tiny_export_dir(tmp_path_factory) -> Path:
    """An export directory with dense.onnx, dense.int8.onnx, model.onnx, model.int8.onnx of a
    2-block vit_cifar_ref; INT8 files from onnxruntime's dynamic quantization (int8 weights)."""
    import timm
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import compress.zoo  # noqa: F401

    torch.manual_seed(0)
    dense = timm.create_model("vit_cifar_ref", pretrained=False, depth=2).eval()
    out = tmp_path_factory.mktemp("export")
    export_onnx(dense, out / "dense.onnx", 32)
    export_onnx(lowrank_copy(dense), out / "model.onnx", 32)
    for src, dst in (("dense.onnx", "dense.int8.onnx"), ("model.onnx", "model.int8.onnx")):
        quantize_dynamic(out / src, out / dst, weight_type=QuantType.QInt8)
    return out


# A 2-block, 64-wide vit_cifar_ref (random init): the real registered model, small enough that the
# whole pipeline runs in seconds. Accuracy on it means nothing; the reports' numbers and joins do.
TINY_VIT = {"depth": 2, "embed_dim": 64, "num_heads": 2}


@pytest.fixture(scope="session")
def tiny_base_config():
    """compress.pipeline.Config factory for the tiny ViT on 32 real bundled CIFAR-10 images."""
    from compress.pipeline import Config

    def make(**kw):
        args = dict(model="vit_cifar_ref", model_kwargs=dict(TINY_VIT), pretrained=False, out="unused",
                    ratio=0.5, num_calib=32, batch_size=16, comp_steps=10, stats_cache=None)
        args.update(kw)
        return Config(**args)
    return make


@pytest.fixture(scope="session")
def tiny_run_dir(tiny_base_config, tmp_path_factory) -> Path:
    """A run directory made by actually running every stage (compress, export, eval on 64 bundled
    eval images, bench at batch 1 with the memory probe, report), laid out like `make all OUT=D`."""
    from export import ExportOptions
    from runtime.workflows import run as stages
    from runtime.benchmark import BenchConfig
    from runtime.evaluate import resolve_data

    run_dir = tmp_path_factory.mktemp("run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stages.compress_stage(tiny_base_config(), 0.5, run_dir)
        stages.export_stage(run_dir, ExportOptions(num_parity=16, threads=1))
        images = resolve_data(None, "vit_cifar_ref", 64, 0)
        stages.eval_stage(run_dir, images, ("dense.onnx", "dense.int8.onnx", "model.onnx", "model.int8.onnx"),
                          backend_options={"intra_op_threads": 1}, fake_quant=True)
        stages.bench_stage(run_dir, BenchConfig(batch_sizes=(1, 4), warmup=1, repeats=5,
                                                options={"intra_op_threads": 1}))
    finally:
        torch.set_num_threads(threads)
    return run_dir
