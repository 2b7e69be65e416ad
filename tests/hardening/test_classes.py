"""One test per class of issue 12's failures: filesystem faults, whole-directory export, evaluation
that refuses wrong inputs, manifest schema, decompression bombs, determinism, messages, the lock."""
from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hardening_lib import compress_tiny, error_lines, tree

ROOT = Path(__file__).resolve().parents[2]


def one_line(err: str, prefix: str = "error: ") -> str:
    lines = error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(prefix), lines[0]
    return lines[0]


# ------------------------------------------------------------------ 1. filesystem faults
def test_bad_out_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import compress.pipeline
    from compress.__main__ import main

    def no_work(cfg):
        raise AssertionError("the expensive work started")

    monkeypatch.setattr(compress.pipeline, "run", no_work)
    (tmp_path / "file").write_text("x")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    base = ["--model", "vit_cifar_ref", "--random-init", "--ratio", "0.5", "-q", "--out"]
    for out, message in (("", "--out is empty"), (tmp_path / "file", "exists and is not a directory"),
                         (tmp_path / "file" / "sub", "is a file, not a directory"),
                         (tmp_path / "foreign", "not a compressed-model directory"),
                         ("/proc/no/such/dir", "cannot")):
        before = tree(tmp_path)
        assert main([*base, str(out)]) == 2
        assert message in one_line(capsys.readouterr().err)
        assert tree(tmp_path) == before


def test_oserror_while_publishing_is_one_line_and_leaves_nothing(artifacts, tmp_path, capsys, monkeypatch):
    import export.pipeline
    from export.__main__ import main

    out = tmp_path / "onnx"
    real = export.pipeline.build_report

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export.pipeline, "build_report", disk_full)
    before = tree(tmp_path)
    assert main(["--compressed", str(artifacts["compressed"]), "--out", str(out), "--no-fp16", "--num-parity", "2"]) == 1
    line = one_line(capsys.readouterr().err, "export: ")
    assert "No space left on device" in line and str(out) in line
    assert tree(tmp_path) == before
    monkeypatch.setattr(export.pipeline, "build_report", real)


# ------------------------------------------------------------------ 2. whole-directory export
def test_export_publishes_the_whole_directory_at_once(artifacts, tmp_path, capsys, monkeypatch):
    import export.pipeline
    from export.__main__ import main

    out = tmp_path / "onnx"
    shutil.copytree(artifacts["onnx"], out)
    (out / "dense.fp16.onnx").write_bytes(b"stale file of an older export")
    (out / ".export-dead").mkdir()                     # left by a SIGKILLed run (old layout)
    (tmp_path / ".onnx.tmp-dead").mkdir()              # left by a SIGKILLed run (new layout)
    (tmp_path / ".onnx.tmp-dead" / "model.onnx").write_bytes(b"half")
    old = {k: v for k, v in tree(out).items() if not k.startswith(".export-")}
    args = ["--compressed", str(artifacts["compressed"]), "--out", str(out), "--no-fp16", "--num-parity", "2"]

    # a failure after some files were written: the old folder stays exactly as it was
    calls = []
    real_check = export.pipeline.check_file

    def fail_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.EIO, "Input/output error")
        return real_check(*a, **k)

    monkeypatch.setattr(export.pipeline, "check_file", fail_third)
    assert main(args) == 1
    one_line(capsys.readouterr().err, "export: ")
    assert tree(out) == old                              # stale staging of killed runs is removed too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]

    # Ctrl-C: one line, exit 130, nothing changed
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(export.pipeline, "check_file", interrupt)
    try:
        rc = main(args)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the export CLI as a traceback")
    assert rc == 130 and capsys.readouterr().err == "interrupted\n"
    assert tree(out) == old

    # a successful rerun replaces everything: no stale file of the older export, no staging left
    monkeypatch.setattr(export.pipeline, "check_file", real_check)
    assert main(args) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["dense.onnx", "dense.int8.onnx", "model.onnx", "model.int8.onnx", "export_report.json"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]


# ------------------------------------------------------------------ 3. evaluation refuses wrong inputs
def _eval(capsys, *argv):
    import runtime.__main__ as cli

    rc = cli.main(["eval", *map(str, argv)])
    return rc, capsys.readouterr().err


def test_eval_refuses_inputs_that_would_give_wrong_numbers(artifacts, tmp_path, capsys):
    from calibration_data import bundled_path

    c, x = artifacts["compressed"], artifacts["onnx"]
    cifar = bundled_path("cifar10-eval")
    wrong = tmp_path / "wrong"                               # right count, wrong names
    for i, cls in enumerate(["cat", "dog", "zebra", *[f"c{k}" for k in range(7)]]):
        shutil.copytree(cifar / ("cat" if i else "dog"), wrong / cls)
    flat = tmp_path / "flat"
    shutil.copytree(cifar / "cat", flat)
    other = compress_tiny(tmp_path / "other", seed=1)        # another compressed model
    tampered = tmp_path / "tampered"
    shutil.copytree(x, tampered)
    (tampered / "model.onnx").write_bytes((tampered / "model.onnx").read_bytes() + b"\0")
    for argv, message in (
            (["--compressed", c, "--data", wrong], "not classes of the model"),
            (["--compressed", c, "--data", flat], "unlabelled"),
            (["--compressed", other, "--onnx-dir", x], "exported from another model"),
            (["--compressed", c, "--onnx-dir", tampered], "not the file export wrote"),
            (["--compressed", c, "--onnx-dir", tmp_path / "missing"], "is not a directory"),
            (["--compressed", c, "--onnx-dir", flat], "holds none of"),
            (["--compressed", c, "--batch-size", 0], "--batch-size must be >= 1")):
        rc, err = _eval(capsys, *argv)
        assert rc == 2 and message in one_line(err), (argv, err)


def test_eval_scores_a_class_subset_in_the_models_label_order(artifacts, tmp_path, capsys):
    import timm

    from calibration_data import bundled_path, load_image_set
    from runtime.evaluate import match_classes

    model = timm.create_model("vit_cifar_ref", pretrained=False, depth=1)
    cifar = bundled_path("cifar10-eval")
    sub = tmp_path / "sub"
    for cls in ("cat", "ship"):
        shutil.copytree(cifar / cls, sub / cls)
    images = load_image_set(sub)
    assert set(images.labels) == {0, 1}
    matched = match_classes(images, model)
    assert set(matched.labels) == {3, 8} and matched.classes[3] == "cat"   # CIFAR-10's indices
    rc, err = _eval(capsys, "--compressed", artifacts["compressed"], "--onnx-dir", artifacts["onnx"], "--data", sub,
                    "--out", tmp_path / "eval.json")
    assert rc == 0, err
    doc = json.loads((tmp_path / "eval.json").read_text())
    assert doc["fingerprint"] and doc["variants"]["ort:model.int8.onnx"]["n"] == len(images)


# ------------------------------------------------------------------ 4. manifest schema
@pytest.mark.parametrize("edit, key", [
    (lambda m: m.update(layers=list(m["layers"])), "manifest.layers must be an object"),
    (lambda m: m["model"].update(name=7), "manifest.model.name must be a string"),
    (lambda m: m["model"].pop("name"), "manifest.model.name is missing"),
    (lambda m: next(iter(m["layers"].values())).update(rank="8"), ".rank must be an integer"),
    (lambda m: next(iter(m["layers"].values())).update({"in": -3}), ".in must be a number > 0"),
    (lambda m: next(iter(m["quant"]["act_ranges"].values())).update(input="wide"), ".input must be a number >= 0"),
    (lambda m: next(iter(m["quant"]["act_ranges"].values())).update(input=[0, 1]), ".input must be a number >= 0"),
    (lambda m: m.update(quant=[1, 2]), "manifest.quant must be"),
    (lambda m: m["config"].update(seed="zero"), "manifest.config.seed"),
    (lambda m: m.update(format_version="1"), "manifest.format_version"),
])
def test_malformed_manifest_names_the_key(artifacts, tmp_path, edit, key):
    from compress.artifact import load_compressed
    from compress.errors import CompressError

    d = tmp_path / "c"
    shutil.copytree(artifacts["compressed"], d)
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CompressError, match="is not a valid vit-edge.compressed manifest") as e:
        load_compressed(d)
    assert key in str(e.value) and "\n" not in str(e.value)


def test_manifest_of_a_list_and_relative_paths(artifacts, tmp_path, monkeypatch):
    from compress.artifact import read_manifest
    from compress.errors import CompressError

    d = tmp_path / "c"
    shutil.copytree(artifacts["compressed"], d)
    m = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text("[1, 2]")
    with pytest.raises(CompressError, match="top level must be an object"):
        read_manifest(d)
    m["model"]["checkpoint"] = "dense.safetensors"
    (d / "manifest.json").write_text(json.dumps(m))
    monkeypatch.chdir(tmp_path)   # not the run directory
    assert read_manifest(d)["model"]["checkpoint"] == str(d.absolute() / "dense.safetensors")


# ------------------------------------------------------------------ 5. decompression bombs
def test_decompression_bomb_is_skipped_and_counted(tmp_path, monkeypatch):
    from PIL import Image

    from calibration_data import load_image_set
    from calibration_data.errors import CalibrationDataError

    Image.new("RGB", (64, 64)).save(tmp_path / "bomb.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "fine.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)   # 64x64 = 4096 > 2 x 500: DecompressionBombError
    images = load_image_set(tmp_path)
    assert [p.name for p in images.paths] == ["fine.png"] and images.skipped == 1
    (tmp_path / "fine.png").unlink()
    with pytest.raises(CalibrationDataError, match=r"no readable images .*1 files skipped"):
        load_image_set(tmp_path)


# ------------------------------------------------------------------ 6. determinism
def test_weights_file_is_byte_identical_for_identical_inputs(tmp_path):
    import hashlib

    from safetensors import safe_open

    from compress.artifact import safetensors_bytes

    state = {"b": torch.arange(6.0), "a": torch.ones(2, 3)}
    metadata = {"format": "vit-edge.compressed", "format_version": "1", "zeta": "z", "alpha": "a"}
    digests = {hashlib.sha256(safetensors_bytes(state, metadata)).hexdigest() for _ in range(12)}
    assert len(digests) == 1   # safetensors' own save orders __metadata__ differently from call to call
    (tmp_path / "w.safetensors").write_bytes(safetensors_bytes(state, metadata))
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        assert f.metadata() == metadata and torch.equal(f.get_tensor("b"), state["b"])


def test_save_records_threads_and_repeats_bytes(artifacts, tmp_path):
    from compress.artifact import load_compressed, save_compressed

    model, manifest = load_compressed(artifacts["compressed"])
    assert manifest["torch_threads"] == 1          # what changes the weights' float rounding
    a = save_compressed(tmp_path / "a", model, manifest)
    b = save_compressed(tmp_path / "b", model, manifest)
    assert (a / "weights.safetensors").read_bytes() == (b / "weights.safetensors").read_bytes() == \
        (artifacts["compressed"] / "weights.safetensors").read_bytes()


# ------------------------------------------------------------------ 7. messages
@pytest.mark.parametrize("argv, prog", [
    (["bench", "--onnx-dir", "d"], "python -m runtime bench"),
    (["eval", "--batch-size", "x"], "python -m runtime eval"),
    (["fit", "--no-such-flag"], "python -m runtime fit"),
    (["sweep", "--ratios"], "python -m runtime sweep"),
    (["nosuch"], "python -m runtime"),
])
def test_argparse_errors_are_one_line(argv, prog, capsys):
    import runtime.__main__ as cli

    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert one_line(capsys.readouterr().err).endswith(f"(see {prog} --help)")


def test_export_argparse_error_is_one_line(capsys):
    from export.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["--compressed", "c", "--out", "o", "--opset", "x"])
    assert e.value.code == 2 and "invalid int value" in one_line(capsys.readouterr().err)


def test_checkpoint_errors_say_what_the_file_is(tmp_path):
    import pickle

    from compress.errors import CompressError
    from compress.models import load_model

    cases = {"empty.pth": (b"", "an empty file"), "notes.pth": (b"just text\n", "a text file"),
             "list.pth": (pickle.dumps([1, 2, 3]), "holds objects other than tensors")}
    for name, (data, what) in cases.items():
        (tmp_path / name).write_bytes(data)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")
    cases["module.pth"] = (None, "needs torch.nn.modules.linear.Linear")
    torch.save({"w": [1, 2]}, tmp_path / "lists.pth")
    cases["lists.pth"] = (None, "holds a dict of list")
    for name, (_, what) in cases.items():
        with pytest.raises(CompressError) as e:
            load_model("vit_cifar_ref", checkpoint=tmp_path / name)
        msg = str(e.value)
        assert what in msg and "expected a state dict" in msg, msg
        assert "weights_only=False" not in msg and "pop from empty list" not in msg and "\n" not in msg


# ------------------------------------------------------------------ the lock
def test_concurrent_runs_into_one_out_refuse_with_one_line(artifacts, tmp_path, capsys):
    from cliutil import reserve_output
    from export.__main__ import main

    out = tmp_path / "onnx"
    with reserve_output(out):                       # another run holds it
        assert (tmp_path / ".onnx.lock").is_file()
        assert main(["--compressed", str(artifacts["compressed"]), "--out", str(out)]) == 2
        assert "another run" in one_line(capsys.readouterr().err, "export: ")
        assert not out.exists()
    assert not (tmp_path / ".onnx.lock").exists()   # released and removed
    # and in a real second process (flock is per open file, so this is what make -j meets)
    code = ("import sys; from cliutil import reserve_output\n"
            "with reserve_output(sys.argv[1]):\n    print('held', flush=True); sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        import runtime.__main__ as cli
        assert cli.main(["bench", "--onnx-dir", str(artifacts["onnx"]), "--out", str(out)]) == 2
        assert "another run (pid" in one_line(capsys.readouterr().err)
    finally:
        holder.communicate("", timeout=30)
    assert holder.returncode == 0
