"""tegrastats lines in the documented formats (L4T / Jetson Linux developer guide, "tegrastats
Utility"), one per board generation, parsed into numbers; and the sampler on a real subprocess."""
from __future__ import annotations

import sys

import pytest

from runtime.tegrastats import CpuCore, TegrastatsSampler, parse_line, summarize

# Orin Nano / Orin NX, JetPack 6: rails in mW, GR3D frequency in brackets, date prefix.
ORIN = ("10-08-2026 04:38:21 RAM 1343/7620MB (lfb 157x4MB) SWAP 165/3810MB (cached 3MB) "
        "CPU [38%@1497,2%@729,off,0%@729,1%@729,0%@729] EMC_FREQ 15%@2133 GR3D_FREQ 99%@[612] "
        "NVDEC off NVJPG off VIC off OFA off APE 200 cpu@48.562C soc2@46.593C soc0@48.625C "
        "gpu@49.625C tj@49.312C soc1@47.937C VDD_IN 5251mW/8535mW VDD_CPU_GPU_CV 512mW/1944mW "
        "VDD_SOC 2720mW/3659mW")
# AGX Orin: two GPC frequencies, the board input rail is VIN_SYS_5V0, a disabled sensor at -256C.
AGX_ORIN = ("RAM 4096/30536MB (lfb 200x4MB) SWAP 0/15268MB (cached 0MB) "
            "CPU [10%@2201,5%@2201,3%@2201,1%@2201,off,off,off,off,0%@729,0%@729,0%@729,0%@729] "
            "EMC_FREQ 0%@3199 GR3D_FREQ 12%@[1300,1300] cv0@-256C cpu@50C soc0@49C "
            "VDD_GPU_SOC 3200mW/3210mW VDD_CPU_CV 1600mW/1610mW VIN_SYS_5V0 5000mW/5010mW "
            "VDDQ_VDD2_1V8AO 400mW/400mW")
# AGX Xavier, JetPack 4: rails are "NAME instant/average" without a unit.
XAVIER = ("RAM 2447/15823MB (lfb 2849x4MB) SWAP 0/7911MB (cached 0MB) "
          "CPU [2%@1190,1%@1190,0%@1190,0%@1190,off,off,off,off] EMC_FREQ 0%@1600 GR3D_FREQ 0%@318 "
          "APE 150 MTS fg 0% bg 0% AO@38C GPU@38.5C Tdiode@40.75C PMIC@100C AUX@37.5C CPU@39.5C "
          "thermal@38.7C Tboard@38C GPU 0/0 CPU 311/311 SOC 1399/1399 CV 0/0 VDDRQ 155/155 SYS5V 1636/1636")
# Nano (JetPack 4): IRAM block, POM_ rails without unit.
NANO = ("RAM 1143/3964MB (lfb 498x4MB) SWAP 0/1982MB (cached 0MB) IRAM 0/252kB(lfb 252kB) "
        "CPU [5%@102,4%@102,2%@102,1%@102] EMC_FREQ 0%@204 GR3D_FREQ 0%@76 APE 25 PLL@28C CPU@30.5C "
        "PMIC@100C GPU@28.5C AO@36.5C thermal@29.5C POM_5V_IN 1119/1119 POM_5V_GPU 0/0 POM_5V_CPU 123/123")
# TX2 (L4T 28): one frequency for the whole CPU block, VDD_ rails without unit.
TX2 = ("RAM 1732/7851MB (lfb 1x4MB) CPU [16%,off,off,1%,0%,2%]@2035 EMC_FREQ 3%@1866 GR3D_FREQ 0%@1300 "
       "APE 150 BCPU@43.5C MCPU@43.5C GPU@39.5C PLL@43.5C Tboard@38C Tdiode@41C PMIC@100C "
       "thermal@41.6C VDD_IN 2914/2914 VDD_CPU 381/381 VDD_GPU 152/152 VDD_SOC 686/686 VDD_WIFI 0/0 VDD_DDR 576/576")


def test_orin_line():
    s = parse_line(ORIN)
    assert (s.ram_used_mb, s.ram_total_mb) == (1343, 7620)
    assert (s.swap_used_mb, s.swap_total_mb, s.swap_cached_mb) == (165, 3810, 3)
    assert len(s.cpu) == 6 and s.cpu[0] == CpuCore(38.0, 1497) and s.cpu[2] == CpuCore(None, None)
    assert (s.gpu_load, s.gpu_mhz, s.emc_load, s.emc_mhz) == (99.0, 612, 15.0, 2133)
    assert s.temperatures_c == {"cpu": 48.562, "soc2": 46.593, "soc0": 48.625, "gpu": 49.625,
                                "tj": 49.312, "soc1": 47.937}
    assert s.power_mw == {"VDD_IN": (5251, 8535), "VDD_CPU_GPU_CV": (512, 1944), "VDD_SOC": (2720, 3659)}
    assert s.total_power_mw == 5251


def test_agx_orin_line():
    s = parse_line(AGX_ORIN)
    assert (s.ram_used_mb, s.ram_total_mb, s.swap_cached_mb) == (4096, 30536, 0)
    assert len(s.cpu) == 12 and sum(c.load is None for c in s.cpu) == 4 and s.cpu[8] == CpuCore(0.0, 729)
    assert (s.gpu_load, s.gpu_mhz) == (12.0, 1300)
    assert s.temperatures_c["cv0"] == -256.0 and s.temperatures_c["cpu"] == 50.0
    assert s.power_mw["VIN_SYS_5V0"] == (5000, 5010) and s.total_power_mw == 5000
    assert len(s.power_mw) == 4


def test_xavier_line_old_rails_without_unit():
    s = parse_line(XAVIER)
    assert (s.ram_used_mb, s.ram_total_mb, s.swap_used_mb) == (2447, 15823, 0)
    assert s.cpu[:2] == (CpuCore(2.0, 1190), CpuCore(1.0, 1190)) and s.cpu[4].load is None
    assert (s.gpu_load, s.gpu_mhz, s.emc_mhz) == (0.0, 318, 1600)
    assert s.temperatures_c["GPU"] == 38.5 and s.temperatures_c["Tdiode"] == 40.75
    assert s.power_mw == {"GPU": (0, 0), "CPU": (311, 311), "SOC": (1399, 1399), "CV": (0, 0),
                          "VDDRQ": (155, 155), "SYS5V": (1636, 1636)}
    assert s.total_power_mw is None   # Xavier JetPack 4 has no board-input rail


def test_nano_line():
    s = parse_line(NANO)
    assert (s.ram_used_mb, s.ram_total_mb, s.swap_total_mb) == (1143, 3964, 1982)
    assert s.cpu == tuple(CpuCore(v, 102) for v in (5.0, 4.0, 2.0, 1.0))
    assert (s.gpu_load, s.gpu_mhz) == (0.0, 76)
    assert "IRAM" not in s.power_mw and s.power_mw["POM_5V_CPU"] == (123, 123)
    assert s.total_power_mw == 1119 and s.temperatures_c["thermal"] == 29.5


def test_tx2_line_shared_cpu_frequency():
    s = parse_line(TX2)
    assert s.swap_used_mb is None and (s.ram_used_mb, s.ram_total_mb) == (1732, 7851)
    assert s.cpu[0] == CpuCore(16.0, 2035) and s.cpu[1] == CpuCore(None, None) and s.cpu[3] == CpuCore(1.0, 2035)
    assert s.power_mw["VDD_IN"] == (2914, 2914) and s.total_power_mw == 2914 and len(s.power_mw) == 6


def test_not_a_tegrastats_line():
    with pytest.raises(ValueError, match="not a tegrastats line"):
        parse_line("tegrastats: command not found")


def test_summary_peak_and_mean():
    samples = [parse_line(ORIN), parse_line(ORIN.replace("RAM 1343/", "RAM 1543/").replace("VDD_IN 5251", "VDD_IN 6251"))]
    s = summarize(samples)
    assert s["ram_peak_mb"] == 1543 and s["ram_mean_mb"] == 1443.0 and s["ram_first_mb"] == 1343
    assert s["power_mean_mw"] == 5751.0 and s["gpu_load_mean_pct"] == 99.0 and "unified memory" in s["note"]
    assert summarize([]) is None


def test_sampler_reads_a_running_process():
    script = ("import sys, time\n"
              f"for line in {[NANO, 'garbage', ORIN]!r}:\n"
              "    print(line, flush=True)\n"
              "time.sleep(30)\n")
    with TegrastatsSampler(command=[sys.executable, "-c", script]) as t:
        import time
        deadline = time.monotonic() + 20
        while len(t.samples) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert [s.ram_used_mb for s in t.samples] == [1143, 1343] and t.skipped == 1
    assert t.summary()["ram_peak_mb"] == 1343 and t._proc is None   # the process was stopped


def test_sampler_without_tegrastats_reports_nothing():
    with TegrastatsSampler(command=["no-such-tegrastats-binary"]) as t:
        pass
    assert t.summary() is None
