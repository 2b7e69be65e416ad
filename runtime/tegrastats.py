"""Jetson ``tegrastats`` lines parsed into numbers, and a sampler that runs it during a benchmark.

One line of ``tegrastats`` (format from NVIDIA's L4T / Jetson Linux developer guide,
"tegrastats Utility"), e.g. on an Orin with JetPack 6:

    10-08-2026 04:38:21 RAM 1343/7620MB (lfb 157x4MB) SWAP 165/3810MB (cached 3MB)
    CPU [0%@1497,off,...] EMC_FREQ 15%@204 GR3D_FREQ 0%@[305] cpu@48.562C gpu@49.625C
    VDD_IN 5251mW/8535mW VDD_CPU_GPU_CV 512mW/1944mW VDD_SOC 2720mW/3659mW

Older boards (Nano, TX2, Xavier on JetPack 4) write power rails without the unit
(``POM_5V_IN 1119/1119``, ``VDD_IN 3812/3812``, ``GPU 0/0``) and CPU load as ``X%@MHz`` too.
Rails are ``instant/average`` milliwatts, the average being over the whole tegrastats run.

Unified memory: a Jetson's GPU has no memory of its own; CUDA allocations, TensorRT
engines and activations all come out of the same DRAM that ``RAM used`` counts. So on a
Jetson the footprint of a model is the RAM figure (system-wide, from tegrastats) and the
process RSS, not an NVML "GPU memory" number (NVML is not available on Jetson iGPUs).
"""
from __future__ import annotations

import logging
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from typing import Sequence

log = logging.getLogger(__name__)

UNIFIED_MEMORY_NOTE = (
    "Jetson GPUs share system DRAM with the CPU (unified memory): RAM used from tegrastats "
    "and the process RSS are the real footprint; there is no separate GPU memory to report.")

_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB(?: \(lfb (\d+)x(\d+)MB\))?")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB(?: \(cached (\d+)MB\))?")
_CPU = re.compile(r"\bCPU \[([^\]]*)\](?:@(\d+))?")
_CORE = re.compile(r"(\d+)%(?:@(\d+))?")
_GR3D = re.compile(r"\bGR3D_FREQ (\d+)%(?:@\[?([\d,]+)\]?)?")
_EMC = re.compile(r"\bEMC_FREQ (\d+)%(?:@(\d+))?")
_TEMP = re.compile(r"\b([A-Za-z][\w]*)@(-?\d+(?:\.\d+)?)C\b")
# A rail is "NAME instant/average" with optional mW on both; RAM/SWAP/IRAM end in MB/kB and
# never match because a letter follows the second number.
_RAIL = re.compile(r"\b([A-Za-z][\w]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?![\w.])")
_NOT_RAILS = {"RAM", "SWAP", "IRAM"}


@dataclass(frozen=True)
class CpuCore:
    """One core: load in percent (None when the core is off) and frequency in MHz (None if not shown)."""
    load: float | None
    mhz: int | None


@dataclass(frozen=True)
class TegraSample:
    """One parsed tegrastats line; fields a board does not print are None (or empty)."""
    ram_used_mb: int | None = None
    ram_total_mb: int | None = None
    swap_used_mb: int | None = None
    swap_total_mb: int | None = None
    swap_cached_mb: int | None = None
    cpu: tuple[CpuCore, ...] = ()
    gpu_load: float | None = None          # GR3D_FREQ percent
    gpu_mhz: int | None = None             # highest GPC frequency shown
    emc_load: float | None = None          # external memory controller percent
    emc_mhz: int | None = None
    temperatures_c: dict[str, float] = field(default_factory=dict)
    power_mw: dict[str, tuple[int, int]] = field(default_factory=dict)   # rail -> (instant, average)

    @property
    def total_power_mw(self) -> int | None:
        """Instant board input power: VDD_IN (Orin/Xavier NX/TX2), POM_5V_IN (Nano) or VIN_SYS_5V0 (AGX Orin)."""
        for rail in ("VDD_IN", "POM_5V_IN", "VIN_SYS_5V0"):
            if rail in self.power_mw:
                return self.power_mw[rail][0]
        return None


def parse_line(line: str) -> TegraSample:
    """Parse one tegrastats line. Raises ValueError if it carries no RAM figure (not a tegrastats line)."""
    ram = _RAM.search(line)
    if ram is None:
        raise ValueError(f"not a tegrastats line (no 'RAM used/totalMB'): {line.strip()[:80]!r}")
    swap = _SWAP.search(line)
    cpu = _CPU.search(line)
    cores: list[CpuCore] = []
    if cpu:
        shared_mhz = int(cpu.group(2)) if cpu.group(2) else None   # old "CPU [x%,y%]@MHz" form
        for item in cpu.group(1).split(","):
            m = _CORE.fullmatch(item.strip())
            if m is None:    # "off" (core powered down) or an empty slot
                cores.append(CpuCore(None, None))
            else:
                mhz = int(m.group(2)) if m.group(2) else shared_mhz
                cores.append(CpuCore(float(m.group(1)), mhz))
    gr3d = _GR3D.search(line)
    emc = _EMC.search(line)
    rest = line[cpu.end():] if cpu else line   # temperatures and rails follow the CPU block
    temps = {name: float(v) for name, v in _TEMP.findall(rest)}
    rails = {name: (int(now), int(avg)) for name, now, avg in _RAIL.findall(rest)
             if name not in _NOT_RAILS}
    return TegraSample(
        ram_used_mb=int(ram.group(1)), ram_total_mb=int(ram.group(2)),
        swap_used_mb=int(swap.group(1)) if swap else None,
        swap_total_mb=int(swap.group(2)) if swap else None,
        swap_cached_mb=int(swap.group(3)) if swap and swap.group(3) else None,
        cpu=tuple(cores),
        gpu_load=float(gr3d.group(1)) if gr3d else None,
        gpu_mhz=max(int(f) for f in gr3d.group(2).split(",") if f) if gr3d and gr3d.group(2) else None,
        emc_load=float(emc.group(1)) if emc else None,
        emc_mhz=int(emc.group(2)) if emc and emc.group(2) else None,
        temperatures_c=temps, power_mw=rails)


def summarize(samples: Sequence[TegraSample]) -> dict | None:
    """Peak and mean RAM (MB), mean GPU load and mean board power over a run; None without samples."""
    if not samples:
        return None
    ram = [s.ram_used_mb for s in samples]
    gpu = [s.gpu_load for s in samples if s.gpu_load is not None]
    power = [s.total_power_mw for s in samples if s.total_power_mw is not None]
    return {
        "samples": len(samples),
        "ram_total_mb": samples[-1].ram_total_mb,
        "ram_peak_mb": max(ram),
        "ram_mean_mb": round(sum(ram) / len(ram), 1),
        "ram_first_mb": ram[0],
        "swap_peak_mb": max((s.swap_used_mb or 0) for s in samples),
        "gpu_load_mean_pct": round(sum(gpu) / len(gpu), 1) if gpu else None,
        "power_mean_mw": round(sum(power) / len(power), 1) if power else None,
        "note": UNIFIED_MEMORY_NOTE,
    }


def available() -> bool:
    """True where a ``tegrastats`` executable is on PATH (a Jetson)."""
    return shutil.which("tegrastats") is not None


class TegrastatsSampler:
    """Runs ``tegrastats --interval N`` in a subprocess while a benchmark runs, parsing each line.

        with TegrastatsSampler(interval_ms=100) as t:
            run_benchmark()
        print(t.summary())        # None when tegrastats is not available

    ``command`` replaces the executable (tests, or a tegrastats outside PATH).
    """

    def __init__(self, interval_ms: int = 100, command: Sequence[str] | None = None):
        if interval_ms <= 0:
            raise ValueError("interval_ms must be positive")
        self.command = list(command) if command else ["tegrastats", "--interval", str(int(interval_ms))]
        self.samples: list[TegraSample] = []
        self.skipped = 0
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "TegrastatsSampler":
        if shutil.which(self.command[0]) is None:
            log.info("tegrastats not found; no Jetson RAM figures will be recorded")
            return self
        self._proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                      text=True, bufsize=1)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            if not line.strip():
                continue
            try:
                self.samples.append(parse_line(line))
            except ValueError:
                self.skipped += 1

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._proc = None

    def summary(self) -> dict | None:
        return summarize(self.samples)

    def __enter__(self) -> "TegrastatsSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
