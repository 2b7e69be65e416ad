"""The method study on the bundled reference model: every variant scored at its budget, tables and
plot written, the default marked, the smaller dense baseline set beside the compressed model."""
from __future__ import annotations

import json

import pytest
import timm
from safetensors.torch import save_file

import compress.zoo  # noqa: F401  (registers vit_cifar_*)
from runtime.workflows import study
from runtime.errors import RuntimeStageError
from compress import config_defaults


@pytest.fixture(scope="module")
def study_result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    narrow = timm.create_model("vit_cifar_narrow", pretrained=False)
    save_file(narrow.state_dict(), str(tmp / "narrow.safetensors"))
    parser = __import__("argparse").ArgumentParser()
    study.add_arguments(parser)
    args = parser.parse_args(["--model", "vit_cifar_ref", "--data", "cifar10-eval", "--num", "300",
                              "--num-calib", "64", "--ratios", "0.6", "--variants", "plain,whiten,comp,seq",
                              "--int8", "whiten", "--stats-cache", str(tmp / "cache"),
                              "--baseline", f"vit_cifar_narrow={tmp / 'narrow.safetensors'}",
                              "--out", str(tmp / "out")])
    assert study.main(args) == 0
    return json.loads((tmp / "out" / "study.json").read_text()), tmp / "out"


def test_every_variant_is_scored_at_its_budget(study_result):
    result, out = study_result
    rows = result["rows"]
    dense = rows[0]
    assert dense["variant"] == "dense" and dense["top1"] > 0.3      # the bundled weights are trained
    configs = study._configs(rows)
    assert {(r["variant"], r["int8"]) for r in configs} == {("plain", False), ("whiten", False), ("comp", False),
                                                            ("seq", False), ("whiten", True)}
    for r in configs:
        assert r["params"] <= round(0.4 * dense["params"]) + 1          # budget met: 60% fewer
        assert 0.0 <= r["top1"] <= 1.0 and 0.0 <= r["agreement"] <= 1.0
        assert -1.0 <= r["feature_cosine_min"] <= r["feature_cosine"] <= 1.0 + 1e-9
        assert r["compress_seconds"] > 0
    by = {(r["variant"], r["int8"]): r for r in configs}
    # activation-aware whitening stays far closer to the dense model than plain SVD (measured:
    # KL ~20x lower at 60% fewer parameters)
    assert by["whiten", False]["kl"] < by["plain", False]["kl"] / 5
    assert by["whiten", False]["feature_cosine"] > by["plain", False]["feature_cosine"]
    assert by["seq", False]["refine_kept"] is not None        # the refinement says what each block kept
    md = (out / "study.md").read_text()
    assert "| whiten + INT8 |" in md and "60% fewer" in md and "Final-feature cosine" in md
    assert (out / "study.png").stat().st_size > 10_000


def test_the_default_row_is_compress_s_own_defaults():
    from compress.pipeline import Config

    steps = study.StudyConfig.finetune_steps
    name = study.default_variant(100, steps)
    defaults = {k: getattr(Config(model="m", out="o", ratio=0.5), k) for k in study._OFF}
    assert name == "sens+recon+block+distill-logits"
    assert study.variant_options(name, 100, steps).items() <= {**defaults, "recon_steps": defaults["recon_steps"]}.items()


def test_every_variant_sets_valid_compress_options():
    from compress.pipeline import Config

    for name in study.VARIANTS:       # a misspelt or out-of-range option fails here, not hours into a study
        opts = study.variant_options(name, 100, 300)
        cfg = Config(model="m", out="o", ratio=0.5, **opts)
        assert all(getattr(cfg, k) == v for k, v in opts.items())


def test_smaller_dense_baseline_is_reported_by_parameter_count(study_result):
    result, out = study_result
    base = [r for r in result["rows"] if r["variant"] == "baseline:vit_cifar_narrow"]
    assert len(base) == 1
    narrow = timm.create_model("vit_cifar_narrow")
    assert base[0]["params"] == sum(p.numel() for p in narrow.parameters())
    assert f"| vit_cifar_narrow | {base[0]['params']:,} |" in (out / "study.md").read_text()


def test_unknown_variant_is_refused():
    with pytest.raises(RuntimeStageError, match="unknown study variant 'nope'"):
        study.StudyConfig(model="vit_cifar_ref", out="x", variants=("nope",))


def test_headless_results_get_feature_tables_only(tmp_path):
    rows = [dict(ratio=0.0, variant="dense", int8=False, params=100),
            dict(ratio=0.5, variant="whiten", int8=False, params=50, removed=0.5, compress_seconds=3.0,
                 feature_cosine=0.91, feature_cosine_min=0.5)]
    result = {"model": "m", "data": "d", "num_images": 10, "num_calib": 8, "default_variant": "whiten",
              "recon_steps": 1, "finetune_steps": 1, "variants": {"whiten": "w"}, "rows": rows}
    md = study.format_markdown(result)
    assert "Top-1" not in md and "headless" in md and "| whiten (default) | w | 0.910 / 0.50 |" in md
    study.plot(result, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 5_000


def _result(variant: str, top1: float, **over) -> dict:
    rows = [dict(ratio=0.0, variant="dense", int8=False, params=100, top1=0.8),
            dict(ratio=0.5, variant=variant, int8=False, params=50, removed=0.5, compress_seconds=3.0,
                 top1=top1, agreement=0.9, feature_cosine=0.9, feature_cosine_min=0.5)]
    return {"model": "m", "checkpoint": None, "data": "d", "num_images": 10, "num_calib": 8,
            "default_variant": "seq", "recon_steps": 100, "finetune_steps": 300,
            "variants": {variant: study.VARIANTS[variant][0]}, "rows": rows, "complete": True, **over}


def test_merge_joins_comparable_studies_and_refuses_others(tmp_path):
    a, b = _result("seq", 0.70), _result("distill", 0.72, finetune_steps=100)
    merged = study.merge([a, b, _result("seq", 0.71)])   # the later seq row replaces the earlier
    assert [(r["variant"], r["top1"]) for r in merged["rows"]] == [("dense", 0.8), ("seq", 0.71), ("distill", 0.72)]
    assert merged["finetune_steps"] == 100 and set(merged["variants"]) == {"seq", "distill"}
    assert "| distill | " in study.format_markdown(merged) and "distillation: 100 steps" in study.format_markdown(merged)
    assert merged["complete"] and merged["default_variant"] == study.default_variant(100, 100, merged["recon_lr"])
    # a stopped piece: its unreached variant (and that variant's steps setting) is left out
    stopped = _result("seq", 0.7, finetune_steps=100, complete=False,
                      variants={"seq": "s", "distill": "d"})
    joined = study.merge([stopped, _result("distill", 0.6)])   # distill rows at 300 steps: no conflict
    assert set(joined["variants"]) == {"seq", "distill"} and joined["complete"] and joined["finetune_steps"] == 300
    holey = _result("whiten", 0.6)
    holey["rows"].append(dict(holey["rows"][1], ratio=0.6))
    assert not study.merge([a, holey])["complete"]   # seq has no row at 0.6
    with pytest.raises(RuntimeStageError, match="different num_calib"):
        study.merge([a, _result("whiten", 0.6, num_calib=16)])
    with pytest.raises(RuntimeStageError, match="different --finetune-steps"):
        study.merge([b, _result("distill", 0.6)])
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    (tmp_path / "bad.json").write_text("{}")
    parser = __import__("argparse").ArgumentParser()
    study.add_arguments(parser)
    out = tmp_path / "out"
    assert study.main(parser.parse_args(["--merge", str(tmp_path / "a.json"), "--merge", str(tmp_path / "b.json"),
                                         "--out", str(out)])) == 0
    assert len(json.loads((out / "study.json").read_text())["rows"]) == 3 and (out / "study.png").exists()
    with pytest.raises(RuntimeStageError, match="not a study.json"):
        study.main(parser.parse_args(["--merge", str(tmp_path / "bad.json"), "--out", str(out)]))


def test_merge_keeps_reconstruction_rows_of_one_lr_and_reads_older_studies_as_1e_3():
    """A study older than --recon-lr ran its recon rows at 1e-3; rows at another lr are refused, and
    the default is marked only when the reconstruction lr is compress's default."""
    old = _result("sens+recon", 0.74)                       # no recon_lr key: an older study
    new = _result("sens+recon", 0.75, recon_lr=3e-3)
    with pytest.raises(RuntimeStageError, match="different --recon-lr"):
        study.merge([old, new])
    assert study.merge([old, _result("seq", 0.7, recon_lr=3e-3)])["recon_lr"] == 1e-3   # seq has no recon
    merged = study.merge([new, _result("seq+recon", 0.7, recon_lr=3e-3)])
    default_lr = config_defaults()["recon_lr"]
    assert merged["recon_lr"] == 3e-3
    assert (merged["default_variant"] == "sens+recon") == (default_lr == 3e-3)
    assert study.default_variant(100, 300, default_lr * 10) is None
    assert f"at lr {3e-3:g}" in study.format_markdown(merged)
    opts = study.variant_options("sens+recon", 100, 300, 1e-2)
    assert opts["recon_lr"] == 1e-2 and "recon_lr" not in study.variant_options("seq", 100, 300, 1e-2)
