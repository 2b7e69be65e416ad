"""GPU memory through NVML (``pip install nvidia-ml-py``, imported lazily).

Every function returns None, never raises, where NVML is missing: no nvidia-ml-py, no
driver, no GPU, or a Jetson (its iGPU has no NVML; see ``runtime.tegrastats``).
``device_index`` is NVML's index, which matches CUDA's unless CUDA_VISIBLE_DEVICES or
CUDA_DEVICE_ORDER reorder devices.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager

log = logging.getLogger(__name__)


@contextmanager
def _nvml():
    """Yield the initialised pynvml module, or None where NVML cannot be used."""
    try:
        import pynvml
    except ImportError:
        yield None
        return
    try:
        pynvml.nvmlInit()
    except Exception as e:   # pynvml.NVMLError subclasses: library or driver not found
        log.debug("NVML unavailable: %s", e)
        yield None
        return
    try:
        yield pynvml
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _process_bytes(nv, handle, pid: int) -> int | None:
    for proc in nv.nvmlDeviceGetComputeRunningProcesses(handle):
        if proc.pid == pid and proc.usedGpuMemory is not None:
            return int(proc.usedGpuMemory)
    return None


def _device(nv, index: int, pid: int) -> dict:
    handle = nv.nvmlDeviceGetHandleByIndex(index)
    mem = nv.nvmlDeviceGetMemoryInfo(handle)
    return {"index": index, "name": _text(nv.nvmlDeviceGetName(handle)),
            "driver": _text(nv.nvmlSystemGetDriverVersion()),
            "memory_bytes": int(mem.total), "used_bytes": int(mem.used),
            "process_used_bytes": _process_bytes(nv, handle, pid)}


def gpu_memory(device_index: int = 0, pid: int | None = None) -> dict | None:
    """One GPU: name, driver, memory_bytes (total), used_bytes (whole device) and
    process_used_bytes (``pid``, default this process).

    ``process_used_bytes`` is None where NVML cannot attribute memory to the process
    (inside a container whose PID namespace hides it from the driver, or under WDDM).
    """
    with _nvml() as nv:
        if nv is None:
            return None
        try:
            return _device(nv, device_index, os.getpid() if pid is None else pid)
        except Exception as e:
            log.debug("NVML query failed: %s", e)
            return None


def _all_devices(pid: int) -> list[dict] | None:
    with _nvml() as nv:
        if nv is None:
            return None
        try:
            return [_device(nv, i, pid) for i in range(nv.nvmlDeviceGetCount())]
        except Exception as e:
            log.debug("NVML query failed: %s", e)
            return None


def gpu_info() -> list[dict] | None:
    """Every GPU NVML sees, each as ``gpu_memory`` describes it; None where NVML is unavailable."""
    return _all_devices(os.getpid())


def process_gpu_memory(pid: int | None = None) -> int | None:
    """Bytes of GPU memory NVML attributes to ``pid`` (default: this process) over all GPUs, or None."""
    used = [g["process_used_bytes"] for g in _all_devices(os.getpid() if pid is None else pid) or []
            if g["process_used_bytes"] is not None]
    return sum(used) if used else None
