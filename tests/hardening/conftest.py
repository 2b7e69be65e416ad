"""Fixtures for the hardening tests: one tiny compressed model (a 2-block, 64-wide vit_cifar_ref on
16 bundled CIFAR-10 images) and its export, built once per session; everything else is a copy."""
from __future__ import annotations

import pytest
import torch

from hardening_lib import compress_tiny


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    """{"compressed": dir, "onnx": dir (int8 + fp32, no fp16)} of the tiny model, read-only by convention."""
    from export import ExportOptions, export_compressed

    root = tmp_path_factory.mktemp("artifacts")
    compressed = compress_tiny(root / "compressed")
    export_compressed(compressed, root / "onnx", ExportOptions(num_parity=4, fp16=False, threads=1))
    return {"compressed": compressed, "onnx": root / "onnx"}
