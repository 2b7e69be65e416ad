"""Recovery fine-tuning (compress/finetune.py): distillation into the low-rank factors only."""
import copy
import json
import logging

import pytest
import torch

from compress.artifact import load_compressed
from compress.errors import CompressError
from compress.finetune import distill_, factor_parameters, kl_to_dense
from compress.lowrank import lowrank_layers

from .conftest import TINY_VIT


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(dense, compressed FP32 without INT8 balancing, calibration batches) of the tiny ViT."""
    from calibration_data import default_calibration_for, load_image_set, make_loader

    from compress.models import load_model
    from compress.pipeline import Config, run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = run(Config(model="vit_cifar_ref", model_kwargs=dict(TINY_VIT), pretrained=False,
                         out=str(tmp_path_factory.mktemp("ft") / "c"), num_calib=16, batch_size=8, ratio=0.5,
                         comp_rank=8, comp_steps=5, quant=False, recon_steps=0, sensitivity_images=0))
        torch.manual_seed(0)  # the pipeline's dense model: same seed, same random init
        dense = load_model("vit_cifar_ref", pretrained=False, **TINY_VIT)
        images = load_image_set(default_calibration_for("vit_cifar_ref"), num=16, seed=0)
        batches = list(make_loader(images, dense, batch_size=8))
    finally:
        torch.set_num_threads(threads)
    assert lowrank_layers(res.model) and any(m.comp_rank for m in lowrank_layers(res.model).values())
    return dense, res.model, batches


def _logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(x) for x, _ in batches])


def test_distillation_strictly_lowers_kl_and_touches_only_the_factors(models):
    dense, compressed, batches = models
    dense_sd = {k: v.clone() for k, v in dense.state_dict().items()}
    model = copy.deepcopy(compressed)
    before_sd = {k: v.clone() for k, v in model.state_dict().items()}
    kl0 = float(kl_to_dense(_logits(model, batches), _logits(dense, batches)))
    info = distill_(dense, model, batches, steps=30, lr=1e-4, temperature=1.0, seed=0, device="cpu",
                   target="logits")
    kl1 = float(kl_to_dense(_logits(model, batches), _logits(dense, batches)))
    assert kl1 < kl0 and info["kl_after"] < info["kl_before"]
    assert info["kl_before"] == pytest.approx(kl0, rel=1e-5) and info["kl_after"] == pytest.approx(kl1, rel=1e-5)
    assert (info["steps"], info["images"], info["batch_size"]) == (30, 16, 8) and info["seconds"] > 0
    trained = set(factor_parameters(model))
    # compensation lives inside first/second (lowrank.py), so every low-rank module has exactly two
    assert trained == {f"{n}.{p}.weight" for n in lowrank_layers(model) for p in ("first", "second")}
    after_sd = model.state_dict()
    for k, v in before_sd.items():
        if k in trained:
            assert not torch.equal(after_sd[k], v), k
        else:
            assert torch.equal(after_sd[k], v), k       # biases, norms, embeddings, dense layers, head
    assert all(torch.equal(dense.state_dict()[k], v) for k, v in dense_sd.items())
    assert all(p.grad is None for p in model.parameters())


def test_same_seed_is_bit_identical_other_seed_is_not(models):
    dense, compressed, batches = models
    runs = []
    for seed in (0, 0, 1):
        m = copy.deepcopy(compressed)
        info = distill_(dense, m, batches, steps=8, lr=1e-3, temperature=2.0, seed=seed, device="cpu",
                        mse_weight=0.1, target="logits")
        runs.append((m.state_dict(), info))
    (a, ia), (b, ib), (c, _) = runs
    assert all(torch.equal(a[k], b[k]) for k in a) and ia["loss_last"] == ib["loss_last"]
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_non_finite_loss_aborts_and_restores_the_factors(models):
    dense, compressed, batches = models
    m = copy.deepcopy(compressed)
    lin = next(iter(lowrank_layers(m).values()))
    with torch.no_grad():
        lin.first.weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(CompressError, match="diverged"):
        distill_(dense, m, batches, steps=3, lr=1e-3, temperature=1.0, seed=0, device="cpu")
    after = m.state_dict()
    assert all(torch.allclose(after[k], v, rtol=0, atol=0, equal_nan=True) for k, v in before.items())


def test_pipeline_finetune_manifest_report_and_bit_identical_reload(tiny_config):
    from compress.pipeline import run

    res = run(tiny_config(ratio=0.5, finetune_steps=8, finetune_lr=1e-4))
    m = json.loads((res.out / "manifest.json").read_text())
    ft = m["finetune"]
    assert ft["steps"] == 8 and ft["lr"] == 1e-4 and ft["images"] == 16 and ft["seconds"] > 0
    assert m["config"]["finetune_target"] == "auto" and ft["target"] == "logits"   # auto: a classifier's logits
    assert ft["kl_after"] < ft["kl_before"] and {"loss_first", "loss_last"} <= set(ft)
    assert m["timings"]["finetune"] > 0 and m["config"]["finetune_steps"] == 8
    assert "fine-tuned" in (res.out / "report.md").read_text()
    model, _ = load_compressed(res.out)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), res.model(x))
    sd_a, sd_b = model.state_dict(), res.model.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_finetune_off_never_runs_and_on_only_moves_the_factors(tiny_config, tmp_path, monkeypatch):
    import compress.finetune
    from compress.pipeline import run

    on = run(tiny_config(quant=False, ratio=0.5, finetune_steps=4, finetune_lr=1e-4, out=str(tmp_path / "on")))

    def boom(*a, **k):
        raise AssertionError("distill_ must not run when finetune_steps is 0")

    monkeypatch.setattr(compress.finetune, "distill_", boom)
    off = run(tiny_config(quant=False, ratio=0.5, finetune_steps=0, out=str(tmp_path / "off")))
    m = json.loads((off.out / "manifest.json").read_text())
    assert m["finetune"] is None and "finetune" not in m["timings"]
    assert "fine-tuned" not in (off.out / "report.md").read_text()
    # the same run with fine-tuning differs from it in the factor weights only
    trained = set(factor_parameters(on.model))
    sd_on, sd_off = on.model.state_dict(), off.model.state_dict()
    assert sd_on.keys() == sd_off.keys()
    assert all(torch.equal(sd_on[k], v) != (k in trained) for k, v in sd_off.items())


def test_config_and_cli_validate_finetune_options():
    from compress.__main__ import config_from_args, get_parser
    from compress.pipeline import Config

    a = get_parser().parse_args(["--model", "m", "--ratio", "0.6", "--out", "o"])
    assert (a.finetune_steps, a.finetune_lr, a.finetune_target) == (120, 1e-5, "auto")
    a = get_parser().parse_args(["--model", "m", "--ratio", "0.6", "--out", "o", "--finetune-steps", "200",
                                 "--finetune-lr", "3e-4"])
    cfg = config_from_args(a)
    assert (cfg.finetune_steps, cfg.finetune_lr) == (200, 3e-4)
    assert Config(model="m", out="o", ratio=0.5).finetune_steps == 120   # on by default (README, issue 10)
    with pytest.raises(CompressError, match="finetune-steps"):
        Config(model="m", out="o", ratio=0.5, finetune_steps=-1)
    with pytest.raises(CompressError, match="finetune-lr"):
        Config(model="m", out="o", ratio=0.5, finetune_lr=0)


def _feature_loss(model, dense, batches):
    from compress.finetune import _outputs, feature_loss

    with torch.no_grad():
        return float(torch.stack([feature_loss(_outputs(model, x, "features"), _outputs(dense, x, "features"))
                                  for x, _ in batches]).mean())


def test_feature_target_lowers_the_heldout_feature_loss_and_keeps_the_best_iterate(models):
    dense, compressed, batches = models
    fit, held = batches[:1], batches[1:]
    m = copy.deepcopy(compressed)
    loss0 = _feature_loss(m, dense, held)
    info = distill_(dense, m, fit, steps=12, lr=3e-4, seed=0, device="cpu", target="features", heldout=held,
                    eval_every=3)
    assert info["target"] == "features" and info["kept"] and info["heldout_images"] == 8
    assert info["heldout_loss_before"] == pytest.approx(loss0, rel=1e-4)
    assert info["heldout_loss_best"] < info["heldout_loss_before"]
    assert [s for s, _ in info["heldout_checks"]] == [3, 6, 9, 12]
    best_step, best = min(info["heldout_checks"], key=lambda c: c[1])
    assert info["best_step"] == best_step and info["heldout_loss_best"] == best
    # the model holds the best iterate: its held-out loss is the reported one
    assert _feature_loss(m, dense, held) == pytest.approx(best, rel=1e-4)
    assert info["heldout_cosine_after"]["mean"] > info["heldout_cosine_before"]["mean"]


def test_fine_tuning_that_never_pays_on_heldout_images_leaves_the_factors_untouched(models):
    dense, compressed, batches = models
    m = copy.deepcopy(compressed)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    # a learning rate far too large: every held-out check is worse than the start
    info = distill_(dense, m, batches[:1], steps=4, lr=0.3, seed=0, device="cpu", target="features",
                    heldout=batches[1:], eval_every=1)
    assert not info["kept"] and info["best_step"] == 0
    assert all(v > info["heldout_loss_before"] for _, v in info["heldout_checks"])
    assert all(torch.equal(m.state_dict()[k], v) for k, v in before.items())


def test_feature_target_fine_tunes_a_headless_model_and_logits_target_refuses_it(tiny_config, tmp_path):
    from compress.pipeline import run

    kw = dict(quant=False, ratio=0.5, finetune_steps=3, finetune_lr=1e-4, heldout=8,
              model_kwargs=dict(TINY_VIT, num_classes=0))
    res = run(tiny_config(out=str(tmp_path / "f"), **kw))
    ft = res.manifest["finetune"]
    assert ft["target"] == "features" and "kl_before" not in ft and ft["heldout_images"] == 8   # auto, headless
    assert "held-out features loss" in (res.out / "report.md").read_text()
    with pytest.raises(CompressError, match="headless.*--finetune-target features"):
        run(tiny_config(out=str(tmp_path / "l"), finetune_target="logits", **kw))
    with pytest.raises(CompressError, match="finetune-target"):
        tiny_config(finetune_target="tokens")


def test_distillation_images_top_up_the_calibration_ones_and_never_include_the_heldout(tiny_config, tmp_path,
                                                                                       caplog):
    from PIL import Image

    from calibration_data import load_image_set, make_loader
    from compress.pipeline import _distillation_images, _heldout_images, _tensors, prepare

    cfg = tiny_config(num_calib=16, heldout=8, finetune_steps=3, finetune_images=40)
    prep = prepare(cfg)
    own = _tensors(prep.loader)
    assert torch.equal(torch.cat(_distillation_images(tiny_config(finetune_steps=3), prep, prep.loader)),
                       torch.cat(own))   # 0: the calibration images only
    got = torch.cat(_distillation_images(cfg, prep, prep.loader))
    held = torch.cat(_heldout_images(cfg, prep))
    everything = load_image_set(prep.calib, num=16 + 8 + 24, seed=cfg.seed)
    want = torch.cat(_tensors(make_loader(everything, prep.model, batch_size=64)))
    assert len(got) == 40 and torch.equal(got[:16], torch.cat(own))
    assert torch.equal(got[16:], want[24:]) and torch.equal(held, want[16:24])   # the held-out 8 are skipped

    folder = tmp_path / "few" / "cls"   # 24 images: all of them calibration or held out
    folder.mkdir(parents=True)
    for i in range(24):
        Image.new("RGB", (32, 32), (10 * i, 0, 0)).save(folder / f"{i}.png")
    small = tiny_config(calib=str(folder.parent), num_calib=16, heldout=8, finetune_steps=3, finetune_images=40)
    sprep = prepare(small)
    with caplog.at_level(logging.INFO, logger="compress.pipeline"):   # as many as the set holds, said so
        assert len(torch.cat(_distillation_images(small, sprep, sprep.loader))) == 16
    assert "distillation on 16 images: 16 calibration + 0 more (--finetune-images 40: the set holds no more)" \
        in caplog.text
    every = tiny_config(calib=str(folder.parent), num_calib=24, heldout=8, finetune_steps=3)
    with pytest.raises(CompressError, match="no images left for the 8 held-out ones.*--heldout"):
        _heldout_images(every, prepare(every))   # the checks are not optional: an error
    with pytest.raises(CompressError, match="--finetune-images must be >= 0"):
        tiny_config(finetune_images=-1)
