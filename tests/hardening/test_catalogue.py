"""A catalogue of bad inputs and faults across the three CLIs and make: each must end with its exit
code, one line on stderr, no traceback, and nothing left behind (the workspace is unchanged)."""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from hardening_lib import error_lines

ROOT = Path(__file__).resolve().parents[2]


def snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns) if n in filenames else None
    return out


def _edit_manifest(ws: Path, name: str, edit) -> None:
    d = ws / name
    shutil.copytree(ws / "c", d)
    m = json.loads((d / "manifest.json").read_text())
    m = edit(m) or m
    (d / "manifest.json").write_text(json.dumps(m))


def _first(d: dict) -> dict:
    return next(iter(d.values()))


@pytest.fixture(scope="module")
def ws(artifacts, tmp_path_factory) -> Path:
    """The workspace every case runs against: good artifacts, bad files, folders and manifests."""
    from PIL import Image

    from calibration_data import bundled_path
    from compress.artifact import load_compressed, save_compressed

    ws = tmp_path_factory.mktemp("catalogue")
    shutil.copytree(artifacts["compressed"], ws / "c")
    shutil.copytree(artifacts["onnx"], ws / "x")
    (ws / "file").write_text("a plain file\n")
    (ws / "foreign").mkdir()
    (ws / "foreign" / "thesis.tex").write_text("not an artifact")
    (ws / "emptydir").mkdir()
    cifar = bundled_path("cifar10-eval")
    shutil.copytree(cifar / "cat", ws / "flat")
    for i, cls in enumerate(["cat", "dog", "unicorn", *[f"k{j}" for j in range(7)]]):
        shutil.copytree(cifar / ("cat" if i else "dog"), ws / "wrong" / cls)
    for cls in ("cat", "dog", "bird"):                       # 3 of 10 classes; fine when named right
        shutil.copytree(cifar / cls, ws / "three" / "x" / cls)
    (ws / "bombs").mkdir()
    Image.new("RGB", (64, 64)).save(ws / "bombs" / "huge.png")  # a bomb once MAX_IMAGE_PIXELS is lowered
    (ws / "ck").mkdir()
    (ws / "ck" / "empty.pth").write_bytes(b"")
    (ws / "ck" / "notes.pth").write_text("these are my weights\n")
    (ws / "ck" / "list.pth").write_bytes(pickle.dumps([1, 2, 3]))
    torch.save(torch.nn.Linear(2, 2), ws / "ck" / "module.pth")
    (ws / "ck" / "trunc.safetensors").write_bytes((ws / "c" / "weights.safetensors").read_bytes()[:300])
    _edit_manifest(ws, "m_layers_list", lambda m: m.update(layers=list(m["layers"])))
    _edit_manifest(ws, "m_top_list", lambda m: [m])
    _edit_manifest(ws, "m_name_int", lambda m: m["model"].update(name=42))
    _edit_manifest(ws, "m_range_str", lambda m: _first(m["quant"]["act_ranges"]).update(input="big"))
    _edit_manifest(ws, "m_rank_zero", lambda m: _first({k: v for k, v in m["layers"].items()
                                                         if not v["dense"]}).update(rank=0))
    _edit_manifest(ws, "m_in_str", lambda m: _first(m["layers"]).update({"in": "64"}))
    _edit_manifest(ws, "m_version_str", lambda m: m.update(format_version="1"))
    _edit_manifest(ws, "m_no_model", lambda m: m.pop("model") and None)
    _edit_manifest(ws, "m_kwargs_list", lambda m: m["model"].update(kwargs=[1]))
    model, manifest = load_compressed(ws / "c")
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_compressed(ws / "other", model, manifest)          # another model: another fingerprint
    shutil.copytree(ws / "x", ws / "tampered")
    (ws / "tampered" / "model.int8.onnx").write_bytes(b"\0" + (ws / "x" / "model.int8.onnx").read_bytes()[1:])
    shutil.copytree(ws / "x", ws / "no_report")
    (ws / "no_report" / "export_report.json").unlink()
    (ws / "mk").mkdir()
    shutil.copytree(ws / "c", ws / "mk" / "compressed")
    (ws / "mk" / "onnx").write_text("a file where make's export folder goes\n")
    return ws


C = ["--model", "vit_cifar_ref", "--random-init", "--ratio", "0.5", "--num-calib", "4", "-q", "--no-stats-cache"]
CT = ["--model", "vit_cifar_ref", "--ratio", "0.5", "--num-calib", "4", "-q", "--no-stats-cache"]
EV = ["eval", "--compressed", "{ws}/c", "--num", "8"]
# (id, cli, argv with {ws}, exit code, a phrase the one line must contain)
CASES = [
    # 1. the output location, before any work (compress / export / runtime)
    ("c-out-empty", "compress", [*C, "--out", ""], 2, "--out is empty"),
    ("c-out-file", "compress", [*C, "--out", "{ws}/file"], 2, "exists and is not a directory"),
    ("c-out-under-file", "compress", [*C, "--out", "{ws}/file/sub"], 2, "is a file, not a directory"),
    ("c-out-foreign-dir", "compress", [*C, "--out", "{ws}/foreign"], 2, "not a compressed-model directory"),
    ("c-out-unwritable", "compress", [*C, "--out", "/proc/vit-edge/out"], 2, "cannot"),
    ("c-out-dot", "compress", [*C, "--out", "{ws}/.."], 2, "names no directory"),
    ("x-out-empty", "export", ["--compressed", "{ws}/c", "--out", ""], 2, "--out is empty"),
    ("x-out-file", "export", ["--compressed", "{ws}/c", "--out", "{ws}/file"], 2, "exists and is not a directory"),
    ("x-out-foreign", "export", ["--compressed", "{ws}/c", "--out", "{ws}/foreign"], 2, "not an export directory"),
    ("x-out-compressed", "export", ["--compressed", "{ws}/c", "--out", "{ws}/c"], 2, "not an export directory"),
    ("x-out-under-file", "export", ["--compressed", "{ws}/c", "--out", "{ws}/file/x"], 2, "is a file"),
    ("r-bench-out-empty", "runtime", ["bench", "--onnx-dir", "{ws}/x", "--out", ""], 2, "--out is empty"),
    ("r-bench-out-file", "runtime", ["bench", "--onnx-dir", "{ws}/x", "--out", "{ws}/file"], 2, "not a directory"),
    ("r-eval-out-dir", "runtime", [*EV, "--out", "{ws}/emptydir"], 2, "is a directory"),
    ("r-eval-out-under-file", "runtime", [*EV, "--out", "{ws}/file/eval.json"], 2, "is a file"),
    ("r-profile-out-file", "runtime", ["profile", "--onnx-dir", "{ws}/x", "--out", "{ws}/file"], 2, "not a directory"),
    ("r-study-out-under-file", "runtime", ["study", "--model", "vit_cifar_ref", "--out", "{ws}/file/s"], 2,
     "is a file"),
    ("r-sweep-out-unwritable", "runtime", ["sweep", "--model", "vit_cifar_ref", "--out", "/proc/vit-edge/s"], 2,
     "cannot"),
    # the lock: a second run into a held --out
    ("c-locked", "compress", [*C, "--out", "{ws}/held"], 2, "another run"),
    ("x-locked", "export", ["--compressed", "{ws}/c", "--out", "{ws}/held"], 2, "another run"),
    ("r-bench-locked", "runtime", ["bench", "--onnx-dir", "{ws}/x", "--out", "{ws}/held"], 2, "another run"),
    # 7. argparse: compress's one-line form everywhere
    ("c-ratio-text", "compress", ["--model", "m", "--ratio", "abc", "--out", "{ws}/o"], 2, "invalid float value"),
    ("c-no-out", "compress", ["--model", "m", "--ratio", "0.5"], 2, "required: --out"),
    ("x-no-compressed", "export", ["--out", "{ws}/o"], 2, "required: --compressed"),
    ("x-opset-text", "export", ["--compressed", "{ws}/c", "--out", "{ws}/o", "--opset", "x"], 2, "invalid int"),
    ("r-no-command", "runtime", [], 2, "required: command"),
    ("r-unknown-command", "runtime", ["nosuch"], 2, "invalid choice"),
    ("r-bench-no-onnx-dir", "runtime", ["bench", "--out", "{ws}/o"], 2, "required: --onnx-dir"),
    ("r-bench-batch-zero", "runtime", ["bench", "--onnx-dir", "{ws}/x", "--batch-sizes", "0", "--out", "{ws}/o"], 2,
     "positive integers"),
    ("r-eval-batch-text", "runtime", ["eval", "--batch-size", "x"], 2, "invalid int value"),
    ("r-fit-unknown-flag", "runtime", ["fit", "--frobnicate"], 2, "python -m runtime fit --help"),
    ("r-info-extra", "runtime", ["info", "extra"], 2, "unrecognized arguments"),
    # 7. checkpoints: what the file is and what was expected
    ("c-ckpt-empty", "compress", [*CT, "--checkpoint", "{ws}/ck/empty.pth", "--out", "{ws}/o"], 2, "an empty file"),
    ("c-ckpt-text", "compress", [*CT, "--checkpoint", "{ws}/ck/notes.pth", "--out", "{ws}/o"], 2, "a text file"),
    ("c-ckpt-list", "compress", [*CT, "--checkpoint", "{ws}/ck/list.pth", "--out", "{ws}/o"], 2,
     "holds objects other than tensors"),
    ("c-ckpt-module", "compress", [*CT, "--checkpoint", "{ws}/ck/module.pth", "--out", "{ws}/o"], 2,
     "needs torch.nn.modules.linear.Linear"),
    ("c-ckpt-truncated", "compress", [*CT, "--checkpoint", "{ws}/ck/trunc.safetensors", "--out", "{ws}/o"], 2,
     "expected a state dict"),
    ("c-ckpt-missing", "compress", [*CT, "--checkpoint", "{ws}/ck/none.pth", "--out", "{ws}/o"], 2, "does not exist"),
    # 5. calibration images: a decompression bomb is one more unreadable file
    ("c-calib-bomb", "compress", [*C, "--calib", "{ws}/bombs", "--out", "{ws}/o"], 2, "1 files skipped"),
    ("c-calib-file", "compress", [*C, "--calib", "{ws}/file", "--out", "{ws}/o"], 2, "is not a folder"),
    # 4. manifests: one line naming the key
    ("x-manifest-layers-list", "export", ["--compressed", "{ws}/m_layers_list", "--out", "{ws}/o"], 2,
     "manifest.layers must be an object"),
    ("x-manifest-top-list", "export", ["--compressed", "{ws}/m_top_list", "--out", "{ws}/o"], 2,
     "top level must be an object"),
    ("x-manifest-name-int", "export", ["--compressed", "{ws}/m_name_int", "--out", "{ws}/o"], 2,
     "manifest.model.name must be a string"),
    ("x-manifest-range-text", "export", ["--compressed", "{ws}/m_range_str", "--out", "{ws}/o"], 2,
     ".input must be a number >= 0"),
    ("x-manifest-rank-zero", "export", ["--compressed", "{ws}/m_rank_zero", "--out", "{ws}/o"], 2,
     "outside [1, min(in, out)]"),
    ("x-manifest-in-text", "export", ["--compressed", "{ws}/m_in_str", "--out", "{ws}/o"], 2, ".in must be a number"),
    ("x-manifest-version-text", "export", ["--compressed", "{ws}/m_version_str", "--out", "{ws}/o"], 2,
     "manifest.format_version"),
    ("x-manifest-no-model", "export", ["--compressed", "{ws}/m_no_model", "--out", "{ws}/o"], 2,
     "manifest.model is missing"),
    ("r-manifest-kwargs-list", "runtime", ["eval", "--compressed", "{ws}/m_kwargs_list"], 2,
     "manifest.model.kwargs must be an object"),
    ("x-compressed-missing", "export", ["--compressed", "{ws}/nope", "--out", "{ws}/o"], 2, "does not exist"),
    # 3. evaluation that refuses wrong inputs
    ("r-eval-wrong-classes", "runtime", [*EV, "--data", "{ws}/wrong"], 2, "are not classes of the model"),
    ("r-eval-unlabelled", "runtime", [*EV, "--data", "{ws}/flat"], 2, "unlabelled"),
    ("r-eval-other-model", "runtime", ["eval", "--compressed", "{ws}/other", "--onnx-dir", "{ws}/x"], 2,
     "exported from another model"),
    ("r-eval-tampered-onnx", "runtime", [*EV, "--onnx-dir", "{ws}/tampered"], 2, "not the file export wrote"),
    ("r-eval-no-report", "runtime", [*EV, "--onnx-dir", "{ws}/no_report"], 2, "no export_report.json"),
    ("r-eval-onnx-dir-missing", "runtime", [*EV, "--onnx-dir", "{ws}/none"], 2, "is not a directory"),
    ("r-eval-onnx-dir-empty", "runtime", [*EV, "--onnx-dir", "{ws}/emptydir"], 2, "holds none of"),
    ("r-eval-onnx-missing", "runtime", [*EV, "--onnx", "{ws}/none.onnx"], 2, "is not a file"),
    ("r-eval-batch-zero", "runtime", [*EV, "--batch-size", "0"], 2, "--batch-size must be >= 1"),
    ("r-eval-num-zero", "runtime", ["eval", "--compressed", "{ws}/c", "--num", "0"], 2, "--num must be >= 1"),
    ("r-eval-nothing", "runtime", ["eval"], 2, "nothing to evaluate"),
    ("r-eval-data-subfolder-classes", "runtime", [*EV, "--data", "{ws}/three"], 2, "not classes of the model"),
]


def _main(cli: str):
    if cli == "compress":
        from compress.__main__ import main
    elif cli == "export":
        from export.__main__ import main
    else:
        from runtime.__main__ import main
    return main


@pytest.mark.parametrize("cli, argv, code, phrase", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(ws, cli, argv, code, phrase, capsys, monkeypatch):
    from PIL import Image

    from cliutil import reserve_output

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1024)  # 64x64 > 2 x 1024: the bomb guard trips (CIFAR's 32x32 not)
    held_out = "{ws}/held" in argv                      # the lock cases: another run holds --out
    argv = [a.format(ws=ws) for a in argv]
    before = snapshot(ws)
    with reserve_output(ws / "held") if held_out else contextlib.nullcontext():
        held = snapshot(ws)
        try:
            rc = _main(cli)(argv)
        except SystemExit as e:      # argparse exits
            rc = e.code
        after = snapshot(ws)
    assert rc == code
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert "Traceback" not in err and len(lines) == 1, err
    assert phrase in lines[0], lines[0]
    assert after == held and snapshot(ws) == before      # nothing left behind, nothing changed


@pytest.mark.parametrize("target, variables, phrase", [
    ("compress", ["RATIO=abc"], "invalid float value: 'abc'"),
    ("export", ["-o", "compress"], "exists and is not a directory"),  # compress taken as done
])
def test_bad_input_through_make(ws, target, variables, phrase):
    """make reports the stage's one line (plus make's own 'Error 2' line) and no traceback."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    before = snapshot(ws)
    out = ws / "mk"
    res = subprocess.run(["make", "-s", target, f"OUT={out}", "SETUP=", f"PYTHON={ROOT / '.venv/bin/python'}",
                          "THREADS=1", *[v.format(ws=ws) for v in variables]],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    stage = [ln for ln in error_lines(res.stderr) if not ln.startswith("make")]
    assert "Traceback" not in res.stderr and len(stage) == 1 and phrase in stage[0], res.stderr
    after = {k: v for k, v in snapshot(ws).items() if not k.startswith("mk/.make")}  # make's own stamps
    assert after == {k: v for k, v in before.items() if not k.startswith("mk/.make")}
