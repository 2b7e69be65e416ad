"""NVML memory queries return None, never raise, where NVML cannot be used."""
from __future__ import annotations

import importlib.util
import sys
import types

import pytest

from runtime import nvml

HAVE_NVML = importlib.util.find_spec("pynvml") is not None


@pytest.mark.skipif(HAVE_NVML, reason="nvidia-ml-py is installed here")
def test_none_without_nvidia_ml_py():
    assert nvml.gpu_memory() is None
    assert nvml.process_gpu_memory() is None


def test_none_when_nvml_cannot_start(monkeypatch):
    # nvidia-ml-py present but no driver (a CPU box, a Jetson): nvmlInit raises NVMLError
    class NVMLError(Exception):
        pass

    def no_driver():
        raise NVMLError("NVML Shared Library Not Found")

    monkeypatch.setitem(sys.modules, "pynvml", types.SimpleNamespace(nvmlInit=no_driver, NVMLError=NVMLError))
    assert nvml.gpu_memory() is None and nvml.process_gpu_memory() is None


@pytest.mark.skipif(not HAVE_NVML, reason="nvidia-ml-py is not installed")
def test_real_gpu_figures_where_present():
    info = nvml.gpu_memory()
    if info is None:
        pytest.skip("no NVIDIA driver/GPU here")
    assert 0 < info["used_bytes"] <= info["total_bytes"] and info["name"] and info["driver"]
    assert info["process_used_bytes"] is None or info["process_used_bytes"] <= info["used_bytes"]
