"""`python -m runtime`: parser, bench end to end, info, delegation to engine/eval, one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

import runtime.__main__ as cli
from runtime.errors import RuntimeStageError

ROOT = Path(__file__).resolve().parents[2]


def test_parser_types_bench_arguments():
    args = cli.get_parser().parse_args(
        ["bench", "--onnx-dir", "d", "--batch-sizes", "1,8", "--threads", "2", "--no-spin", "--option", "mem_arena=false",
         "--option", "device_id=1", "--variants", "dense-fp32,lowrank-fp32", "--out", "o"])
    assert args.batch_sizes == (1, 8) and args.threads == 2 and args.variants == ("dense-fp32", "lowrank-fp32")
    assert cli._bench_options(args) == {"intra_op_threads": 2, "allow_spinning": False, "mem_arena": False,
                                        "device_id": 1}
    assert args.warmup >= 1 and args.repeats >= 1 and args.fp16 is None and args.backend == "ort"


@pytest.mark.parametrize("bad", [["--batch-sizes", "1,x"], ["--batch-sizes", "0"], ["--option", "novalue"]])
def test_parser_rejects_bad_values(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.get_parser().parse_args(["bench", "--onnx-dir", "d", "--out", "o", *bad])
    assert exc.value.code == 2


def test_bench_end_to_end(tiny_export_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    rc = cli.main(["bench", "--onnx-dir", str(tiny_export_dir), "--threads", "1", "--batch-sizes", "1,2",
                   "--warmup", "1", "--repeats", "3", "--variants", "dense-fp32,lowrank-fp32", "--no-memory",
                   "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "bench.json").read_text())
    assert list(result["variants"]) == ["dense-fp32", "lowrank-fp32"]
    assert result["config"]["options"] == {"intra_op_threads": 1} and result["config"]["batch_sizes"] == [1, 2]
    assert all("process" not in v for v in result["variants"].values())
    stdout = capsys.readouterr().out
    assert "| 2 | lowrank-fp32 |" in stdout and str(out / "bench.png") in stdout


def test_bench_user_error_is_one_line_exit_2(tmp_path, capsys):
    rc = cli.main(["bench", "--onnx-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: no such export directory") and "\n" not in err
    rc = cli.main(["bench", "--onnx-dir", str(tmp_path), "--backend", "nope", "--out", str(tmp_path / "o")])
    assert rc == 2


def test_info_lists_backends(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backends"]["ort"] is None and "trt" in info["backends"]
    assert info["machine"]["cpus"]["logical"] >= 1 and info["machine"]["libraries"]["onnxruntime"]
    assert cli.main(["info"]) == 0
    assert "ort       available" in capsys.readouterr().out


def _fake_module(calls: list, fail: Exception | None = None):
    mod = types.ModuleType("fake")

    def add_arguments(p):
        p.add_argument("--onnx-dir", required=True)
        p.add_argument("--precision", default="fp16")

    def main(args):
        calls.append(vars(args))
        if fail is not None:
            raise fail
        return 0

    mod.add_arguments, mod.main = add_arguments, main
    return mod


@pytest.mark.parametrize("command,module", [("engine", "runtime.engine"), ("eval", "runtime.evaluate")])
def test_delegated_subcommands_parse_with_their_module(command, module, monkeypatch, capsys):
    calls: list = []
    monkeypatch.setitem(sys.modules, module, _fake_module(calls))
    assert cli.main([command, "--onnx-dir", "x", "--precision", "int8"]) == 0
    assert calls == [{"onnx_dir": "x", "precision": "int8"}]
    monkeypatch.setitem(sys.modules, module, _fake_module(calls, RuntimeStageError("no GPU here\nsecond line")))
    assert cli.main([command, "--onnx-dir", "x"]) == 2
    assert capsys.readouterr().err == "error: no GPU here\n"


def test_missing_delegate_module_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setitem(cli.DELEGATED, "engine", ("runtime._no_such_module", "help"))
    assert cli.main(["engine", "--onnx-dir", "x"]) == 2
    assert capsys.readouterr().err.strip() == \
        "error: `engine` is not available in this installation (runtime._no_such_module is missing)"


def test_programming_errors_still_raise(monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "runtime.engine", _fake_module(calls, ZeroDivisionError("bug")))
    with pytest.raises(ZeroDivisionError):
        cli.main(["engine", "--onnx-dir", "x"])


def test_module_entry_point_exit_code_and_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "runtime", "bench", "--onnx-dir", str(tmp_path / "none"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: no such export directory: {tmp_path / 'none'}"]


def test_importing_the_runtime_core_loads_no_heavy_library():
    modules = ["runtime", "runtime.__main__", "runtime.backends", "runtime.backends.ort", "runtime.benchmark",
               "runtime.memory", "runtime.machine", "runtime.report"]
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in ('onnxruntime', 'onnx', 'tensorrt', 'torch', 'matplotlib') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
