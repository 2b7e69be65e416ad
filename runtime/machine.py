"""Name the machine a measurement was taken on: CPU, cores, memory, GPU, driver, libraries.

Everything is read without importing heavy libraries (package versions come from their
installed metadata) and every probe is best effort: a missing field is None, never an error.
"""
from __future__ import annotations

import logging
import os
import platform
from importlib import metadata
from pathlib import Path

from cliutil import nvidia_smi_gpus
from export import cpu_int8_saturates
from runtime import nvml

log = logging.getLogger(__name__)

LIBRARIES = ("numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "torch", "timm",
             "nvidia-ml-py")


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace").strip("\x00 \n")
    except OSError:
        return None


def cpu_model() -> str | None:
    """CPU model from /proc/cpuinfo (x86 'model name'; ARM 'Hardware' or the device-tree model)."""
    info = _read("/proc/cpuinfo") or ""
    for key in ("model name", "Hardware", "Processor", "cpu model"):
        for line in info.splitlines():
            if line.split(":")[0].strip() == key and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or None


def cpu_counts() -> dict:
    """Logical CPUs, the ones this process may run on, and physical cores where known."""
    logical = os.cpu_count()
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = logical
    physical = set()
    for block in (_read("/proc/cpuinfo") or "").split("\n\n"):
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        if "core id" in fields:
            physical.add((fields.get("physical id"), fields["core id"]))
    return {"logical": logical, "usable": usable, "physical": len(physical) or None}


def memory_total() -> int | None:
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return None


def jetson() -> dict | None:
    """Jetson board model and L4T release, or None off Jetson."""
    release = _read("/etc/nv_tegra_release")
    model = _read("/proc/device-tree/model")
    if release is None and not (model and "jetson" in model.lower()):
        return None
    return {"model": model, "l4t": release.splitlines()[0] if release else None}


def gpus() -> list[dict]:
    """GPUs with name, memory and driver, via NVML when present, else nvidia-smi."""
    try:
        found = nvml.gpu_info()  # None where NVML is unavailable (no driver, Jetson)
    except Exception as exc:  # best effort: the report still names the CPU side
        log.warning("NVML GPU query failed: %s", exc)
        found = None
    if found:
        return [{k: g.get(k) for k in ("name", "memory_bytes", "driver")} for g in found]
    return nvidia_smi_gpus()


def library_versions() -> dict[str, str | None]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def load_average() -> list[float] | None:
    """1/5/15-minute load average: says how busy the machine was while measuring."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info() -> dict:
    """Everything above in one JSON-able dict."""
    return {
        "system": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpus": cpu_counts(),
        "cpu_int8_saturates": cpu_int8_saturates(),
        "memory_bytes": memory_total(),
        "jetson": jetson(),
        "gpus": gpus(),
        "libraries": library_versions(),
        "load_average": load_average(),
    }


def describe_machine(info: dict) -> str:
    """One line for reports: 'CPU (N cores), RAM, GPU (driver), libraries'."""
    cpus = info.get("cpus") or {}
    parts = [f"{info.get('cpu') or 'unknown CPU'} ({cpus.get('usable')} usable / {cpus.get('logical')} logical CPUs)"]
    if info.get("cpu_int8_saturates"):
        parts.append("no VNNI: ONNX Runtime's int8 GEMMs saturate here")
    if info.get("memory_bytes"):
        parts.append(f"{info['memory_bytes'] / 2**30:.1f} GiB RAM")
    if info.get("jetson"):
        parts.append(f"{info['jetson'].get('model')} ({info['jetson'].get('l4t')})")
    for gpu in info.get("gpus") or []:
        parts.append(f"{gpu.get('name')} (driver {gpu.get('driver')})")
    if not info.get("gpus"):
        parts.append("no GPU")
    libs = ", ".join(f"{k} {v}" for k, v in (info.get("libraries") or {}).items() if v)
    if libs:
        parts.append(libs)
    if info.get("load_average"):
        parts.append(f"load average {info['load_average'][0]}")
    return "; ".join(parts)
