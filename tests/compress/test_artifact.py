import json

import pytest
import torch

from compress.artifact import FILES, load_compressed, save_compressed
from compress.errors import CompressError


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One real (tiny) pipeline run: its result and output directory."""
    from compress.pipeline import Config, run

    from .conftest import TINY_VIT

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("artifact") / "compressed"
    cfg = Config(model="vit_cifar_ref", model_kwargs=dict(TINY_VIT), pretrained=False, out=str(out),
                 num_calib=16, batch_size=8, ratio=0.3, comp_rank=8, comp_steps=10)
    try:
        return run(cfg), out
    finally:
        torch.set_num_threads(threads)


def test_roundtrip_is_bit_identical(saved):
    result, out = saved
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    model, manifest = load_compressed(out)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), result.model(x))
    assert manifest["rank_map"] == result.plan.rank_map
    sd_a, sd_b = model.state_dict(), result.model.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_manifest_contents(saved):
    result, out = saved
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["name"] == "vit_cifar_ref" and m["model"]["kwargs"]
    p = m["params"]
    assert p["after"] <= m["budget"]["target_params"] and p["after"] == sum(
        t.numel() for t in result.model.parameters())
    assert p["removed_ratio"] >= 0.3
    assert m["calibration"]["images"] == 16 and len(m["calibration"]["hash"]) == 16
    for name, l in m["layers"].items():
        assert {"in", "out", "rank", "comp_rank", "dense", "error"} <= set(l)
        if not l["dense"]:
            assert l["error_seq_after"] <= l["error_seq_before"]
            assert name in m["quant"]["act_ranges"] and m["quant"]["act_ranges"][name]["mid"] > 0
    assert set(m["quant"]["dense_act_ranges"]) == set(m["quant"]["act_ranges"])
    assert m["config"]["ratio"] == 0.3 and m["versions"]["torch"]
    assert "# Compressed vit_cifar_ref" in (out / "report.md").read_text()
    assert (out / "ranks.png").read_bytes()[:4] == b"\x89PNG"


def test_resave_is_atomic_and_leaves_no_temporaries(saved, tmp_path, monkeypatch):
    result, out = saved
    target = tmp_path / "again"
    save_compressed(target, result.model, result.manifest)
    save_compressed(target, result.model, result.manifest)           # rerun over an existing artifact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]
    before = (target / "weights.safetensors").read_bytes()

    import compress.report

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(compress.report, "plot_ranks", boom)
    with pytest.raises(RuntimeError):
        save_compressed(target, result.model, result.manifest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # old artifact intact, no tmp left
    assert (target / "weights.safetensors").read_bytes() == before


def test_refuses_to_replace_a_foreign_directory(saved, tmp_path):
    result, _ = saved
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CompressError, match="not a compressed-model directory"):
        save_compressed(tmp_path, result.model, result.manifest)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_missing_or_corrupt_directories(saved, tmp_path):
    _, out = saved
    with pytest.raises(CompressError, match="does not exist"):
        load_compressed(tmp_path / "nope")
    with pytest.raises(CompressError, match="no manifest.json"):
        load_compressed(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in FILES:
        (bad / f).write_bytes((out / f).read_bytes())
    (bad / "weights.safetensors").write_bytes((out / "weights.safetensors").read_bytes()[:1000])
    with pytest.raises(CompressError, match="corrupt"):
        load_compressed(bad)
    (bad / "manifest.json").write_text("{ not json")
    with pytest.raises(CompressError, match="corrupt"):
        load_compressed(bad)
    m = json.loads((out / "manifest.json").read_text())
    first = next(n for n, l in m["layers"].items() if not l["dense"])
    m["layers"][first]["rank"] += 8
    (bad / "manifest.json").write_text(json.dumps(m))
    (bad / "weights.safetensors").write_bytes((out / "weights.safetensors").read_bytes())
    with pytest.raises(CompressError, match="does not match"):
        load_compressed(bad)


def test_a_calibration_set_name_is_not_resolved_as_a_folder(saved, tmp_path):
    """'cifar10:train' names a built-in set: read_manifest keeps it (a relative folder it resolves)."""
    import shutil

    from compress.artifact import read_manifest

    _, out = saved
    for path, want in (("cifar10:train", "cifar10:train"), ("calib", str((tmp_path / "c" / "calib").absolute()))):
        d = tmp_path / "c"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(out, d)
        m = json.loads((d / "manifest.json").read_text())
        m["calibration"]["path"] = path
        (d / "manifest.json").write_text(json.dumps(m))
        assert read_manifest(d)["calibration"]["path"] == want
