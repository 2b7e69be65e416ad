"""The GPUs nvidia-smi lists: name, memory and driver. Standard library only, so compress (the
latency table's machine identity) and runtime (the machine report) share this one probe."""
from __future__ import annotations

import shutil
import subprocess


def nvidia_smi_gpus() -> list[dict]:
    """[{"name", "memory_bytes", "driver"}] per GPU; [] without nvidia-smi or when it fails."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    result = []
    for line in out.stdout.strip().splitlines() if out.returncode == 0 else []:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            mem = int(parts[1]) * 2**20 if parts[1].isdigit() else None
            result.append({"name": parts[0], "memory_bytes": mem, "driver": parts[2]})
    return result
