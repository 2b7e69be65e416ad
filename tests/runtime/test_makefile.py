"""The Makefile wires the stage CLIs: dry runs show the commands with the variables passed through,
and (slow) a real `make all` is skipped on a second run unless a variable that matters changed."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")


def make(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), f"PY={sys.executable}", "SETUP=", *args],
                         capture_output=True, text=True, check=check, timeout=600)
    res.stdout = res.stdout.replace("\\\n", " ")  # one line per command (recipes continue lines with \)
    return res


def stage_commands(out: str) -> list[str]:
    """The stage CLIs a dry run would start, in order ("compress", "export", "runtime bench", ...)."""
    return re.findall(r"-m (compress|export|runtime \w+)\b", out)


def test_dry_run_all_runs_every_stage_in_order(tmp_path):
    out = tmp_path / "run"
    res = make("-n", "all", f"OUT={out}", "RATIO=0.45", "THREADS=3", "REPEATS=7", "VAL=cifar10-test")
    assert stage_commands(res.stdout) == ["compress", "export", "runtime bench", "runtime eval", "runtime report"]
    lines = res.stdout.splitlines()
    comp = next(l for l in lines if "-m compress " in l)
    assert "--ratio 0.45" in comp and f"--out {out}/compressed" in comp and "--threads 3" in comp
    bench = next(l for l in lines if "-m runtime bench" in l)
    assert "--threads 3" in bench and "--repeats 7" in bench and f"--onnx-dir {out}/onnx" in bench
    ev = next(l for l in lines if "-m runtime eval" in l)
    assert "--data cifar10-test" in ev and f"--out {out}/eval.json" in ev
    assert f"report --run-dir {out}" in res.stdout
    assert not out.exists()  # a dry run writes nothing, stamps included


def test_dry_run_of_one_stage_pulls_in_what_it_needs(tmp_path):
    res = make("-n", "bench", f"OUT={tmp_path}")
    assert stage_commands(res.stdout) == ["compress", "export", "runtime bench"]


def test_demo_uses_the_bundled_model_and_a_short_benchmark(tmp_path):
    demo = tmp_path / "demo"  # not runs/demo: that one may already be up to date
    res = make("-n", "demo", "RATIO=0.3", "OUT=elsewhere", f"DEMO_OUT={demo}")  # demo pins its own settings
    cmds = stage_commands(res.stdout)
    assert cmds == ["compress", "export", "runtime bench", "runtime eval", "runtime report"]
    comp = next(l for l in res.stdout.splitlines() if "-m compress " in l)
    assert "--model vit_cifar_ref" in comp and "--ratio 0.6" in comp and f"--out {demo}/compressed" in comp
    assert "--calib" not in comp and "--checkpoint" not in comp  # the bundled images and weights
    bench = next(l for l in res.stdout.splitlines() if "-m runtime bench" in l)
    assert "--batch-sizes 1,8" in bench and "--repeats 10" in bench and "--threads 2" in bench
    assert f"runtime report --run-dir {demo}" in res.stdout
    default = make("--eval=print-demo-out: ; @echo $(DEMO_OUT)", "print-demo-out").stdout.strip()
    assert default == "runs/demo"


def test_sweep_and_fit_targets_pass_their_variables(tmp_path):
    res = make("-n", "sweep", f"SWEEP_OUT={tmp_path}/s", "RATIOS=0.2,0.4", "METHOD=diag")
    line = next(l for l in res.stdout.splitlines() if "-m runtime sweep" in l)
    assert "--ratios 0.2,0.4" in line and "--method diag" in line and f"--out {tmp_path}/s" in line
    res = make("-n", "fit", "TARGET_SIZE_MB=1.5", f"FIT_OUT={tmp_path}/f")
    line = next(l for l in res.stdout.splitlines() if "-m runtime fit" in l)
    assert "--target-size-mb 1.5" in line and "--target-latency-ms" not in line


@pytest.mark.slow
def test_make_all_runs_once_then_only_what_changed(tmp_path):
    """The real pipeline on vit_cifar_ref (bundled weights when trained, else random init), small settings."""
    out = tmp_path / "run"
    small = [f"OUT={out}", "NUM_CALIB=32", "NUM_EVAL=64", "RATIO=0.5", "BATCH_SIZES=1", "WARMUP=1", "REPEATS=5",
             "NUM_PARITY=16", "THREADS=2"]
    make("all", *small)
    for rel in ("compressed/manifest.json", "onnx/model.int8.onnx", "bench/bench.json", "eval.json", "report.md",
                "accuracy_vs_size.png"):
        assert (out / rel).is_file(), rel
    report = (out / "report.md").read_text()
    assert "**missing**" not in report and "## Latency and memory" in report and "## Accuracy" in report
    assert make("-q", "all", *small, check=False).returncode == 0  # up to date: nothing would run
    assert stage_commands(make("-n", "all", *small).stdout) == []
    assert stage_commands(make("-n", "all", *small[:-1], "THREADS=1").stdout) == ["runtime bench", "runtime report"]
    changed = make("-n", "all", *[a for a in small if not a.startswith("RATIO=")], "RATIO=0.4").stdout
    assert stage_commands(changed) == ["compress", "export", "runtime bench", "runtime eval", "runtime report"]
