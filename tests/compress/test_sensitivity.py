"""End-to-end layer sensitivity (compress/sensitivity.py): what the network amplifies keeps more rank."""
from __future__ import annotations

import dataclasses

import pytest
import timm
import torch

from compress.allocate import LayerCurve
from compress.sensitivity import sensitivities, weighted_curves


def _svd_factors(lin):
    U, S, Vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
    return lambda r: (U[:, :r] * S[:r], Vh[:r])


def _damped_vit(head_scale: float = 1.0):
    torch.manual_seed(0)
    model = timm.create_model("vit_cifar_ref", pretrained=False, depth=2, embed_dim=64, num_heads=2,
                              init_values=1.0).eval()
    with torch.no_grad():
        model.blocks[0].ls1.gamma.fill_(1e-4)     # block 0's attention branch barely reaches the output
        model.head.weight.mul_(head_scale)
    return model


def test_a_layer_the_network_damps_is_far_less_sensitive():
    model = _damped_vit()
    names = ["blocks.0.attn.proj", "blocks.0.mlp.fc2"]
    lins = {n: model.get_submodule(n) for n in names}
    ranks = {n: 4 for n in names}
    errors = {n: 0.1 for n in names}
    x = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = sensitivities(model, {n: _svd_factors(l) for n, l in lins.items()}, ranks, errors, x)
    assert set(s) == set(names) and all(v > 0 for v in s.values())
    assert s["blocks.0.attn.proj"] < s["blocks.0.mlp.fc2"] / 100
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # model restored


def test_weighted_curves_scale_each_layer_and_default_to_the_median():
    curves = [LayerCurve(n, 4, 4, True, (1.0, 0.5, 0.0)) for n in "abc"]
    out = weighted_curves(curves, {"a": 2.0, "b": 4.0})
    assert [c.curve for c in out] == [(2.0, 1.0, 0.0), (4.0, 2.0, 0.0), (3.0, 1.5, 0.0)]


def test_pipeline_reallocates_by_sensitivity(tiny_config):
    from compress.pipeline import run

    base = run(tiny_config(comp_rank=0, quant=False, ratio=0.5, sensitivity_images=0))
    res = run(tiny_config(comp_rank=0, quant=False, ratio=0.5, sensitivity_images=8))
    assert base.manifest["sensitivity"] is None
    sens = res.manifest["sensitivity"]
    assert sens["weights"] and all(v > 0 for v in sens["weights"].values())
    assert set(sens["measured_at_rank"]) == set(sens["weights"])
    assert res.manifest["params"]["after"] <= base.manifest["plan"]["target_params"]
    with pytest.raises(Exception, match="sensitivity-images"):
        tiny_config(sensitivity_images=-1)


def test_plan_for_measures_again_where_the_reallocation_moved_a_layer(tiny_config, monkeypatch):
    """A slope measured at one rank is re-measured at the rank the reallocation gave: the second
    round measures exactly the layers whose rank moved (or that the first plan left dense)."""
    from compress import pipeline

    cfg = tiny_config(comp_rank=0, quant=False, ratio=0.5, sensitivity_images=4)
    prep = pipeline.prepare(cfg)
    real, calls = pipeline.sensitivities, []

    def recording(model, factors, ranks, errors, images, target="features"):
        calls.append(dict(ranks))
        return real(model, factors, ranks, errors, images, target)

    monkeypatch.setattr(pipeline, "sensitivities", recording)
    first, _ = pipeline.plan_for(dataclasses.replace(cfg, sensitivity_images=0), prep)
    plan, sens = pipeline.plan_for(cfg, prep)
    assert calls[0] == {lp.name: lp.rank for lp in first.layers if not lp.dense}
    assert len(calls) == pipeline.SENSITIVITY_ROUNDS   # the tiny ViT's reallocation does move layers
    for later in calls[1:]:
        assert later and all(calls[0].get(n) != r for n, r in later.items())
    assert set(sens["weights"]) == set().union(*calls)
    assert sens["measured_at_rank"] == {n: r for c in calls for n, r in c.items()}   # the latest rank wins
    assert plan.params_after <= plan.target_params


def test_logit_target_measures_what_moves_the_heads_predictions():
    model = _damped_vit(head_scale=20.0)          # confident predictions, as a trained head makes
    names = ["blocks.0.attn.proj", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1"]
    lins = {n: model.get_submodule(n) for n in names}
    ranks, errors = {n: 4 for n in names}, {n: 0.1 for n in names}
    x = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))]
    facts = {n: _svd_factors(l) for n, l in lins.items()}
    kl = sensitivities(model, facts, ranks, errors, x, target="logits")
    feats = sensitivities(model, facts, ranks, errors, x, target="features")
    assert set(kl) == set(names) and all(v > 0 for v in kl.values())
    assert kl["blocks.0.attn.proj"] < kl["blocks.0.mlp.fc2"] / 100
    assert kl != pytest.approx(feats, rel=0.2)   # a different measure, not the features' error renamed
    with torch.no_grad():
        model.head.weight.zero_()                 # a head that reads nothing: no layer moves its predictions
    flat = sensitivities(model, facts, ranks, errors, x, target="logits")
    assert all(v == pytest.approx(0.0, abs=1e-12) for v in flat.values())
    with pytest.raises(ValueError, match="sensitivity target"):
        sensitivities(model, facts, ranks, errors, x, target="tokens")


def test_pipeline_logit_sensitivity_needs_a_classifier(tiny_config, tmp_path):
    from compress.errors import CompressError
    from compress.pipeline import run

    res = run(tiny_config(comp_rank=0, quant=False, ratio=0.5, sensitivity_images=8, sensitivity_target="logits"))
    sens = res.manifest["sensitivity"]
    assert sens["target"] == "logits" and all(v >= 0 for v in sens["weights"].values())
    assert res.manifest["params"]["after"] <= res.manifest["plan"]["target_params"]
    with pytest.raises(CompressError, match="headless.*--sensitivity-target features"):
        run(tiny_config(out=str(tmp_path / "h"), comp_rank=0, quant=False, sensitivity_images=8,
                        sensitivity_target="logits", model_kwargs=dict(depth=2, embed_dim=64, num_heads=2,
                                                                      num_classes=0)))
    with pytest.raises(CompressError, match="sensitivity-target"):
        tiny_config(sensitivity_target="tokens")
