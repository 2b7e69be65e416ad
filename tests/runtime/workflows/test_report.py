"""`python -m runtime report`: one report.md joining compress, export, bench and eval outputs of a
run directory made by actually running the stages (tests/runtime/conftest.py: tiny_run_dir)."""
from __future__ import annotations

import json
import shutil

import pytest

import runtime.__main__ as cli
from runtime.workflows import layout
from runtime.workflows import report as summary
from runtime.errors import RuntimeStageError

PNG = b"\x89PNG\r\n\x1a\n"


def _json(path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def report(tiny_run_dir):
    """(report text, run dir) after the CLI wrote the report."""
    assert cli.main(["report", "--run-dir", str(tiny_run_dir)]) == 0
    return (tiny_run_dir / "report.md").read_text(), tiny_run_dir


def test_report_carries_the_stages_numbers(report):
    text, d = report
    m = _json(d / "compressed/manifest.json")
    ex = _json(d / "onnx/export_report.json")
    ev = _json(d / "eval.json")
    bench = _json(d / "bench/bench.json")
    p = m["params"]
    # parameters, whole model and compressible layers
    assert f"| whole model | {p['before']:,} | {p['after']:,} | {p['removed_ratio']:.2%} |" in text
    assert f"| compressible layers | {p['compressible_before']:,} | {p['compressible_after']:,} |" in text
    assert m["budget"]["description"] in text
    # rank grid: every block's qkv cell as rank (+comp when compensated)
    for i in range(2):
        layer = m["layers"][f"blocks.{i}.attn.qkv"]
        row = next(line for line in text.splitlines() if line.startswith(f"| {i} | "))
        want = "dense" if layer["dense"] else f"{layer['rank']}" + (f"+{layer['comp_rank']}" if layer["comp_rank"] else "")
        assert row.split(" | ")[1] == want
    assert "[compressed/ranks.png](compressed/ranks.png)" in text
    # accuracy rows straight from eval.json, with the file size of the matching ONNX file
    row = next(line for line in text.splitlines() if line.startswith("| ort:model.int8.onnx |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    s = ev["variants"]["ort:model.int8.onnx"]
    assert cells[2] == f"{p['after']:,}"
    assert cells[3] == f"{ex['files']['model.int8.onnx']['bytes'] / 1e6:.2f}"
    assert cells[4] == f"{100 * s['top1']:.2f}" and cells[6] == f"{100 * s['top5']:.2f}"
    assert cells[7] == f"{100 * s['agreement']:.2f}" and cells[9] == f"{s['kl']:.5f}"
    # parity and latency
    assert all(f"| {name} | {f['precision']} |" in text for name, f in ex["files"].items())
    lat = bench["variants"]["lowrank-int8"]["latency"]["4"]
    assert f"| 4 | lowrank-int8 | {lat['p50_ms']:.2f} | {lat['p90_ms']:.2f} | {lat['p99_ms']:.2f} |" in text
    from runtime.machine import describe_machine

    assert f"Machine: {describe_machine(bench['machine'])}." in text
    assert "[bench/bench.png](bench/bench.png)" in text
    assert "random init" in text  # the tiny model is random: the report must say accuracy means nothing
    assert "**missing**" not in text


def test_accuracy_plot_and_atomic_outputs(report):
    _, d = report
    png = (d / layout.PLOT).read_bytes()
    assert png.startswith(PNG) and len(png) > 10_000
    import matplotlib.image

    h, w, _ = matplotlib.image.imread(str(d / layout.PLOT)).shape
    assert w > 1.5 * h  # two panels: vs parameters and vs bytes
    assert not [p.name for p in d.iterdir() if p.name.endswith(".tmp")]
    assert oct((d / layout.REPORT).stat().st_mode & 0o777) == "0o644"


def test_int8_kernel_note_follows_the_export_measurement(report, tiny_run_dir):
    text, _ = report
    run = summary.load_run(tiny_run_dir)
    points = summary.eval_points(run)
    k = run.export["files"]["model.int8.onnx"]["ort_int8_kernels"]
    assert (summary.int8_kernel_note(run, points) is not None) == k["cpu_saturates"]
    assert ("int16 pair sums" in text) == k["cpu_saturates"]
    k["cpu_saturates"] = True                    # as on a CPU without VNNI
    note = summary.int8_kernel_note(run, points)
    assert note and f"rel. L2 {k['rel_l2']:.3f}" in note
    k["cpu_saturates"] = False                   # VNNI / ARM: nothing to explain
    assert summary.int8_kernel_note(run, points) is None


def test_eval_points_place_every_variant(tiny_run_dir):
    run = summary.load_run(tiny_run_dir)
    points = {pt.name: pt for pt in summary.eval_points(run)}
    m, ex = run.manifest, run.export
    assert points["dense"].variant == "dense-fp32" and points["dense"].params == m["params"]["before"]
    assert points["compressed"].params == m["params"]["after"] < m["params"]["before"]
    fq = points["compressed-int8-fakequant"]
    assert (fq.variant, fq.runs_on) == ("lowrank-int8", "pytorch fake-quant")
    for name, file in (("ort:dense.int8.onnx", "dense.int8.onnx"), ("ort:model.onnx", "model.onnx")):
        assert points[name].file_bytes == ex["files"][file]["bytes"] and points[name].runs_on == "ort"
    assert points["ort:model.int8.onnx"].file_bytes < points["ort:model.onnx"].file_bytes < points["dense"].file_bytes


def test_missing_stages_are_named_and_left_out(tiny_run_dir, tmp_path, capsys):
    d = tmp_path / "partial"
    shutil.copytree(tiny_run_dir / "compressed", d / "compressed")
    shutil.copytree(tiny_run_dir / "onnx", d / "onnx")
    assert cli.main(["report", "--run-dir", str(d)]) == 0
    out = capsys.readouterr().out
    assert "bench/bench.json" in out and "eval.json" in out
    text = (d / "report.md").read_text()
    assert "- **missing**: `bench/bench.json`" in text and "- **missing**: `eval.json`" in text
    assert "## Latency" not in text and "## Accuracy" not in text and "## ONNX files" in text
    assert not (d / layout.PLOT).exists()


def test_no_outputs_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(RuntimeStageError, match="none of"):
        summary.load_run(tmp_path)
    assert cli.main(["report", "--run-dir", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "does not exist" in err and err.count("\n") == 1


def test_corrupt_json_is_a_user_error(tiny_run_dir, tmp_path):
    d = tmp_path / "bad"
    shutil.copytree(tiny_run_dir / "compressed", d / "compressed")
    (d / "eval.json").write_text("{not json")
    with pytest.raises(RuntimeStageError, match="eval.json is unreadable"):
        summary.load_run(d)


@pytest.mark.parametrize("name, expected", [
    ("dense", ("dense-fp32", "pytorch")),
    ("compressed", ("lowrank-fp32", "pytorch")),
    ("compressed-int8-fakequant", ("lowrank-int8", "pytorch fake-quant")),
    ("trt:model.fp16.onnx", ("lowrank-fp16", "trt")),
    ("ort:dense.int8.onnx", ("dense-int8", "ort")),
    ("ort:other.onnx", (None, "?")),
])
def test_classify_eval_variant_names(name, expected):
    assert summary.classify(name) == expected
