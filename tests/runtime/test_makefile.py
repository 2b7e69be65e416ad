"""The Makefile wires the stage CLIs: dry runs show the commands with the variables passed through,
quoted (a value is one argument, never shell code), and (slow) a real `make all` writes the run."""
from __future__ import annotations

import importlib
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cliutil import OneLineParser
from runtime.__main__ import DELEGATED

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


def command(out: str, stage: str) -> list[str]:
    """The argv of the dry run's ``-m <stage>`` command, as the shell would split it."""
    line = next(l for l in out.splitlines() if re.search(rf"-m {stage}( |$)", l))
    return shlex.split(line)


def has(argv: list[str], *pair: str) -> bool:
    return any(argv[i:i + len(pair)] == list(pair) for i in range(len(argv)))


def test_dry_run_all_runs_every_stage_in_order(tmp_path):
    out = tmp_path / "run"
    res = make("-n", "all", f"OUT={out}", "RATIO=0.45", "THREADS=3", "REPEATS=7", "VAL=cifar10-test")
    assert stage_commands(res.stdout) == ["compress", "export", "runtime bench", "runtime eval", "runtime report"]
    comp = command(res.stdout, "compress")
    assert has(comp, "--ratio", "0.45") and has(comp, "--out", f"{out}/compressed") and has(comp, "--threads", "3")
    bench = command(res.stdout, "runtime bench")
    assert has(bench, "--threads", "3") and has(bench, "--repeats", "7") and has(bench, "--onnx-dir", f"{out}/onnx")
    ev = command(res.stdout, "runtime eval")
    assert has(ev, "--data", "cifar10-test") and has(ev, "--out", f"{out}/eval.json")
    assert has(command(res.stdout, "runtime report"), "--run-dir", str(out))
    assert not out.exists()  # a dry run writes nothing


def test_unset_variables_pass_nothing_so_the_clis_defaults_hold(tmp_path):
    comp = command(make("-n", "compress", f"OUT={tmp_path}", "RATIO=0.5").stdout, "compress")
    assert comp[comp.index("compress") + 1:] == ["--model", "vit_cifar_ref", "--ratio", "0.5",
                                                 "--out", f"{tmp_path}/compressed"]


def test_dry_run_of_one_stage_pulls_in_what_it_needs(tmp_path):
    res = make("-n", "bench", f"OUT={tmp_path}", "RATIO=0.5")
    assert stage_commands(res.stdout) == ["compress", "export", "runtime bench"]


def test_demo_uses_the_bundled_model_and_a_short_benchmark(tmp_path):
    demo = tmp_path / "demo"  # not runs/demo: that one may already be up to date
    res = make("-n", "demo", "RATIO=0.3", "OUT=elsewhere", f"DEMO_OUT={demo}")  # demo pins its own settings
    assert stage_commands(res.stdout) == ["compress", "export", "runtime bench", "runtime eval", "runtime report"]
    comp = command(res.stdout, "compress")
    assert has(comp, "--model", "vit_cifar_ref") and has(comp, "--ratio", "0.6") and has(comp, "--out", f"{demo}/compressed")
    assert "--calib" not in comp and "--checkpoint" not in comp  # the bundled images and weights
    bench = command(res.stdout, "runtime bench")
    assert has(bench, "--batch-sizes", "1,8") and has(bench, "--repeats", "10")
    assert has(command(res.stdout, "runtime report"), "--run-dir", str(demo))
    default = make("--eval=print-demo-out: ; @echo $(DEMO_OUT)", "print-demo-out").stdout.strip()
    assert default == "runs/demo"


def test_sweep_and_fit_targets_pass_their_variables(tmp_path):
    line = command(make("-n", "sweep", f"SWEEP_OUT={tmp_path}/s", "RATIOS=0.2,0.4", "METHOD=diag").stdout,
                   "runtime sweep")
    assert has(line, "--ratios", "0.2,0.4") and has(line, "--method", "diag") and has(line, "--out", f"{tmp_path}/s")
    line = command(make("-n", "fit", "TARGET_SIZE_MB=1.5", f"FIT_OUT={tmp_path}/f").stdout, "runtime fit")
    assert has(line, "--target-size-mb", "1.5") and "--target-latency-ms" not in line


def test_every_workflow_target_parses_with_the_cli(tmp_path):
    """Each target's command line is one its CLI accepts (argparse's own --help run would reject others)."""
    for target, stage in (("sweep", "runtime sweep"), ("fit", "runtime fit"), ("study", "runtime study")):
        argv = command(make("-n", target, "RATIOS=0.5", "TARGET_SIZE_MB=1", "THREADS=1", "VAL=cifar10-eval",
                            f"{target.upper()}_OUT={tmp_path}/{target}").stdout, stage)
        i = argv.index("runtime")
        parser = OneLineParser(prog=stage)
        importlib.import_module(DELEGATED[target][0]).add_arguments(parser)
        parser.parse_args(argv[i + 2:])


def test_an_injected_command_is_one_quoted_argument_and_never_runs(tmp_path):
    """`make compress "NUM_CALIB=32; touch X; true"` hands compress one bad value: a one-line error, no X."""
    marker = tmp_path / "X"
    dry = command(make("-n", "compress", f"NUM_CALIB=32; touch {marker}; true", "RATIO=0.5",
                       f"OUT={tmp_path}/run").stdout, "compress")
    assert has(dry, "--num-calib", f"32; touch {marker}; true")
    res = make("compress", f"NUM_CALIB=32; touch {marker}; true", "RATIO=0.5", f"OUT={tmp_path}/run", check=False)
    assert res.returncode != 0 and not marker.exists() and not (tmp_path / "run" / "compressed").exists()
    assert "invalid int value" in res.stderr
    spaced = tmp_path / "a folder with spaces"
    assert has(command(make("-n", "export", f"OUT={spaced}", "RATIO=0.5").stdout, "export"),
               "--out", f"{spaced}/onnx")


@pytest.mark.slow
def test_make_all_writes_the_whole_run_directory(tmp_path):
    """The real pipeline on vit_cifar_ref (bundled weights), small settings; a rerun replaces it whole."""
    out = tmp_path / "run"
    small = [f"OUT={out}", "NUM_CALIB=32", "NUM_EVAL=64", "RATIO=0.5", "BATCH_SIZES=1", "WARMUP=1", "REPEATS=5",
             "NUM_PARITY=16", "THREADS=2"]
    make("all", *small)
    for rel in ("compressed/manifest.json", "onnx/model.int8.onnx", "bench/bench.json", "eval.json", "report.md",
                "accuracy_vs_size.png"):
        assert (out / rel).is_file(), rel
    report = (out / "report.md").read_text()
    assert "**missing**" not in report and "## Latency and memory" in report and "## Accuracy" in report
