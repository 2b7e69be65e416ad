import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compress.__main__ import get_parser, main
from compress.zoo.reference import weights_path

ROOT = Path(__file__).resolve().parents[2]


def test_parser_defaults_and_budget_exclusivity():
    a = get_parser().parse_args(["--model", "m", "--ratio", "0.6", "--out", "o"])
    assert (a.method, a.allocation, a.granule, a.comp_rank, a.no_quant, a.pretrained) == \
        ("whiten", "mixed", 8, 0, False, None)
    # the measured best on the real ViT-S/14 (issue 10): sensitivity ranks, sequential refit, reconstruction
    assert (a.seq_refit, a.heldout, a.recon_steps, a.sensitivity_images) == (True, 64, 100, 32)
    for argv in (["--model", "m", "--out", "o"],                                   # no budget
                 ["--model", "m", "--ratio", "0.5", "--params", "10", "--out", "o"],  # two budgets
                 ["--model", "m", "--ratio", "0.5", "--out", "o", "--method", "svd"]):
        with pytest.raises(SystemExit) as e:
            get_parser().parse_args(argv)
        assert e.value.code == 2


def test_cli_end_to_end_on_deit_tiny_with_bundled_imagenet(tmp_path, capsys):
    out = tmp_path / "deit"
    code = main(["--model", "deit_tiny_patch16_224", "--num-calib", "8", "--batch-size", "8", "--ratio", "0.5",
                 "--comp-steps", "5", "--out", str(out), "--no-stats-cache", "-q"])
    assert code == 0, capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    assert m["calibration"]["images"] == 8 and "imagenet" in m["calibration"]["path"]
    assert m["params"]["removed_ratio"] >= 0.5 and m["params"]["after"] <= m["budget"]["target_params"]
    assert {k: m["model"][k] for k in ("name", "checkpoint", "pretrained", "kwargs", "weights", "family",
                                       "outputs", "pos_resampled")} == {
        "name": "deit_tiny_patch16_224", "checkpoint": None, "pretrained": False, "kwargs": {},
        "weights": "random-init", "family": "timm-vit", "outputs": "logits", "pos_resampled": None}
    assert m["model"]["preprocessing"]["input_size"] == [3, 224, 224]
    assert len(m["layers"]) == 48 and m["quant"]["act_ranges"]
    assert "parameters" in capsys.readouterr().out


def test_cli_on_reference_model_with_stats_cache(tmp_path, capsys):
    init = [] if weights_path("vit_cifar_ref").is_file() else ["--random-init"]
    common = ["--model", "vit_cifar_ref", *init, "--num-calib", "16", "--comp-steps", "5",
              "--stats-cache", str(tmp_path / "cache")]
    assert main([*common, "--ratio", "0.4", "--out", str(tmp_path / "a"), "-q"]) == 0
    assert main([*common, "--ratio", "0.6", "--no-quant", "--comp-rank", "0", "--out", str(tmp_path / "b"),
                 "-q"]) == 0
    a = json.loads((tmp_path / "a" / "manifest.json").read_text())
    b = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert "cifar10" in a["calibration"]["path"]
    assert not a["calibration"]["stats_from_cache"] and b["calibration"]["stats_from_cache"]
    assert a["calibration"]["stats_cache_key"] == b["calibration"]["stats_cache_key"]
    assert b["params"]["removed_ratio"] >= 0.6 and b["quant"]["act_ranges"] is None
    assert all(l["comp_rank"] == 0 for l in b["layers"].values())


def one_line_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_inputs_give_one_line_and_exit_2(tmp_path, capsys):
    out = ["--out", str(tmp_path / "o"), "--no-stats-cache", "-q"]
    err = one_line_error(capsys, ["--model", "deit_tiny_patch16_244", "--ratio", "0.5", *out])
    assert "unknown model" in err and "deit_tiny_patch16_224" in err
    err = one_line_error(capsys, ["--model", "resnet18", "--ratio", "0.5", *out])
    assert "no known compressible Linear layers" in err
    err = one_line_error(capsys, ["--model", "vit_cifar_ref", "--random-init", "--ratio", "1.5", *out])
    assert "(0, 1)" in err
    err = one_line_error(capsys, ["--model", "vit_cifar_ref", "--random-init", "--ratio", "0.99", *out])
    assert "smallest width" in err
    err = one_line_error(capsys, ["--model", "vit_cifar_ref", "--random-init", "--ratio", "0.5",
                                  "--calib", str(tmp_path / "missing"), *out])
    assert "does not exist" in err
    (tmp_path / "empty").mkdir()
    err = one_line_error(capsys, ["--model", "vit_cifar_ref", "--random-init", "--ratio", "0.5",
                                  "--calib", str(tmp_path / "empty"), *out])
    assert "no readable images" in err
    assert not (tmp_path / "o").exists()


def test_checkpoints_good_corrupt_mismatched_and_nonfinite(tmp_path, capsys):
    import timm

    import compress  # noqa: F401

    out = ["--out", str(tmp_path / "o"), "--no-stats-cache", "-q", "--ratio", "0.5", "--num-calib", "4"]
    ref = timm.create_model("vit_cifar_ref")
    good = tmp_path / "good.pth"
    torch.save({"state_dict": ref.state_dict()}, good)
    from compress.models import load_model

    loaded = load_model("vit_cifar_ref", checkpoint=good)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ref.state_dict().items())

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00garbage" * 10)
    err = one_line_error(capsys, ["--model", "vit_cifar_ref", "--checkpoint", str(corrupt), *out])
    assert "cannot read checkpoint" in err
    narrow = tmp_path / "narrow.pth"
    torch.save(timm.create_model("vit_cifar_narrow").state_dict(), narrow)
    err = one_line_error(capsys, ["--model", "vit_cifar_ref", "--checkpoint", str(narrow), *out])
    assert "does not match" in err and "shape" in err
    sd = ref.state_dict()
    sd["blocks.0.mlp.fc1.weight"][0, 0] = float("nan")
    nan = tmp_path / "nan.pth"
    torch.save(sd, nan)
    err = one_line_error(capsys, ["--model", "vit_cifar_ref", "--checkpoint", str(nan), *out])
    assert "NaN" in err


def test_real_process_exit_code_and_single_stderr_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "compress", "--model", "not_a_model", "--ratio", "0.5",
                        "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and p.stderr.startswith("error: unknown model")
