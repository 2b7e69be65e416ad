"""Every adapter family (compress/adapters.py): its rewrite keeps the outputs, its stages run in order
are the forward, and a random-init model goes through compress -> export (parity) -> eval from the CLIs.
Also: user entry points, headless models, the model options, position-table resampling and their
one-line errors. Models are tiny (family_models.py), so the file runs in about a minute."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import compress  # noqa: F401  (registers the bundled models)
from calibration_data import bundled_path
from compress.errors import CompressError
from compress.models import (adapter_for, apply_preprocessing, compressible_layers, features_and_logits, has_head,
                             load_model_with_spec, prepare, resolve_preprocessing, run_stage, stages)

from . import family_models as fm

HERE = Path(__file__).resolve().parent
MOD = "tests.compress.family_models"
NO_CFG = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3}   # for models without a data config
ENTRY = {"torch-prenorm": ("torch_vit", {}), "torch-postnorm": ("torch_vit_postnorm", NO_CFG),
         "hf-vit-classifier": ("hf_vit_classifier", {}), "hf-vit-model": ("hf_vit_model", NO_CFG),
         "hf-dinov2": ("hf_dinov2", {})}
FAMILY = {"vit": "timm-vit", "deit3": "timm-vit", "deit-distilled": "timm-vit", "dinov2-reg": "timm-vit",
          "swin": "timm-swin", "swinv2": "timm-swin", "eva02": "timm-eva", "beit": "timm-beit",
          "torch-prenorm": "torch", "torch-postnorm": "torch", "hf-vit-classifier": "hf-vit",
          "hf-vit-model": "hf-vit", "hf-dinov2": "hf-vit"}
ALL = list(fm.TIMM) + list(ENTRY)


def build(key: str, seed: int = 0):
    """(raw model as its builder returns it, the same model loaded = prepared) for a family key."""
    torch.manual_seed(seed)
    if key in fm.TIMM:
        name, kw = fm.TIMM[key]
        raw = timm.create_model(name, pretrained=False, **kw).eval()
        with torch.no_grad():   # timm zero-inits biases; nonzero ones make the equality tests meaningful
            for n, p in raw.named_parameters():
                if n.endswith("bias") or n.endswith(("q_bias", "v_bias")):
                    p.add_(0.02 * torch.randn_like(p))
    else:
        fn, _ = ENTRY[key]
        raw = getattr(fm, fn)().eval()
    model = prepare(copy.deepcopy(raw)).eval()
    overrides = ENTRY.get(key, (None, {}))[1]   # what load_model does after the rewrite
    apply_preprocessing(model, resolve_preprocessing(model, adapter_for(model), overrides, key))
    return raw, model


def images(model, n=3):
    size = model.pretrained_cfg["input_size"]
    return torch.randn(n, *size, generator=torch.Generator().manual_seed(1))


def reference_output(key, raw, x):
    """What the family's own forward gives (a transformers model returns a ModelOutput)."""
    out = raw(x) if not key.startswith("hf") else raw(pixel_values=x)
    if key == "hf-vit-classifier":
        return out.logits
    if key.startswith("hf"):
        return out.pooler_output
    return out


# ------------------------------------------------------------------ adapters
@pytest.mark.parametrize("key", ALL)
def test_rewrite_keeps_the_outputs_and_stages_chain_to_the_forward(key):
    raw, model = build(key)
    assert adapter_for(model).family == FAMILY[key]
    x = images(model)
    with torch.no_grad():
        ref = reference_output(key, raw, x)
        got = model(x)
        assert got.shape == ref.shape
        assert (got - ref).abs().max() <= 1e-5          # the rewrite (or none) keeps the outputs
        layers = compressible_layers(model, include_head=True)
        plan = stages(model, layers)
        assert plan[0] == ("embed", []) and plan[-1][0] == "tail"
        assert sum(len(ls) for _, ls in plan) == len(layers)
        h = run_stage(model, "embed", x)
        for stage, _ in plan[1:-1]:
            h = run_stage(model, stage, h)              # every stage alone, as compensate/refine run it
        assert (run_stage(model, "tail", h) - got).abs().max() <= 1e-5
        feats, logits = features_and_logits(model, x)
    if has_head(model):
        assert (logits - got).abs().max() <= 1e-5
        head = model.get_submodule(adapter_for(model).head_names(model)[0])
        if key != "deit-distilled":                     # its two heads read (cls + dist) / 2 as features
            assert (head(feats) - got).abs().max() <= 1e-5
    else:
        assert logits is None and (feats - got).abs().max() <= 1e-5


def _called(model, names, x):
    seen = {n: 0 for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, i, n=n: seen.__setitem__(n, seen[n] + i[0].numel())) for n in names]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("key, reads_weight", [("beit", "blocks.0.attn.qkv"), ("swinv2", "layers.0.blocks.0.attn.qkv"),
                                               ("torch-prenorm", None)])
def test_every_compressible_linear_is_called_after_the_rewrite(key, reads_weight):
    raw, model = build(key)
    x = images(model, 2)
    names = list(compressible_layers(model, include_head=True))
    assert all(v > 0 for v in _called(model, names, x).values())
    if reads_weight:   # before the rewrite the family reads qkv.weight in F.linear: its hooks see nothing
        assert _called(raw, [reads_weight], x)[reads_weight] == 0
    else:              # torch: nn.MultiheadAttention reads out_proj.weight itself
        assert _called(raw, ["encoder.layers.0.self_attn.out_proj"], x)["encoder.layers.0.self_attn.out_proj"] == 0


def test_layer_tables_of_each_family():
    def names(key):
        return list(compressible_layers(build(key)[1], include_head=True))

    swin = names("swinv2")
    assert "layers.1.downsample.reduction" in swin and not any("cpb_mlp" in n for n in swin)
    assert [s for s, _ in stages(build("swinv2")[1], swin)][1:-1] == [
        "layers.0.blocks.0", "layers.1.downsample", "layers.1.blocks.0"]
    assert names("torch-postnorm")[:6] == [f"encoder.layers.0.{n}" for n in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "linear1", "linear2")]
    assert names("torch-postnorm")[-1] == "head"
    assert names("hf-vit-classifier")[-1] == "hf.classifier"
    assert "hf.encoder.layer.1.mlp.fc2" in names("hf-dinov2")
    assert names("deit-distilled")[-2:] == ["head", "head_dist"]
    assert not has_head(build("dinov2-reg")[1]) and not has_head(build("hf-vit-model")[1])


def test_a_third_party_class_named_vision_transformer_is_not_taken_for_timms():
    class VisionTransformer(nn.Module):   # same name as timm's, nothing else in common
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(CompressError, match="no known compressible"):
        compressible_layers(VisionTransformer())
    model = fm.TorchViT()
    model.__class__ = type("VisionTransformer", (fm.TorchViT,), {})
    assert adapter_for(model).family == "torch"


def test_unprepared_models_are_refused_and_hooks_that_see_nothing_name_the_layer():
    from compress import stats

    raw, model = build("beit")
    with pytest.raises(CompressError, match=r"blocks.0.attn.qkv is read by F.linear"):
        compressible_layers(raw)
    with pytest.raises(CompressError, match=r"^blocks.0.attn.qkv: its forward hooks saw no tokens"):
        stats.collect(raw, ["blocks.0.attn.qkv"], [images(model, 2)])
    with pytest.raises(CompressError, match="nn.TransformerEncoderLayer"):
        compressible_layers(build("torch-prenorm")[0])


# ------------------------------------------------------------------ compress -> export -> eval
FAST = ["deit3", "dinov2-reg", "swinv2", "eva02", "beit", "torch-postnorm", "hf-vit-classifier", "hf-dinov2"]
SLOW = ["vit", "deit-distilled", "swin", "torch-prenorm", "hf-vit-model"]


def _model_args(key, file_entry=False):
    if key in fm.TIMM:
        name, kw = fm.TIMM[key]
        return ["--model", name, "--random-init", "--model-kwargs", json.dumps(kw)]
    fn, cfg = ENTRY[key]
    target = f"{HERE / 'family_models.py'}:{fn}" if file_entry else f"{MOD}:{fn}"
    extra = []
    for k, v in cfg.items():
        extra += [f"--{k.replace('_', '-')}", *map(str, v)]
    return ["--model", target, *extra]


def _chain(key, tmp_path, capsys, file_entry=False, fp16=False):
    from compress.__main__ import main as compress_main
    from export.__main__ import main as export_main
    from runtime.__main__ import main as runtime_main

    calib, evals = bundled_path("cifar10-calib"), bundled_path("cifar10-eval")
    c, o = tmp_path / "c", tmp_path / "o"
    rc = compress_main([*_model_args(key, file_entry), "--calib", str(calib), "--num-calib", "16", "--heldout", "8",
                        "--batch-size", "8", "--ratio", "0.2", "--comp-rank", "4", "--comp-steps", "5",
                        "--comp-images", "8", "--no-stats-cache", "--out", str(c), "-q"])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((c / "manifest.json").read_text())
    rc = export_main(["--compressed", str(c), "--out", str(o), "--calib", str(calib), "--num-parity", "8",
                      *([] if fp16 else ["--no-fp16"])])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((o / "export_report.json").read_text())
    assert report["passed"] and all(f["parity"]["passed"] for f in report["files"].values())
    rc = runtime_main(["eval", "--compressed", str(c), "--onnx-dir", str(o), "--data", str(evals), "--num", "8",
                       "--batch-size", "8", "--out", str(tmp_path / "eval.json")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return m, report, json.loads((tmp_path / "eval.json").read_text()), out.out


def _check_chain(key, m, report, ev, printed):
    assert m["model"]["family"] == FAMILY[key] and sum(not l["dense"] for l in m["layers"].values()) > 0
    headless = key in ("dinov2-reg", "hf-vit-model", "hf-dinov2")
    assert m["model"]["outputs"] == ("features" if headless else "logits")
    variants = ev["variants"]
    assert "ort:model.int8.onnx" in variants and "compressed" in variants
    if headless:   # no argmax over features anywhere: feature cosine / relative error instead
        assert all(v["top1_agreement"] is None for v in m["agreement"].values())
        assert all(f["parity"]["outputs"] == "features" and f["parity"]["top1_agreement"] is None
                   for f in report["files"].values())
        assert variants["compressed"]["top1"] is None and variants["compressed"]["cosine"] > 0.9
        assert variants["compressed"]["rel_error"] is not None and "feature cosine" in printed
    else:
        assert variants["dense"]["top1"] is not None and variants["compressed"]["agreement"] is not None


@pytest.mark.parametrize("key", FAST)
def test_family_compresses_exports_with_parity_and_evaluates(key, tmp_path, capsys):
    _check_chain(key, *_chain(key, tmp_path, capsys, fp16=key == "eva02"))


@pytest.mark.slow
@pytest.mark.parametrize("key", SLOW)
def test_family_chain_more_variants(key, tmp_path, capsys):
    _check_chain(key, *_chain(key, tmp_path, capsys, file_entry=True))


def test_file_entry_point_is_recorded_absolute_and_rebuilt_from_anywhere(tmp_path, capsys, monkeypatch):
    from compress.artifact import load_compressed

    monkeypatch.chdir(HERE)   # a relative path to the file
    from compress.__main__ import main

    rc = main(["--model", "family_models.py:torch_vit", "--model-kwargs", '{"depth": 1}', "--calib",
               str(bundled_path("cifar10-calib")), "--num-calib", "8", "--batch-size", "8", "--ratio", "0.2",
               "--comp-rank", "0", "--no-quant", "--no-stats-cache", "--out", str(tmp_path / "c"), "-q"])
    assert rc == 0, capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    model, m = load_compressed(tmp_path / "c")
    assert m["model"]["name"] == f"{HERE / 'family_models.py'}:torch_vit" and m["model"]["kwargs"] == {"depth": 1}
    assert m["model"]["entry"]["kind"] == "file" and len(model.encoder.layers) == 1
    assert m["model"]["preprocessing"]["input_size"] == [3, 32, 32]   # declared by the model's pretrained_cfg


# ------------------------------------------------------------------ model options, checkpoints, preprocessing
def _dinov2(img_size, **kw):
    return timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=img_size, embed_dim=32,
                             depth=1, num_heads=2, **kw)


def test_224px_dinov2_checkpoint_compresses_from_the_cli_with_img_size(tmp_path, capsys):
    from safetensors.torch import save_file

    from compress.__main__ import main

    torch.manual_seed(0)
    ckpt = tmp_path / "dinov2_224.safetensors"
    save_file({k: v.contiguous() for k, v in _dinov2(224).state_dict().items()}, str(ckpt))
    kw = '{"embed_dim": 32, "depth": 1, "num_heads": 2}'
    rc = main(["--model", "vit_small_patch14_dinov2", "--img-size", "224", "--model-kwargs", kw, "--checkpoint",
               str(ckpt), "--num-calib", "4", "--batch-size", "4", "--ratio", "0.1", "--comp-rank", "0",
               "--no-stats-cache", "--out", str(tmp_path / "c"), "-q"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["model"]["kwargs"]["img_size"] == 224 and m["model"]["pos_resampled"] is None
    assert m["model"]["preprocessing"]["input_size"] == [3, 224, 224]   # from the model built, not the 518 cfg
    assert m["model"]["outputs"] == "features" and "final-feature cosine" in out.out


def test_position_table_of_another_grid_is_resampled_like_timm_and_recorded(tmp_path):
    from safetensors.torch import save_file
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    src = _dinov2(56)
    ckpt = tmp_path / "dinov2_56.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(ckpt))
    model, spec = load_model_with_spec("vit_small_patch14_dinov2", ckpt, img_size=28, embed_dim=32, depth=1,
                                       num_heads=2)
    want = resample_abs_pos_embed(src.pos_embed, (2, 2), (4, 4), num_prefix_tokens=1, interpolation="bicubic",
                                  antialias=True)
    assert torch.equal(model.pos_embed, want)
    assert spec.pos_resampled == {"method": "bicubic-antialias", "by": "timm checkpoint_filter_fn",
                                  "tables": {"pos_embed": [[1, 17, 32], [1, 5, 32]]}}
    near, _ = load_model_with_spec("vit_small_patch14_dinov2", ckpt, pos_interpolation="nearest", img_size=28,
                                   embed_dim=32, depth=1, num_heads=2)
    assert not torch.equal(near.pos_embed, model.pos_embed)


def test_hf_position_table_is_resampled_like_transformers(tmp_path):
    import torch.nn.functional as F
    from safetensors.torch import save_file

    torch.manual_seed(0)
    src = fm.hf_dinov2(image_size=28)
    ckpt = tmp_path / "hf.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(ckpt))
    model, spec = load_model_with_spec(f"{MOD}:hf_dinov2", ckpt, image_size=14, data_config={"input_size": (3, 14, 14)})
    grid = src.embeddings.position_embeddings[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(2, 2), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 4, -1)
    assert torch.allclose(model.hf.embeddings.position_embeddings[:, 1:], want)
    assert spec.pos_resampled["by"] == "transformers interpolate_pos_encoding" and spec.weights == "checkpoint"


def test_preprocessing_comes_from_the_model_built_with_overrides():
    model, spec = load_model_with_spec("vit_small_patch14_dinov2", img_size=112, embed_dim=32, depth=1, num_heads=2,
                                       data_config={"crop_pct": 0.9, "interpolation": "bilinear"})
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["input_size"] == (3, 112, 112) and cfg["crop_pct"] == 0.9 and cfg["interpolation"] == "bilinear"
    assert spec.preprocessing["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and spec.data_config["crop_pct"] == 0.9


@pytest.mark.parametrize("argv, message", [
    (["--model", f"{MOD}:torch_vit_postnorm"], r"has no data config \(input_size, mean, std unknown\): pass "
                                               r"--input-size C H W --mean R G B --std R G B"),
    (["--model", "vit_cifar_ref", "--input-size", "3", "64", "64"], r"--input-size 3 64 64 does not match"),
    (["--model", "vit_cifar_ref", "--img-size", "32", "--model-kwargs", '{"img_size": 64}'], "contradicts"),
    (["--model", "vit_cifar_ref", "--model-kwargs", '{"img_sise": 64}'], r"cannot build vit_cifar_ref with"),
    (["--model", "vit_cifar_ref", "--mean", "0.5"], r"--mean has 1 values for 3 input channels"),
    (["--model", "no_such_pkg.mod:build"], r"no module named 'no_such_pkg'"),
    (["--model", "missing/file.py:build"], r"is not a file"),
    (["--model", f"{MOD}:nothing"], r"has no function 'nothing'"),
    (["--model", f"{MOD}:torch_vit", "--model-kwargs", '{"dpth": 1}'], r"raised TypeError"),
    (["--model", f"{MOD}:TIMM"], r"has no function 'TIMM'"),
    (["--model", f"{MOD}:torch_vit", "--pretrained"], r"--pretrained is for timm names"),
    (["--model", "vit_cifar_ref", "--model-kwargs", "{oops"], r"argument --model-kwargs: not JSON"),
])
def test_model_option_errors_are_one_line(argv, message, tmp_path, capsys):
    from compress.__main__ import main

    try:
        rc = main([*argv, "--ratio", "0.5", "--num-calib", "4", "--no-stats-cache", "--out", str(tmp_path / "o")])
    except SystemExit as e:   # argparse's own errors (one line too: cliutil.OneLineParser)
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert __import__("re").search(message, err), err


@pytest.mark.parametrize("key", ["swinv2", "eva02", "torch-postnorm"])
def test_refinement_and_compensation_run_on_the_family_stages(key, tmp_path):
    """compensate_/refine_ run every stage alone (Swin's patch merging, Eva's bound rotary embedding,
    the torch tail run through the model's own forward)."""
    from compress.pipeline import Config, run

    name, kw = fm.TIMM[key] if key in fm.TIMM else (f"{MOD}:{ENTRY[key][0]}", {})
    res = run(Config(model=name, model_kwargs=kw, data_config=ENTRY.get(key, (None, {}))[1],
                     pretrained=False if key in fm.TIMM else None, out=str(tmp_path / "o"),
                     calib=str(bundled_path("cifar10-calib")), num_calib=8, heldout=8, batch_size=8, ratio=0.2,
                     comp_rank=4, comp_steps=3, seq_refit=True, recon_steps=2, stats_cache=None))
    m = res.manifest
    blocks = m["refine"]["blocks"]
    assert set(blocks) == {s for s, _ in stages(res.model, []) if s not in ("embed", "tail")}
    assert any(l["error_seq_after"] is not None for l in m["layers"].values())
